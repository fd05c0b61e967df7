"""The cluster's VIP in the zone: allocated at the fixed .5 of its node subnet, stored with
the cluster in both stores, the cluster's api_endpoint, and sent to the agents in every
node's spec with the masters and the etcd mode. A cluster made before VIPs keeps its
first master's endpoint."""

from __future__ import annotations

import ipaddress
import sqlite3
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from hostagent.model import EtcdMode, Role
from hostagent.zone import alloc
from hostagent.zone.desired import api_endpoint, node_spec
from hostagent.zone.model import ClusterSpec
from hostagent.zone.service import ZoneService
from hostagent.zone.store import ClusterRecord, Gateway, NodeRecord, SqliteZoneStore
from tests.conftest import StoreFactory
from tests.unit.test_zone_service import register, report

SUBNET = "10.128.3.0/24"


def cluster_spec(**extra: object) -> ClusterSpec:
    pool = {"vcpus": 1, "memory_mib": 512, "disk_gib": 2}
    return ClusterSpec.model_validate(
        {"kubernetes_version": "1.31.2", "masters": {"count": 3, **pool}, **extra}
    )


def record(vip: str | None) -> ClusterRecord:
    return ClusterRecord(
        "demo", cluster_spec(), 4242, SUBNET, "100.64.0.0/20", "10.96.0.0/24", "t", vip=vip
    )


def nodes() -> list[NodeRecord]:
    return [
        NodeRecord("demo", f"m{i}", Role.MASTER, f"h{i}", f"10.128.3.{9 + i}", "t")
        for i in (1, 2, 3)
    ] + [NodeRecord("demo", "w1", Role.WORKER, "h1", "10.128.3.13", "t")]


@given(
    st.integers(0, 255),
    st.integers(0, 200),
    st.integers(0, 40),
)
def test_the_vip_never_collides_with_nodes_or_gateways(third: int, count: int, hosts: int) -> None:
    subnet = f"10.{third}.7.0/24"
    vip = alloc.vip_address(subnet)
    assert vip == f"10.{third}.7.5"
    assert ipaddress.ip_address(vip) in ipaddress.ip_network(subnet)
    taken: set[str] = set()
    for _ in range(count):
        taken.add(alloc.node_address(subnet, taken))
    gateways: set[str] = set()
    for _ in range(min(hosts, 244 - count)):
        gateways.add(alloc.gateway_address(subnet, gateways, taken))
    assert vip not in taken | gateways


def test_the_vip_is_the_endpoint_of_a_cluster_that_has_one() -> None:
    assert api_endpoint(nodes(), "10.128.3.5") == "10.128.3.5:6443"
    assert api_endpoint(nodes()) == "10.128.3.10:6443"  # a cluster made before VIPs
    assert api_endpoint([], None) is None


def test_every_node_spec_carries_the_vip_masters_and_etcd_mode() -> None:
    cluster = ClusterRecord(
        "demo",
        cluster_spec(etcd_mode="systemd"),
        4242,
        SUBNET,
        "100.64.0.0/20",
        "10.96.0.0/24",
        "t",
        vip="10.128.3.5",
    )
    for node in nodes():
        spec = node_spec(cluster, node, "10.128.3.254", nodes(), 1450).cluster
        assert spec.vip == "10.128.3.5"
        assert spec.api_endpoint == "10.128.3.5:6443"
        assert spec.etcd_mode is EtcdMode.SYSTEMD
        assert [(m.name, m.address) for m in spec.masters] == [
            ("m1", "10.128.3.10"),
            ("m2", "10.128.3.11"),
            ("m3", "10.128.3.12"),
        ]
    old = node_spec(record(None), nodes()[0], "10.128.3.254", nodes(), 1450)
    assert (old.cluster.vip, old.cluster.api_endpoint) == (None, "10.128.3.10:6443")
    assert old.cluster.etcd_mode is EtcdMode.STATIC_POD
    # An old cluster's specs hash as before: the new fields are at their defaults.
    assert "vip" not in old.model_dump(exclude_defaults=True)["cluster"]


async def test_both_stores_keep_the_vip_or_its_absence(zone_stores: StoreFactory) -> None:
    store = await zone_stores()
    await store.put_host("h1", report(1), 0.0)
    with_vip = record("10.128.3.5")
    without = ClusterRecord(
        "old", cluster_spec(), 4243, "10.128.4.0/24", "100.64.16.0/20", "10.96.1.0/24", "t"
    )
    node = NodeRecord("demo", "m1", Role.MASTER, "h1", "10.128.3.10", "t")
    await store.create_cluster(with_vip, [node], [Gateway("demo", "h1", "10.128.3.254")])
    await store.create_cluster(without, [], [])
    again = await zone_stores()  # a restarted zone reads what was written
    for opened in (store, again):
        assert opened.cluster("demo") == with_vip
        assert opened.cluster("old") == without
        assert {c.name: c.vip for c in opened.clusters()} == {"demo": "10.128.3.5", "old": None}


async def test_a_new_cluster_gets_its_vip_and_keeps_it(
    tmp_path: Path, zone_stores: StoreFactory
) -> None:
    from hostagent.zone.config import ZoneServerConfig
    from pki.local import LocalBackend

    zone = ZoneService(
        await zone_stores(), ZoneServerConfig(state_dir=tmp_path), LocalBackend(tmp_path / "pki")
    )
    await register(zone)
    view, _ = await zone.put_cluster("demo", cluster_spec(etcd_mode="systemd"))
    assert view["status"]["vip"] == "10.128.0.5"
    assert view["status"]["api_endpoint"] == "10.128.0.5:6443"
    assert view["spec"]["etcd_mode"] == "systemd"
    specs = [s for h in ("h1", "h2", "h3") for s in zone.work(h).nodes.values()]
    assert len(specs) == 3
    assert {(s.cluster.vip, s.cluster.etcd_mode) for s in specs} == {("10.128.0.5", "systemd")}
    same, created = await zone.put_cluster("demo", cluster_spec(etcd_mode="systemd"))
    assert not created and same["status"]["vip"] == "10.128.0.5"


def test_a_zone_db_from_before_vips_opens_with_no_vip(tmp_path: Path) -> None:
    path = tmp_path / "zone.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE clusters (name TEXT PRIMARY KEY, spec TEXT NOT NULL, vni INTEGER NOT "
            "NULL UNIQUE, node_subnet TEXT NOT NULL UNIQUE, pod_cidr TEXT NOT NULL UNIQUE, "
            "service_cidr TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, deleting INTEGER NOT "
            "NULL DEFAULT 0)"
        )
        db.execute(
            "INSERT INTO clusters VALUES ('old', ?, 4242, ?, '100.64.0.0/20', '10.96.0.0/24', "
            "'t', 0)",
            (cluster_spec().model_dump_json(), SUBNET),
        )
    db.close()
    for _ in range(2):  # the column is added once; opening again changes nothing
        store = SqliteZoneStore(path)
        [old] = store.clusters()
        assert (old.name, old.vip) == ("old", None)
        store.db.close()
