"""Zone replicas on one etcd: exactly one leads (runs the deliveries), another takes over
within the leader lease's TTL when it stops or is SIGKILLed, a leader paused past its lease
cannot write (fencing), and hosts heartbeat to any replica, every replica seeing their
state, and the agent and the CLI move on from a dead first URL. The agents are the
StandInAgent of the driver's unit tests, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from common.files import ensure_secret
from hostagent.config import ApiConfig
from hostagent.errors import NotLeader
from hostagent.zone.auth import host_token
from hostagent.zone.client import ZoneClient as CliClient
from hostagent.zone.client import resolve_context
from hostagent.zone.config import (
    AgentsConfig,
    HostsConfig,
    ReplicaConfig,
    StoreConfig,
    ZoneServerConfig,
)
from hostagent.zone.etcd import Delete, Put, absent
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.server import Zone
from hostagent.zoneclient import ZoneClient
from tests import etcd
from tests.conftest import etcd_client
from tests.etcd import Member
from tests.fakezone import free_port
from tests.unit.test_zone_driver import StandInAgent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TTL = 2  # the leader lease's, in seconds (etcd's least is about 1.5 s)
CLUSTER: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "masters": {"count": 1, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> float:
    """Poll check until true; the seconds it took."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def config(tmp_path: Path, endpoint: str, prefix: str, replica: str) -> ZoneServerConfig:
    """One replica's configuration: the replicas share the state_dir (its api-token,
    host-secret and pki/), each has its own port."""
    return ZoneServerConfig(
        state_dir=tmp_path / "zone",
        api=ApiConfig(listen=f"127.0.0.1:{free_port()}"),
        hosts=HostsConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0),
        agents=AgentsConfig(retry_initial_s=0.1, retry_max_s=0.5, request_timeout_s=5.0),
        store=StoreConfig(backend="etcd", endpoints=(endpoint,), prefix=prefix),
        replica=ReplicaConfig(id=replica, leader_lease_ttl_s=TTL),
    )


@dataclass
class Harness:
    tmp_path: Path
    endpoint: str
    prefix: str
    session: aiohttp.ClientSession
    agents: dict[str, StandInAgent]

    @property
    def admin(self) -> dict[str, str]:
        token = (self.tmp_path / "zone" / "api-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def host(self, host: str) -> dict[str, str]:
        secret = (self.tmp_path / "zone" / "host-secret").read_text().strip()
        return {"Authorization": f"Bearer {host_token(secret, host)}"}

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            async with self.session.request(method, url, **kwargs) as response:
                return response.status, await response.json(content_type=None)
        except aiohttp.ClientError as exc:
            return 0, str(exc)

    async def zone_view(self, url: str) -> dict[str, Any] | None:
        status, body = await self.call("GET", f"{url}/v1/zone", headers=self.admin)
        return body if status == 200 else None

    async def agent(self, host: str) -> str:
        agent = self.agents[host] = StandInAgent(f"agent-{host}")
        agent.server = TestServer(agent.app(), host="127.0.0.1")
        await agent.server.start_server()
        return str(agent.server.make_url("")).rstrip("/")

    async def beat(self, url: str, host: str, agent_url: str) -> int:
        agent = self.agents[host]
        body = {
            "api_url": agent_url,
            "api_token": agent.token,
            "underlay_address": f"10.250.0.{len(host) + 10}",
            "allocatable": {"vcpus": 64, "memory_mib": 65536, "disk_gib": 1000},
            "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
            "nodes": [
                {
                    "cluster": k.split("/")[0],
                    "name": k.split("/")[1],
                    "phase": "Ready",
                    "spec_hash": "",
                }
                for k in agent.nodes
            ],
        }
        status, _ = await self.call(
            "PUT", f"{url}/v1/hosts/{host}", json=body, headers=self.host(host)
        )
        return status


@pytest.fixture
async def harness(tmp_path: Path, etcd_member: Member) -> AsyncIterator[Harness]:
    prefix = f"/test-ha/{uuid.uuid4().hex}/"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        h = Harness(tmp_path, etcd_member.endpoint, prefix, session, {})
        try:
            yield h
        finally:
            for agent in h.agents.values():
                if agent.server is not None:
                    await agent.server.close()
            cleanup = etcd_client(etcd_member.endpoint)
            await cleanup.txn([], [Delete(prefix, prefix=True)])
            await cleanup.close()


@pytest.fixture
async def zones(harness: Harness) -> AsyncIterator[list[Zone]]:
    """Three replicas in this process."""
    started: list[Zone] = []
    try:
        for name in ("ra", "rb", "rc"):
            zone = Zone(config(harness.tmp_path, harness.endpoint, harness.prefix, name))
            await zone.start()
            started.append(zone)
        yield started
    finally:
        for zone in started:
            await zone.stop()


def leaders(zones: list[Zone]) -> list[Zone]:
    return [z for z in zones if z.deliverer is not None]


async def one_leader(zones: list[Zone]) -> bool:
    return len(leaders(zones)) == 1


async def test_three_replicas_elect_one_leader_that_every_replica_shows(
    harness: Harness, zones: list[Zone]
) -> None:
    async def one_leader_seen_by_all() -> bool:
        views = [await harness.zone_view(z.api_url) for z in zones]
        return len(leaders(zones)) == 1 and all(
            v is not None
            and v["leader"] == leaders(zones)[0].replica_id
            and len(v["replicas"]) == 3
            for v in views
        )

    await until(one_leader_seen_by_all, 30)
    view = await harness.zone_view(zones[0].api_url)
    assert view is not None
    assert [r["id"] for r in view["replicas"]] == ["ra", "rb", "rc"]
    assert sum(r["leader"] for r in view["replicas"]) == 1
    assert view["store"]["backend"] == "etcd" and view["store"]["revision"] > 0
    status, text = 0, ""
    async with harness.session.get(f"{zones[0].api_url}/metrics") as response:
        status, text = response.status, await response.text()
    assert status == 200
    leading = zones[0] is leaders(zones)[0]
    assert f"hostagent_zone_leader {1.0 if leading else 0.0}" in text
    assert "hostagent_zone_leader_changes_total 1.0" in text


async def test_a_stopped_leader_hands_over_and_deliveries_go_on(
    harness: Harness, zones: list[Zone]
) -> None:
    await until(lambda: one_leader(zones), 30)
    old = leaders(zones)[0]
    others = [z for z in zones if z is not old]
    url = await harness.agent("h1")
    # Heartbeats and the cluster go to replicas that do not lead: the leader delivers.
    assert await harness.beat(others[0].api_url, "h1", url) == 201

    async def seen() -> bool:  # another replica sees the host once its watch brings it
        return others[1].store.host("h1") is not None

    await until(seen, 10)
    status, body = await harness.call(
        "PUT", f"{others[1].api_url}/v1/clusters/one", json=CLUSTER, headers=harness.admin
    )
    assert status == 201, body

    async def delivered(key: str) -> bool:
        return key in harness.agents["h1"].nodes

    await until(lambda: delivered("one/m1"), 30)
    await old.stop()
    zones.remove(old)  # the fixture does not stop it twice
    took = await until(lambda: one_leader(zones), TTL + 10)
    assert took < TTL + 1  # a stopped leader revokes its lease: no wait for the TTL
    status, body = await harness.call(
        "PUT", f"{zones[0].api_url}/v1/clusters/two", json=CLUSTER, headers=harness.admin
    )
    assert status == 201, body
    await until(lambda: delivered("two/m1"), 30)


async def test_a_leader_paused_past_its_lease_cannot_record_a_delivery(
    harness: Harness, zones: list[Zone]
) -> None:
    await until(lambda: one_leader(zones), 30)
    old = leaders(zones)[0]
    assert old.election is not None and isinstance(old.store, EtcdZoneStore)
    fence = old.store.fence
    # As if its process stopped: no renewals, no election steps; it still believes it
    # leads (its fence is set) when it runs again.
    assert old.election._task is not None
    old.election._task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await old.election._task
    assert old.store.fence == fence

    async def another_leads() -> bool:
        leader = zones[0].store.mirror.leader if isinstance(zones[0].store, EtcdZoneStore) else None
        return leader is not None and leader[0] != old.replica_id

    took = await until(another_leads, TTL + 10)
    assert took < TTL + 2
    key = old.store.layout.delivery("h9", "node", "demo/m1")
    with pytest.raises(NotLeader, match="no longer leads"):
        await old.store.set_delivery("h9", "node", "demo/m1", "digest")
    _, kvs = await old.store.etcd.list_prefix(key)
    assert kvs == []  # etcd refused it: nothing written
    # Every write of the leader's loops goes through the same fence (store.fenced).
    marker = f"{harness.prefix}fenced-marker"
    with pytest.raises(NotLeader, match="no longer leads"):
        await old.store.fenced([absent(marker)], [Put(marker, b"old leader")])

    async def new_fenced() -> bool:
        return any(z is not old and z.store.fence is not None for z in zones)

    await until(new_fenced, 10)
    new = next(z for z in zones if z is not old and z.store.fence is not None)
    assert isinstance(new.store, EtcdZoneStore)
    assert (await new.store.fenced([absent(marker)], [Put(marker, b"new")])).succeeded
    _, kvs = await old.store.etcd.list_prefix(marker)
    assert [kv.value for kv in kvs] == [b"new"]
    old.store.fence = None  # for the fixture's stop: it is no leader any more


async def test_heartbeats_to_any_replica_and_a_silent_host_is_not_ready_on_every_replica(
    harness: Harness, zones: list[Zone]
) -> None:
    url = await harness.agent("h1")
    for zone in zones:  # each beat to another replica
        assert await harness.beat(zone.api_url, "h1", url) in (200, 201)

    async def states(state: str) -> bool:
        for zone in zones:
            status, body = await harness.call(
                "GET", f"{zone.api_url}/v1/hosts", headers=harness.admin
            )
            if status != 200 or [h["state"] for h in body["items"]] != [state]:
                return False
        return True

    await until(lambda: states("Ready"), 10)
    # Unchanged reports only renew the host's lease: nothing is written to etcd.
    store = zones[0].store
    assert isinstance(store, EtcdZoneStore)
    revision = store.mirror.revision
    for zone in zones:
        assert await harness.beat(zone.api_url, "h1", url) == 200
    assert store.mirror.revision == revision
    await until(lambda: states("Ready"), 1)
    took = await until(lambda: states("NotReady"), 10)
    assert took <= TTL + 1.0  # the lease's TTL (3 x 0.5 s, at least 2 s), and a poll
    # It beats again (to any replica): Ready on every replica, under a new lease.
    assert await harness.beat(zones[1].api_url, "h1", url) == 200
    await until(lambda: states("Ready"), 5)


async def named_leader(harness: Harness, urls: dict[str, str]) -> str | None:
    """The leader the first answering replica names once it sees every replica in urls."""
    for url in urls.values():
        view = await harness.zone_view(url)
        if view is not None and view["leader"] and len(view["replicas"]) == len(urls):
            return str(view["leader"])
    return None


async def agreed_leader(harness: Harness, urls: dict[str, str]) -> str:
    """named_leader, waited for (60 s)."""

    async def has_leader() -> bool:
        return await named_leader(harness, urls) is not None

    await until(has_leader, 60)
    found = await named_leader(harness, urls)
    assert found is not None
    return found


def serve(
    harness: Harness, name: str, shutdown_timeout_s: float = 20.0
) -> tuple[subprocess.Popen[bytes], str]:
    zone_config = config(harness.tmp_path, harness.endpoint, harness.prefix, name)
    path = harness.tmp_path / f"{name}.toml"
    path.write_text(
        f"""state_dir = "{zone_config.state_dir}"
shutdown_timeout_s = {shutdown_timeout_s}
[api]
listen = "{zone_config.api.listen}"
[hosts]
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 2.0
[agents]
retry_initial_s = 0.1
retry_max_s = 0.5
[store]
backend = "etcd"
endpoints = ["{harness.endpoint}"]
prefix = "{harness.prefix}"
[replica]
id = "{name}"
leader_lease_ttl_s = {TTL}
"""
    )
    log = (harness.tmp_path / f"{name}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "hostagent", "zone", "serve", "--zone-config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return process, f"http://{zone_config.api.listen}"


async def test_a_sigkilled_leader_replica_is_replaced_within_its_ttl(harness: Harness) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    state_dir = harness.tmp_path / "zone"
    state_dir.mkdir(mode=0o700)
    for secret in ("api-token", "host-secret"):  # made once: replicas share them
        ensure_secret(state_dir / secret)
    try:
        urls = {}
        for name in ("pa", "pb", "pc"):
            process, url = serve(harness, name)
            processes.append(process)
            urls[name] = url

        old = await agreed_leader(harness, urls)
        agent_url = await harness.agent("h1")
        survivor = next(url for name, url in urls.items() if name != old)
        assert await harness.beat(survivor, "h1", agent_url) == 201

        processes[list(urls).index(old)].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        del urls[old]

        async def taken_over() -> bool:
            now = await named_leader(harness, urls)
            return now is not None and now != old

        took = await until(taken_over, TTL + 20)
        # The TTL, and etcd's lease expiry check (every 500 ms) and the next campaign.
        assert took < TTL + 2, took

        async def acknowledged() -> bool:
            await harness.beat(survivor, "h1", agent_url)
            status, _ = await harness.call(
                "PUT", f"{survivor}/v1/clusters/after", json=CLUSTER, headers=harness.admin
            )
            return status in (200, 201) and "after/m1" in harness.agents["h1"].nodes

        await until(acknowledged, 30)
        print(
            f"failover: new leader after {took:.2f} s, delivered "
            f"{time.monotonic() - killed:.2f} s after the SIGKILL"
        )
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def test_the_agent_and_the_cli_fail_over_from_a_dead_first_url(
    harness: Harness, zones: list[Zone]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    urls = [dead, zones[1].api_url, zones[2].api_url]
    agent_url = await harness.agent("h1")
    token = harness.host("h1")["Authorization"].removeprefix("Bearer ")
    body = {
        "api_url": agent_url,
        "api_token": harness.agents["h1"].token,
        "allocatable": {"vcpus": 8, "memory_mib": 8192, "disk_gib": 100},
        "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
    }
    beats = ZoneClient(dead, "h1", token, lambda: body, urls=urls, timeout_s=5.0)
    async with beats.session() as session:
        assert await beats.beat(session), beats.status().last_error
    assert beats.status().url == zones[1].api_url
    admin = harness.admin["Authorization"].removeprefix("Bearer ")
    cli = CliClient(resolve_context(",".join(urls), admin, None, {}), timeout_s=5.0)
    try:
        hosts = await asyncio.to_thread(cli.hosts)
    finally:
        cli.close()
    assert [(h["host"], h["state"]) for h in hosts] == [("h1", "Ready")]


SHUTDOWN_S = 8.0  # the replicas' shutdown_timeout_s in the SIGTERM test


async def exited(process: subprocess.Popen[bytes]) -> float:
    """Seconds until the process exits (at most SHUTDOWN_S + 10)."""
    start = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(process.wait, SHUTDOWN_S + 10)
    return time.monotonic() - start


async def test_a_sigterm_stops_a_replica_within_its_shutdown_timeout(
    harness: Harness, tmp_path: Path
) -> None:
    """SIGTERM while the replica leads with a heartbeat half sent (aiohttp stops reading
    at shutdown: the body never comes), and SIGTERM of the replica that took over while
    etcd is down: both replicas exit within shutdown_timeout_s, and the lead passes."""
    processes: list[subprocess.Popen[bytes]] = []
    state_dir = tmp_path / "zone"
    state_dir.mkdir(mode=0o700)
    for secret in ("api-token", "host-secret"):
        ensure_secret(state_dir / secret)
    member = etcd.start()  # its own member: this test stops it
    own = replace(harness, endpoint=member.endpoint)
    writer: asyncio.StreamWriter | None = None
    try:
        urls = {}
        for name in ("sa", "sb"):
            process, url = serve(own, name, SHUTDOWN_S)
            processes.append(process)
            urls[name] = url

        first = await agreed_leader(own, urls)
        process = processes[list(urls).index(first)]
        host, port = urls[first].removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"PUT /v1/hosts/h1 HTTP/1.1\r\nHost: {host}\r\n"
            f"{own.host('h1')['Authorization'].join(['Authorization: ', ''])}\r\n"
            "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{".encode()
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler reads the body: the request is under way
        process.send_signal(signal.SIGTERM)
        took = await exited(process)
        assert process.returncode == 0, (
            process.returncode,
            (tmp_path / f"{first}.log").read_text(),
        )
        assert took < SHUTDOWN_S, took
        del urls[first]

        async def taken_over() -> bool:
            now = await named_leader(own, urls)
            return now is not None and now != first

        await until(taken_over, 10)  # at once: the stopped leader revoked its lease
        second = next(iter(urls))
        member.kill()
        process = processes[list(("sa", "sb")).index(second)]
        process.send_signal(signal.SIGTERM)
        took = await exited(process)
        log = (tmp_path / f"{second}.log").read_text()
        assert process.returncode is not None, "still running"
        assert took < SHUTDOWN_S + 1.0, (took, log)
        if process.returncode != 0:  # the store could not be closed in time: said so
            assert "did not stop within shutdown_timeout_s" in log, log
    finally:
        if writer is not None:
            writer.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        member.__exit__()
