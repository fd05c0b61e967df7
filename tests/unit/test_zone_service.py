"""ZoneService with its real store, SQLite and etcd (every case runs against both: the
store's contract), and a real local CA: allocation, placement, scaling, deletion, host
liveness and the status it reports."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from pathlib import Path
from typing import Any

import pytest
from pytest_mock import MockerFixture

from hostagent.errors import Conflict, Forbidden, Invalid, NotFound, OutOfCapacity
from hostagent.zone.config import ZoneNetworkConfig, ZoneServerConfig
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.model import ClusterSpec, HostReport
from hostagent.zone.service import ZoneService
from network.names import mac_address
from pki.local import LocalBackend
from tests.conftest import StoreFactory


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def report(
    host: int, *, memory_mib: int = 16384, domain: str | None = None, **extra: Any
) -> HostReport:
    return HostReport.model_validate(
        {
            "api_url": f"https://10.250.0.{10 + host}:8470",
            "api_token": f"token-{host}",
            "underlay_address": f"10.250.0.{10 + host}",
            "failure_domain": domain or f"fd-{host}",
            "allocatable": {"vcpus": 16, "memory_mib": memory_mib, "disk_gib": 500},
            "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
            **extra,
        }
    )


def spec(masters: int = 3, workers: int = 2, memory_mib: int = 512) -> ClusterSpec:
    pool = {"vcpus": 1, "memory_mib": memory_mib, "disk_gib": 2}
    return ClusterSpec.model_validate(
        {
            "kubernetes_version": "1.31.2",
            "masters": {"count": masters, **pool},
            "workers": {"count": workers, **pool},
        }
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(tmp_path: Path, clock: Clock, zone_stores: StoreFactory) -> ZoneService:
    config = ZoneServerConfig(state_dir=tmp_path)
    store = await zone_stores()
    zone = ZoneService(store, config, LocalBackend(tmp_path / "pki"), clock=clock)
    kicked: list[str] = []
    zone.on_change = kicked.extend
    return zone


async def silence(service: ZoneService, clock: Clock, seconds: float) -> None:
    """Every host stops reporting for seconds: on SQLite the clock moves past their last
    heartbeats; on etcd their leases end (revoked: as if they expired)."""
    clock.now += seconds
    store = service.store
    if isinstance(store, EtcdZoneStore):
        for lease in list(store.mirror.alive.values()):
            await store.etcd.revoke(lease)
        await store.mirror.until(lambda: not store.mirror.alive, 10.0)


async def register(service: ZoneService, hosts: int = 3, **kwargs: Any) -> None:
    for i in range(1, hosts + 1):
        await service.report(f"h{i}", report(i, **kwargs))


async def test_create_allocates_places_and_makes_the_cas(service: ZoneService) -> None:
    await register(service)
    view, created = await service.put_cluster("demo", spec())
    status = view["status"]
    assert created
    assert status["vni"] == 4096
    assert status["node_subnet"] == "10.128.0.0/24"
    assert status["pod_cidr"] == "100.64.0.0/20"
    assert status["service_cidr"] == "10.96.0.0/24"
    nodes = {n["name"]: n for n in status["nodes"]}
    assert sorted(nodes) == ["m1", "m2", "m3", "w1", "w2"]
    assert len({nodes[m]["host"] for m in ("m1", "m2", "m3")}) == 3
    assert nodes["m1"]["address"] == "10.128.0.10"
    assert status["api_endpoint"] == "10.128.0.5:6443"  # the VIP (alloc.VIP_OFFSET)
    assert status["vip"] == "10.128.0.5"
    assert status["phase"] == "Provisioning"
    assert {n["phase"] for n in nodes.values()} == {"Pending"}
    assert set(service.pki.ca_certificates("demo")) == {"kubernetes", "etcd", "front-proxy"}


async def test_second_cluster_gets_its_own_vni_and_ranges(service: ZoneService) -> None:
    await register(service)
    first, _ = await service.put_cluster("a", spec(1, 0))
    second, _ = await service.put_cluster("b", spec(1, 0))
    for key in ("vni", "node_subnet", "pod_cidr", "service_cidr"):
        assert first["status"][key] != second["status"][key], key


async def test_vni_still_reported_by_a_host_is_not_reused(service: ZoneService) -> None:
    await service.report("h1", report(1, networks=[{"cluster": "old", "vni": 4096}]))
    view, _ = await service.put_cluster("demo", spec(1, 0))
    assert view["status"]["vni"] == 4097


async def test_same_spec_again_changes_nothing(service: ZoneService) -> None:
    await register(service)
    first, _ = await service.put_cluster("demo", spec())
    again, created = await service.put_cluster("demo", spec())
    assert not created
    assert again["status"]["nodes"] == first["status"]["nodes"]


async def test_changing_the_masters_count_is_a_conflict(service: ZoneService) -> None:
    await register(service)
    await service.put_cluster("demo", spec())
    with pytest.raises(Conflict, match=r"only workers\.count"):
        await service.put_cluster("demo", spec(masters=5))


async def test_scale_up_and_down(service: ZoneService) -> None:
    await register(service)
    await service.put_cluster("demo", spec(3, 2))
    view, _ = await service.put_cluster("demo", spec(3, 5))
    workers = [n for n in view["status"]["nodes"] if n["role"] == "worker"]
    assert [w["name"] for w in workers] == ["w1", "w2", "w3", "w4", "w5"]
    assert len({w["address"] for w in view["status"]["nodes"]}) == 8
    view, _ = await service.put_cluster("demo", spec(3, 1))
    phases = {n["name"]: n["phase"] for n in view["status"]["nodes"]}
    assert [n for n, p in phases.items() if p == "Deleting"] == ["w2", "w3", "w4", "w5"]


async def test_unplaceable_cluster_is_refused_and_nothing_is_stored(
    service: ZoneService,
) -> None:
    await register(service, memory_mib=1024)
    with pytest.raises(OutOfCapacity, match="memory"):
        await service.put_cluster("big", spec(3, 2, memory_mib=4096))
    with pytest.raises(NotFound):
        service.cluster("big")
    assert service.store.nodes() == []


async def test_no_hosts_says_so(service: ZoneService) -> None:
    with pytest.raises(OutOfCapacity, match="no Ready host"):
        await service.put_cluster("demo", spec(1, 0))


async def test_capacity_counts_nodes_placed_but_not_reported(service: ZoneService) -> None:
    # 2 GiB per host: each 1 GiB node costs 1024 + 208 MiB, so one per host.
    await register(service, hosts=2, memory_mib=2048)
    await service.put_cluster("a", spec(1, 1, memory_mib=1024))
    with pytest.raises(OutOfCapacity):
        await service.put_cluster("b", spec(1, 0, memory_mib=1024))


async def test_bad_names_are_refused(service: ZoneService) -> None:
    await register(service, hosts=1)
    with pytest.raises(Invalid, match="DNS-1123"):
        await service.put_cluster("Bad_Name", spec())
    await service.put_cluster("demo", spec(1, 0))
    with pytest.raises(Invalid, match="not a certificate name"):
        service.check_pki("h1", "demo", "../etc/passwd")


async def test_host_that_stops_reporting_makes_its_nodes_unknown(
    service: ZoneService, clock: Clock
) -> None:
    await register(service)
    await service.put_cluster("demo", spec(3, 0))
    for i in (1, 2, 3):
        host = f"h{i}"
        nodes = [
            {"cluster": "demo", "name": n["name"], "phase": "Ready", "updated_at": "x"}
            for n in service.cluster("demo")["status"]["nodes"]
            if n["host"] == host
        ]
        await service.report(host, report(i, nodes=nodes))
    assert service.cluster("demo")["status"]["phase"] == "Ready"
    await silence(service, clock, 30)  # past heartbeat_timeout_s (20 s) for everyone...
    for i in (1, 2):  # ...but h1 and h2 report again
        await service.report(f"h{i}", service.store.host(f"h{i}").report)  # type: ignore[union-attr]
    status = service.cluster("demo")["status"]
    assert status["phase"] == "Degraded"
    assert "on h3: Unknown (host h3 is not reporting)" in status["message"]
    states = {h["host"]: h["state"] for h in service.hosts_view()}
    assert states == {"h1": "Ready", "h2": "Ready", "h3": "NotReady"}
    assert len(service.store.nodes("demo")) == 3  # nothing deleted


async def test_not_ready_hosts_are_not_offered(service: ZoneService, clock: Clock) -> None:
    await register(service, hosts=1)
    await silence(service, clock, 60)
    await service.report("h2", report(2))
    view, _ = await service.put_cluster("demo", spec(1, 1))
    assert {n["host"] for n in view["status"]["nodes"]} == {"h2"}


async def test_report_contradicting_a_delivery_forgets_it(service: ZoneService) -> None:
    await register(service, hosts=1)
    await service.store.set_delivery("h1", "node", "demo/m1", "abc")
    await service.report(
        "h1",
        report(1, nodes=[{"cluster": "demo", "name": "m1", "phase": "Ready", "spec_hash": "abc"}]),
    )
    assert service.store.deliveries("h1") == {("node", "demo/m1"): "abc"}
    await service.report("h1", report(1))  # the agent lost the node
    assert service.store.deliveries("h1") == {}


async def test_work_has_specs_gateways_and_peers(service: ZoneService) -> None:
    await register(service)
    await service.put_cluster("demo", spec(3, 0))
    nodes = {n.name: n for n in service.store.nodes("demo")}
    host = nodes["m1"].host
    work = service.work(host)
    assert list(work.nodes) == ["demo/m1"]
    m1 = work.nodes["demo/m1"]
    gateway = ipaddress.IPv4Address(m1.network.gateway)
    assert gateway in ipaddress.IPv4Network("10.128.0.0/24")
    assert str(gateway).endswith((".254", ".253", ".252"))
    assert m1.network.vni == 4096
    assert [m.name for m in m1.cluster.masters] == ["m1", "m2", "m3"]
    assert m1.cluster.pod_cidr == "100.64.0.0/20"
    peers = work.peers["demo"]
    assert len(peers) == 2
    assert all(p.address != f"10.250.0.{10 + int(host[1:])}" for p in peers)
    others = {nodes[n].host: n for n in ("m2", "m3")}
    for peer in peers:
        owner = next(h for h in others if peer.address.endswith(f".{10 + int(h[1:])}"))
        assert peer.macs == (mac_address("demo", others[owner]),)
    gateways = {service.work(h).nodes[f"demo/{n}"].network.gateway for h, n in others.items()}
    assert len(gateways | {m1.network.gateway}) == 3  # one per host


async def test_delete_removes_the_cluster_when_every_node_is_gone(
    service: ZoneService,
) -> None:
    await register(service)
    await service.put_cluster("demo", spec(1, 1))
    view = await service.delete_cluster("demo")
    assert view["status"]["phase"] == "Deleting"
    for node in service.store.nodes("demo"):
        assert service.work(node.host).remove == (f"demo/{node.name}",)
        await service.node_gone(node.host, f"demo/{node.name}")
    with pytest.raises(NotFound):
        service.cluster("demo")
    assert not (service.config.state_dir / "pki" / "ca" / "demo").exists()
    view, _ = await service.put_cluster("again", spec(1, 0))
    assert view["status"]["vni"] == 4096  # free again: no host reports it


async def test_pki_only_for_hosts_running_the_cluster(service: ZoneService) -> None:
    await register(service, hosts=4)
    await service.put_cluster("demo", spec(1, 1))
    nodes = {n.name: n.host for n in service.store.nodes("demo")}
    service.check_pki(nodes["m1"], "demo", "apiserver")
    service.check_pki(nodes["w1"], "demo", "kubelet-client")
    if nodes["w1"] != nodes["m1"]:
        with pytest.raises(Forbidden, match="role"):
            service.check_pki(nodes["w1"], "demo", "apiserver")
    idle = next(f"h{i}" for i in range(1, 5) if f"h{i}" not in nodes.values())
    with pytest.raises(Forbidden, match="runs no node"):
        service.check_pki(idle, "demo")


async def test_state_survives_a_restart(
    tmp_path: Path, clock: Clock, zone_stores: StoreFactory
) -> None:
    config = ZoneServerConfig(state_dir=tmp_path)
    store = await zone_stores()
    zone = ZoneService(store, config, LocalBackend(tmp_path / "pki"), clock=clock)
    await register(zone)
    before, _ = await zone.put_cluster("demo", spec())
    await store.close()
    again = ZoneService(await zone_stores(), config, LocalBackend(tmp_path / "pki"), clock=clock)
    assert again.cluster("demo") == before
    assert [h["host"] for h in again.hosts_view()] == ["h1", "h2", "h3"]


def test_pools_must_fit_their_slices() -> None:
    with pytest.raises(ValueError, match="node_pool must be a /24 or larger"):
        ZoneNetworkConfig(node_pool="10.0.0.0/25")


async def test_a_dead_host_can_be_forgotten_once_it_holds_nothing_wanted(
    service: ZoneService, clock: Clock
) -> None:
    await register(service, hosts=2)
    await service.put_cluster("demo", spec(1, 1))
    dead = service.store.nodes("demo")[0].host
    with pytest.raises(Conflict, match="still runs"):
        await service.remove_host(dead)
    await service.delete_cluster("demo")
    alive = next(h for h in ("h1", "h2") if h != dead)
    for node in service.store.nodes("demo"):
        if node.host == alive:
            await service.node_gone(alive, f"demo/{node.name}")
    assert service.cluster("demo")["status"]["phase"] == "Deleting"  # waits for the dead host
    await service.remove_host(dead)
    with pytest.raises(NotFound):
        service.cluster("demo")
    assert [h["host"] for h in service.hosts_view()] == [alive]
    with pytest.raises(NotFound):
        await service.remove_host(dead)


async def test_an_agent_that_lost_its_state_gets_its_peers_again(service: ZoneService) -> None:
    await register(service, hosts=2)
    await service.store.set_delivery("h1", "node", "demo/m1", "abc")
    await service.store.set_delivery("h1", "peers", "demo", "p1")
    await service.store.set_delivery("h1", "peers", "other", "p2")
    await service.report("h1", report(1))  # no nodes at all: the agent's store is gone
    assert service.store.deliveries("h1") == {("peers", "other"): "p2"}


async def test_an_older_zones_plain_http_agent_is_readable_but_gets_no_token(
    service: ZoneService,
) -> None:
    """A report stored before plain http off loopback was refused: the zone still reads it
    (hosts, placement) but never sends the agent's token to that URL."""
    await register(service, hosts=2)
    plain = report(1).model_copy(update={"api_url": "http://10.250.0.11:8470"})
    await service.store.put_host("h1", plain, service.clock())
    assert [h["host"] for h in service.hosts_view()] == ["h1", "h2"]
    assert service.api_of("h1") is None
    assert service.api_of("h2") == ("https://10.250.0.12:8470", "token-2")


class Gate:
    """Holds one PKI backend call (run in a thread) at its start until released: the
    failure injection for an await that another request overtakes."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any) -> Any:
        self.entered.set()
        assert self.release.wait(10), "the test never released the gate"
        return self.real(*args)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the call was never made"


async def test_a_host_removed_while_the_cas_are_made_gets_no_node(
    service: ZoneService, mocker: MockerFixture
) -> None:
    await register(service)
    gate = Gate(service.pki.ensure_cluster)
    mocker.patch.object(service.pki, "ensure_cluster", gate)
    create = asyncio.create_task(service.put_cluster("demo", spec(1, 0)))
    await gate.reached()
    await service.remove_host("h1")  # holds nothing yet: it may go
    await service.remove_host("h2")
    gate.release.set()
    await create
    assert [n.host for n in service.store.nodes("demo")] == ["h3"]


async def test_a_cluster_made_again_keeps_its_cas_while_the_old_one_is_revoked(
    service: ZoneService, mocker: MockerFixture
) -> None:
    await register(service)
    await service.put_cluster("demo", spec(1, 0))
    await service.delete_cluster("demo")
    gate = Gate(service.pki.revoke_cluster)
    mocker.patch.object(service.pki, "revoke_cluster", gate)
    (node,) = service.store.nodes("demo")
    gone = asyncio.create_task(service.node_gone(node.host, f"demo/{node.name}"))
    await gate.reached()
    again = asyncio.create_task(service.put_cluster("demo", spec(1, 0)))
    await asyncio.sleep(0.1)  # time enough to run ahead of the revoke, were it not held
    gate.release.set()
    await gone
    _, created = await again
    assert created
    assert set(service.pki.ca_certificates("demo")) == {"kubernetes", "etcd", "front-proxy"}


async def test_a_deletion_a_restart_interrupted_is_finished(service: ZoneService) -> None:
    await register(service)
    await service.put_cluster("demo", spec(1, 0))
    await service.delete_cluster("demo")
    (node,) = service.store.nodes("demo")
    await service.store.remove_node("demo", node.name)  # the zone stopped before the revoke
    await service.finish_deletions()
    with pytest.raises(NotFound):
        service.cluster("demo")
    assert not (service.config.state_dir / "pki" / "ca" / "demo").exists()


async def test_a_host_removed_between_placement_and_its_write_is_placed_around(
    service: ZoneService, mocker: MockerFixture
) -> None:
    await register(service)
    real = service.store.create_cluster

    async def host_leaves_first(*args: Any) -> None:
        if service.store.host("h1") is not None:
            await service.remove_host("h1")  # another request's write commits first
        await real(*args)

    mocker.patch.object(service.store, "create_cluster", side_effect=host_leaves_first)
    await service.put_cluster("demo", spec(1, 0))
    assert service.store.host("h1") is None
    assert [n.host for n in service.store.nodes("demo")] == ["h2"]


async def test_a_host_that_got_a_node_after_its_removal_was_checked_stays(
    service: ZoneService, mocker: MockerFixture
) -> None:
    await register(service, hosts=1)
    real = service.store.remove_host

    async def a_cluster_lands_first(host: str) -> Any:
        await service.put_cluster("demo", spec(1, 0))  # placed on h1, the only host
        return await real(host)

    mocker.patch.object(service.store, "remove_host", side_effect=a_cluster_lands_first)
    with pytest.raises(Conflict, match="still runs demo/m1"):
        await service.remove_host("h1")
    assert service.store.host("h1") is not None
    assert [n.host for n in service.store.nodes("demo")] == ["h1"]


async def test_a_delivery_round_validates_each_report_once_not_once_per_host(
    service: ZoneService, mocker: MockerFixture
) -> None:
    """A pass reads its own host's clusters and their hosts only: a round over every host
    validates each report at most once (it used to validate every report in every pass,
    hosts squared per round: 1,800 here)."""
    hosts = 30
    await register(service, hosts=hosts)
    for i in range(10):
        await service.put_cluster(f"c{i}", spec(3, 2))
    beats = [
        report(i, allocated={"vcpus": 1, "memory_mib": 1, "disk_gib": 1}) for i in range(1, 31)
    ]
    for i, beat in enumerate(beats, start=1):  # every report changes: each is parsed anew
        await service.report(f"h{i}", beat)
    validations = mocker.spy(HostReport, "model_validate")
    for _ in range(2):
        for i in range(1, hosts + 1):
            work = service.work(f"h{i}")
            assert service.api_of(f"h{i}") is not None
            service.store.deliveries(f"h{i}")
            assert all(spec.network.vni >= 4096 for spec in work.nodes.values())
    assert 0 < validations.call_count <= hosts
