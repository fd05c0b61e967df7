"""The leader's Roller, one step at a time, against the real stores (SQLite and etcd) with a
local CA: rollouts (masters one at a time in place, then workers with surge), a rollout
that stops, a rollback, a new leader carrying on, remediation within its limits, the
drain hook (a local aiohttp server) and the cluster's events. The hosts' agents are
played by reports: a node is reported at the spec the zone would send it (as an agent
reports once it has applied it), Ready unless a test says otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hostagent.errors import ConfigError, Invalid, NotLeader, OutOfCapacity
from hostagent.model import Role
from hostagent.zone.config import RemediationConfig, RolloutConfig, ZoneServerConfig
from hostagent.zone.etcd import Delete
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.model import ClusterSpec, HostReport
from hostagent.zone.remediation import Limits
from hostagent.zone.roller import Roller, drain_tls
from hostagent.zone.service import ZoneService
from hostagent.zone.store import MAX_EVENTS, ClusterEvent, SqliteZoneStore, ZoneStore
from pki.local import LocalBackend
from tests.conftest import StoreFactory, etcd_client
from tests.etcd import Member


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Zone:
    """A service and its Roller on one store; agents played by reports()."""

    def __init__(self, tmp_path: Path, store: ZoneStore, clock: Clock) -> None:
        self.config = ZoneServerConfig(
            state_dir=tmp_path,
            remediation=RemediationConfig(unhealthy_for_s=60, window_s=600),
        )
        self.clock = clock
        self.service = ZoneService(store, self.config, LocalBackend(tmp_path / "pki"), clock=clock)
        # The tests step the Roller themselves: its own loop runs only when kicked.
        rollout = RolloutConfig(interval_s=3600)
        self.roller = Roller(self.service, rollout, self.config.remediation, drain_tls(rollout))
        self.not_ready: set[str] = set()
        self.unhealthy: dict[str, float] = {}  # node -> since
        self.held: dict[str, str] = {}  # node -> the spec hash its agent still reports
        self.etcd: dict[str, dict[str, Any]] = {}  # node -> its etcd member's last report
        self.full = False  # every host reports all its memory allocated

    async def reports(self, hosts: Iterable[int] = (1, 2, 3, 4)) -> None:
        """Every host reports its nodes as an agent that applied what the zone sends."""
        for i in hosts:
            host = f"h{i}"
            nodes = []
            for key, spec in self.service.work(host).nodes.items():
                cluster, _, name = key.partition("/")
                health: dict[str, Any] = {"healthy": True}
                if name in self.unhealthy:
                    since = iso(self.unhealthy[name])
                    health = {"healthy": False, "reason": "crash-loop", "since": since}
                if name in self.etcd:
                    health["etcd"] = self.etcd[name]
                phase = "Running" if name in self.not_ready else "Ready"
                nodes.append(
                    {
                        "cluster": cluster,
                        "name": name,
                        "phase": phase,
                        "spec_hash": self.held.get(name, spec.spec_hash()),
                        "health": health,
                    }
                )
            await self.service.report(host, report(i, nodes, full=self.full))

    async def settle(self, name: str = "demo", steps: int = 40) -> list[dict[str, Any]]:
        """Report and step until the rollout is done; the cluster's views on the way."""
        seen = []
        for _ in range(steps):
            await self.reports()
            await self.gone()
            await self.roller.step(name)
            view = self.service.cluster(name)
            seen.append(view)
            if view["status"]["rollout"] is None:
                await self.gone()
                return seen
        raise AssertionError(f"the rollout did not finish: {seen[-1]['status']}")

    async def gone(self) -> None:
        """The agents remove what is being deleted (the Deliverer's DELETE, then 404)."""
        for node in self.service.store.nodes():
            if node.deleting:
                await self.service.node_gone(node.host, f"{node.cluster}/{node.name}")

    def nodes(self, name: str = "demo") -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.service.cluster(name)["status"]["nodes"]}


def report(i: int, nodes: list[dict[str, Any]], *, full: bool = False) -> HostReport:
    return HostReport.model_validate(
        {
            "api_url": f"https://10.250.0.{10 + i}:8470",
            "api_token": f"token-{i}",
            "underlay_address": f"10.250.0.{10 + i}",
            "failure_domain": f"fd-{i}",
            "allocatable": {"vcpus": 64, "memory_mib": 65536, "disk_gib": 500},
            "allocated": {"vcpus": 0, "memory_mib": 65536 if full else 0, "disk_gib": 0},
            "nodes": nodes,
        }
    )


def spec(version: str = "1.30.5", workers: int = 3, **extra: Any) -> ClusterSpec:
    pool = {"vcpus": 1, "memory_mib": 256, "disk_gib": 2}
    return ClusterSpec.model_validate(
        {
            "kubernetes_version": version,
            "masters": {"count": 3, **pool},
            "workers": {"count": workers, **pool},
            **extra,
        }
    )


@pytest.fixture
async def zone(tmp_path: Path, zone_stores: StoreFactory) -> AsyncIterator[Zone]:
    zone = Zone(tmp_path, await zone_stores(), Clock())
    await zone.reports()
    await zone.roller.start()
    zone.service.on_rollout = lambda cluster: None
    yield zone
    await zone.roller.close()


async def created(zone: Zone, cluster: ClusterSpec) -> None:
    await zone.service.put_cluster("demo", cluster)
    await zone.reports()
    assert zone.service.cluster("demo")["status"]["phase"] == "Ready"


def remediations(zone: Zone, *kinds: str) -> list[dict[str, Any]]:
    """The cluster's events of kinds (default remediation), newest first."""
    events = zone.service.cluster("demo")["status"]["events"]
    return [e for e in events if e["kind"] in (kinds or ("remediation",))]


async def test_an_upgrade_rolls_masters_one_at_a_time_then_workers_with_surge(
    zone: Zone,
) -> None:
    await created(zone, spec())
    view, _ = await zone.service.put_cluster("demo", spec("1.31.2"))
    assert view["status"]["phase"] == "Upgrading"
    assert view["status"]["message"].startswith("0/6 nodes at 1.31.2")
    seen = await zone.settle()
    masters_down = [
        sum(1 for n in v["status"]["nodes"] if n["role"] == "master" and n["phase"] != "Ready")
        for v in seen
    ]
    counts = [sum(1 for n in v["status"]["nodes"] if n["role"] == "worker") for v in seen]
    assert max(masters_down) <= 1  # never two masters re-created at once
    assert max(counts) <= 3 + 1  # never more than max_surge extra workers
    nodes = zone.nodes()
    assert {n["kubernetes_version"] for n in nodes.values()} == {"1.31.2"}
    assert sorted(n for n, v in nodes.items() if v["role"] == "master") == ["m1", "m2", "m3"]
    assert sorted(n for n, v in nodes.items() if v["role"] == "worker") == ["w4", "w5", "w6"]
    assert zone.service.cluster("demo")["status"]["phase"] == "Ready"
    progress = [v["status"]["rollout"]["progress"] for v in seen if v["status"]["rollout"]]
    assert "3/6 nodes at 1.31.2" in progress  # the masters first


async def test_the_last_master_counts_until_its_agent_has_taken_the_new_spec(
    zone: Zone,
) -> None:
    await created(zone, spec(workers=0))
    # m3's agent keeps reporting its old incarnation, Ready, at the spec it had.
    zone.held["m3"] = zone.service.work(zone.nodes()["m3"]["host"]).nodes["demo/m3"].spec_hash()
    await zone.service.put_cluster("demo", spec("1.31.2", workers=0))
    for _ in range(6):
        await zone.reports()
        await zone.roller.step("demo")
    assert {v["kubernetes_version"] for v in zone.nodes().values()} == {"1.31.2"}  # all sent
    status = zone.service.cluster("demo")["status"]
    assert (status["phase"], status["rollout"]["state"]) == ("Upgrading", "Rolling")
    assert status["message"] == "2/3 nodes at 1.31.2; waiting for master m3 to become Ready"
    del zone.held["m3"]
    await zone.reports()
    status = zone.service.cluster("demo")["status"]
    assert (status["phase"], status["rollout"]) == ("Ready", None)


async def test_with_etcd_as_a_unit_the_next_master_waits_for_every_member_reported_healthy(
    zone: Zone,
) -> None:
    def etcd(healthy: bool) -> dict[str, Any]:
        return {"healthy": healthy, "checked_at": iso(time.time())}  # the agent's wall clock

    await created(zone, spec(workers=0, etcd_mode="systemd"))
    zone.etcd = {name: etcd(True) for name in ("m1", "m2", "m3")}
    await zone.reports()
    await zone.service.put_cluster("demo", spec("1.31.2", workers=0, etcd_mode="systemd"))
    await zone.roller.step("demo")  # m1 re-created at 1.31.2 and Ready again ...
    assert zone.nodes()["m1"]["kubernetes_version"] == "1.31.2"
    # ... but its member's last report is from before: not a word on the new one.
    for report in (None, etcd(False)):
        if report is not None:
            zone.etcd["m1"] = report
        for _ in range(3):
            await zone.reports()
            await zone.roller.step("demo")
        assert zone.nodes()["m2"]["kubernetes_version"] == "1.30.5"
        assert "waiting for etcd to be healthy" in zone.service.cluster("demo")["status"]["message"]
    zone.etcd["m1"] = etcd(True)
    await zone.reports()
    await zone.roller.step("demo")
    assert zone.nodes()["m2"]["kubernetes_version"] == "1.31.2"


async def test_a_master_without_an_etcd_report_counts_by_readiness_with_etcd_in_a_pod(
    zone: Zone,
) -> None:
    await created(zone, spec(workers=0))
    # m1 and m2 have no etcd report: their readiness counts; m3's member says it is sick.
    zone.etcd = {"m3": {"healthy": False, "checked_at": iso(time.time() + 60)}}
    await zone.service.put_cluster("demo", spec("1.31.2", workers=0))
    for _ in range(3):
        await zone.reports()
        await zone.roller.step("demo")
    assert {v["kubernetes_version"] for v in zone.nodes().values()} == {"1.30.5"}
    assert "waiting for etcd to be healthy" in zone.service.cluster("demo")["status"]["message"]
    del zone.etcd["m3"]
    await zone.settle()
    assert {v["kubernetes_version"] for v in zone.nodes().values()} == {"1.31.2"}


async def test_a_skipped_or_lowered_minor_is_refused_with_the_reason(zone: Zone) -> None:
    await created(zone, spec())
    with pytest.raises(Invalid, match="one minor at a time"):
        await zone.service.put_cluster("demo", spec("1.32.0"))
    with pytest.raises(Invalid, match="cannot go down"):
        await zone.service.put_cluster("demo", spec("1.29.1"))
    assert zone.service.cluster("demo")["spec"]["kubernetes_version"] == "1.30.5"


async def test_a_node_not_ready_in_time_stops_the_rollout_and_nothing_further_is_touched(
    zone: Zone,
) -> None:
    rollout = {"ready_timeout_s": 30}
    await created(zone, spec(rollout=rollout))
    await zone.service.put_cluster("demo", spec("1.31.2", rollout=rollout))
    await zone.roller.step("demo")  # m1 re-created at 1.31.2 ...
    zone.not_ready.add("m1")  # ... and never Ready again
    for _ in range(3):
        await zone.reports()
        await zone.roller.step("demo")
    before = zone.nodes()
    assert before["m1"]["kubernetes_version"] == "1.31.2"
    assert before["m2"]["kubernetes_version"] == "1.30.5"
    zone.clock.now += 31
    for _ in range(3):
        await zone.reports()
        await zone.roller.step("demo")
    status = zone.service.cluster("demo")["status"]
    assert status["rollout"]["state"] == "Stopped"
    assert "master m1 is not Ready" in status["message"]
    assert zone.nodes() == before  # nothing further touched
    stopped = [e for e in status["events"] if e["kind"] == "rollout"]
    assert len(stopped) == 1 and stopped[0]["node"] == "m1"


async def test_putting_the_old_spec_back_rolls_back_the_same_way(zone: Zone) -> None:
    await created(zone, spec())
    await zone.service.put_cluster("demo", spec("1.31.2"))
    for _ in range(2):  # m1 re-created at 1.31.2, and Ready again
        await zone.reports()
        await zone.roller.step("demo")
    assert zone.nodes()["m1"]["kubernetes_version"] == "1.31.2"
    view, _ = await zone.service.put_cluster("demo", spec("1.30.5"))  # a node runs 1.31
    assert view["status"]["phase"] == "Upgrading"
    await zone.settle()
    assert {n["kubernetes_version"] for n in zone.nodes().values()} == {"1.30.5"}


async def test_a_new_leader_carries_the_rollout_on_from_the_store(
    tmp_path: Path, zone: Zone, zone_stores: StoreFactory
) -> None:
    await created(zone, spec())
    await zone.service.put_cluster("demo", spec("1.31.2"))
    for _ in range(3):
        await zone.reports()
        await zone.roller.step("demo")
    await zone.roller.close()
    done = {n for n, v in zone.nodes().items() if v["kubernetes_version"] == "1.31.2"}
    assert 0 < len(done) < 6
    successor = Zone(tmp_path, await zone_stores(), zone.clock)  # nothing kept in memory
    await successor.roller.start()
    successor.service.on_rollout = lambda cluster: None
    try:
        await successor.settle()
        assert {n["kubernetes_version"] for n in successor.nodes().values()} == {"1.31.2"}
    finally:
        await successor.roller.close()


async def test_an_unhealthy_worker_is_replaced_with_an_event(zone: Zone) -> None:
    await created(zone, spec())
    zone.unhealthy["w2"] = zone.clock.now
    await zone.reports()
    await zone.roller.step("demo")
    assert "w2" in zone.nodes()  # not unhealthy for long enough yet
    zone.clock.now += 61
    await zone.reports()
    await zone.roller.step("demo")
    nodes = zone.nodes()
    assert nodes["w2"]["phase"] == "Deleting" and "w4" in nodes
    (event,) = remediations(zone)
    assert event["kind"] == "remediation" and event["node"] == "w2"
    assert "replacing worker w2 by w4" in event["message"]


async def test_the_budget_holds_with_two_of_three_workers_bad(zone: Zone) -> None:
    await created(zone, spec(workers=3))
    zone.unhealthy.update({"w1": zone.clock.now, "w2": zone.clock.now + 1})
    zone.clock.now += 120
    for _ in range(3):
        await zone.reports()
        await zone.gone()
        await zone.roller.step("demo")
    events = zone.service.cluster("demo")["status"]["events"]
    assert [e["node"] for e in events if e["kind"] == "remediation"] == ["w1"]  # 1 of 6
    assert "w2" in zone.nodes()
    zone.clock.now += 600  # the next window
    await zone.reports()
    await zone.roller.step("demo")
    events = zone.service.cluster("demo")["status"]["events"]
    assert [e["node"] for e in events if e["kind"] == "remediation"] == ["w2", "w1"]


async def test_an_unhealthy_master_is_re_created_in_place(zone: Zone) -> None:
    await created(zone, spec(workers=1))
    zone.unhealthy["m2"] = zone.clock.now
    zone.clock.now += 61
    await zone.reports()
    before = zone.service.work(zone.nodes()["m2"]["host"]).nodes["demo/m2"]
    await zone.roller.step("demo")
    after = zone.service.work(zone.nodes()["m2"]["host"]).nodes["demo/m2"]
    assert after.generation == before.generation + 1  # the agent re-creates the VM
    assert after.spec_hash() != before.spec_hash()
    assert zone.nodes()["m2"]["address"] == "10.128.0.11"  # same name and address


class Hook:
    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.calls: list[dict[str, Any]] = []
        self.released = asyncio.Event()  # ends every delay at once (teardown)
        self.server = TestServer(self.app(), host="127.0.0.1")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/drain", self.drain)
        return app

    async def drain(self, request: web.Request) -> web.Response:
        self.calls.append(await request.json())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.delay_s):
                await self.released.wait()
        return web.json_response({}, status=self.status)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/drain"))


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    hook = Hook()
    await hook.server.start_server()
    yield hook
    hook.released.set()
    await hook.server.close()


async def test_the_drain_hook_is_called_before_a_removal_and_the_event_says_so(
    zone: Zone, hook: Hook
) -> None:
    await created(zone, spec(workers=1, drain_hook={"url": hook.url}))
    zone.unhealthy["w1"] = zone.clock.now
    zone.clock.now += 61
    await zone.reports()
    await zone.roller.step("demo")
    assert hook.calls[0]["node"] == "w1" and hook.calls[0]["role"] == "worker"
    assert hook.calls[0]["cluster"] == "demo"
    assert hook.calls[0]["reason"].startswith("remediation")
    kinds = [(e["kind"], e["message"]) for e in remediations(zone, "remediation", "drain")]
    assert kinds[1][0] == "drain" and kinds[1][1].startswith("drain hook answered 200 in")
    assert kinds[0][0] == "remediation"


async def test_a_drain_hook_that_does_not_answer_is_given_up_after_its_timeout(
    zone: Zone, hook: Hook
) -> None:
    hook.delay_s = 30.0
    drain = {"url": hook.url, "timeout_s": 1.0}
    await created(zone, spec(workers=1, drain_hook=drain))
    zone.unhealthy["w1"] = zone.clock.now
    zone.clock.now += 61
    await zone.reports()
    start = time.monotonic()
    await zone.roller.step("demo")
    assert time.monotonic() - start < 10
    assert zone.nodes()["w1"]["phase"] == "Deleting"  # proceeded anyway
    (drained,) = [
        e for e in zone.service.cluster("demo")["status"]["events"] if e["kind"] == "drain"
    ]
    assert drained["message"].startswith("drain hook timed out after 1 s")


async def test_a_slow_drain_hook_blocks_only_its_own_cluster(zone: Zone, hook: Hook) -> None:
    hook.delay_s = 30.0
    await zone.service.put_cluster("slow", spec(workers=1, drain_hook={"url": hook.url}))
    await created(zone, spec(workers=1))
    zone.unhealthy["w1"] = zone.clock.now
    zone.clock.now += 61
    await zone.reports()
    zone.roller.kick("any")

    def replaced(name: str) -> bool:
        return any(n.name == "w1" and n.deleting for n in zone.service.store.nodes(name))

    deadline = time.monotonic() + 20
    while not replaced("demo"):
        assert time.monotonic() < deadline, "demo's worker was not replaced"
        await asyncio.sleep(0.05)
    assert hook.calls and not replaced("slow")  # slow's hook is still being waited for


async def test_events_are_bounded_and_survive_a_reopened_store(
    tmp_path: Path, zone: Zone, zone_stores: StoreFactory
) -> None:
    await created(zone, spec(workers=0))
    for i in range(MAX_EVENTS + 5):
        event = ClusterEvent(float(i), "drain", f"w{i}", Role.WORKER, f"event {i}")
        await zone.service.store.add_event("demo", event)
    reopened = await zone_stores()
    events = reopened.events("demo")
    assert len(events) == MAX_EVENTS
    assert events[0].message == "event 5" and events[-1].message == f"event {MAX_EVENTS + 4}"
    await zone.service.delete_cluster("demo")
    await zone.gone()
    assert zone.service.store.events("demo") == []


async def test_a_database_from_before_rollouts_gets_its_node_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the nodes table as it was, with one node
        db.execute(
            "CREATE TABLE nodes (cluster TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL, "
            "host TEXT NOT NULL, address TEXT NOT NULL, created_at TEXT NOT NULL, "
            "deleting INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (cluster, name))"
        )
        db.execute("INSERT INTO nodes VALUES ('demo', 'm1', 'master', 'h1', '10.128.0.10', 'c', 0)")
    db.close()
    store = SqliteZoneStore(path)
    await store.start()
    try:
        (node,) = store.nodes("demo")
        assert node.shape is None and node.generation == 0  # the cluster's spec, as before
    finally:
        await store.close()


async def test_a_drain_hook_that_fails_first_is_asked_again(zone: Zone, hook: Hook) -> None:
    hook.status = 500
    await created(zone, spec(workers=1, drain_hook={"url": hook.url, "timeout_s": 10}))
    zone.unhealthy["w1"] = zone.clock.now
    zone.clock.now += 61
    await zone.reports()

    async def recover() -> None:
        while not hook.calls:
            await asyncio.sleep(0.01)
        hook.status = 200

    recovering = asyncio.create_task(recover())
    await zone.roller.step("demo")
    await recovering
    assert len(hook.calls) >= 2
    (drained,) = [
        e for e in zone.service.cluster("demo")["status"]["events"] if e["kind"] == "drain"
    ]
    assert drained["message"].startswith("drain hook answered 200")


async def test_a_worker_whose_host_stopped_reporting_is_replaced_elsewhere(zone: Zone) -> None:
    await created(zone, spec(workers=1))
    lost = zone.nodes()["w1"]["host"]
    store = zone.service.store
    if isinstance(store, EtcdZoneStore):  # its lease ends, as if it expired
        await store.etcd.revoke(store.mirror.alive[lost])
        await store.mirror.until(lambda: lost not in store.mirror.alive, 10.0)
    others = [i for i in (1, 2, 3, 4) if f"h{i}" != lost]
    zone.clock.now += 30  # past heartbeat_timeout_s (SQLite)
    await zone.reports(others)
    await zone.roller.step("demo")
    assert "w1" in zone.nodes() and "w2" not in zone.nodes()  # not silent long enough
    zone.clock.now += 61
    await zone.reports(others)
    await zone.roller.step("demo")
    nodes = zone.nodes()
    assert nodes["w1"]["phase"] == "Deleting" and nodes["w2"]["host"] != lost
    (event,) = remediations(zone)
    assert f"host {lost} is not reporting" in event["message"]


async def test_a_replica_that_does_not_lead_cannot_write_events_or_re_create_nodes(
    etcd_member: Member,
) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    store = EtcdZoneStore(etcd_client(etcd_member.endpoint), prefix)
    await store.start()
    try:
        store.fence = 12345  # a term whose leader key is gone
        event = ClusterEvent(1.0, "remediation", "w1", Role.WORKER, "replacing w1")
        with pytest.raises(NotLeader):
            await store.add_event("demo", event)
        assert store.events("demo") == []
        store.fence = None  # no term (as set_delivery): written unfenced
        await store.add_event("demo", event)
        assert store.events("demo") == [event]
    finally:
        await store.etcd.txn([], [Delete(prefix, prefix=True)])
        await store.close()


async def test_two_workers_replaced_in_one_window_get_two_new_names(
    tmp_path: Path, zone_stores: StoreFactory
) -> None:
    zone = Zone(tmp_path, await zone_stores(), Clock())
    zone.roller.limits = Limits(unhealthy_for_s=60, window_s=600, max_fraction=1.0)
    await zone.reports()
    await zone.roller.start()
    zone.service.on_rollout = lambda cluster: None
    try:
        await created(zone, spec(workers=2))
        zone.unhealthy.update({"w1": zone.clock.now, "w2": zone.clock.now})
        zone.clock.now += 61
        await zone.reports()
        await zone.roller.step("demo")
        nodes = zone.nodes()
        assert nodes["w1"]["phase"] == nodes["w2"]["phase"] == "Deleting"
        assert {"w3", "w4"} <= set(nodes)
    finally:
        await zone.roller.close()


async def test_a_master_is_ready_again_only_at_the_spec_it_was_sent(zone: Zone) -> None:
    await created(zone, spec(workers=0))
    old = zone.service.work(zone.nodes()["m1"]["host"]).nodes["demo/m1"].spec_hash()
    await zone.service.put_cluster("demo", spec("1.31.2", workers=0))
    zone.held["m1"] = old  # its agent has not re-created it yet: Ready, at the old spec
    for _ in range(3):
        await zone.reports()
        await zone.roller.step("demo")
    versions = {n: v["kubernetes_version"] for n, v in zone.nodes().items()}
    assert versions == {"m1": "1.31.2", "m2": "1.30.5", "m3": "1.30.5"}
    message = zone.service.cluster("demo")["status"]["message"]
    assert message == "0/3 nodes at 1.31.2; waiting for master m1 to become Ready"
    del zone.held["m1"]
    await zone.settle()
    assert {v["kubernetes_version"] for v in zone.nodes().values()} == {"1.31.2"}


async def test_no_room_for_a_replacement_spends_neither_the_hook_nor_the_budget(
    zone: Zone, hook: Hook
) -> None:
    await created(zone, spec(workers=1, drain_hook={"url": hook.url}))
    zone.unhealthy["w1"] = zone.clock.now
    zone.clock.now += 61
    zone.full = True
    await zone.reports()
    with pytest.raises(OutOfCapacity):
        await zone.roller.step("demo")
    assert hook.calls == [] and remediations(zone, "remediation", "drain") == []
    zone.full = False  # room again: replaced at once, the window untouched
    await zone.reports()
    await zone.roller.step("demo")
    assert zone.nodes()["w1"]["phase"] == "Deleting" and "w2" in zone.nodes()


def test_a_drain_hook_ca_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.pem"
    with pytest.raises(ConfigError, match=r"rollout\.drain_hook_ca_file: cannot load"):
        drain_tls(RolloutConfig(drain_hook_ca_file=missing))
