"""The zone on etcd, against real members: two zones allocating at once never share a VNI
or a range, a store that goes away is a 503 with nothing half-written and comes back by
itself, and a call moves on from a dead endpoint to a live one. (The store's contract,
the same cases as SQLite, runs in tests/unit through the zone_stores fixture.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostagent.errors import StoreUnavailable
from hostagent.zone.api import zone_app
from hostagent.zone.auth import host_token
from hostagent.zone.config import ControlCaConfig, ZoneServerConfig, load_zone_config
from hostagent.zone.controlplane import ControlPlane
from hostagent.zone.etcd import Delete, Put
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.model import ClusterSpec, HostReport
from hostagent.zone.server import Zone
from hostagent.zone.service import ZoneService
from hostagent.zone.store import Stale
from hostagent.zone.stores import make_store
from pki import keys, servicecerts
from pki.local import LocalBackend
from tests import etcd
from tests.conftest import etcd_client, require
from tests.etcd import Member, etcd_binary
from tests.fakezone import free_port

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer admin-token"}
SECRET = "host-secret"
CLUSTER: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "masters": {"count": 1, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}


def report(i: int) -> dict[str, Any]:
    return {
        "api_url": f"https://10.250.0.{10 + i}:8470",
        "api_token": f"agent-{i}",
        "underlay_address": f"10.250.0.{10 + i}",
        "allocatable": {"vcpus": 256, "memory_mib": 1_000_000, "disk_gib": 10_000},
        "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
    }


async def until(check: Callable[[], Any], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check() if asyncio.iscoroutinefunction(check) else not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def member() -> Iterator[Member]:
    """A member of the test's own: these tests stop it."""
    require(etcd_binary() is not None, "needs etcd (Debian's etcd-server: scripts/setup-host.sh)")
    with etcd.start() as started:
        yield started


@pytest.fixture
async def zones(tmp_path: Path, etcd_member: Member) -> AsyncIterator[list[ZoneService]]:
    """Two zones on one etcd and one key prefix, as two replicas would be."""
    prefix = f"/test/{uuid.uuid4().hex}/"
    stores = [EtcdZoneStore(etcd_client(etcd_member.endpoint), prefix) for _ in range(2)]
    services = []
    for store in stores:
        await store.start()
        config = ZoneServerConfig(state_dir=tmp_path)
        services.append(ZoneService(store, config, LocalBackend(tmp_path / "pki")))
    yield services
    for store in stores:
        await store.close()
    cleanup = etcd_client(etcd_member.endpoint)
    await cleanup.txn([], [Delete(prefix, prefix=True)])
    await cleanup.close()


async def test_two_zones_creating_20_clusters_at_once_share_no_vni_or_range(
    zones: list[ZoneService],
) -> None:
    first, second = zones
    for i in (1, 2, 3):
        await first.report(f"h{i}", HostReport.model_validate(report(i)))
    await until(lambda: len(second.store.hosts()) == 3)
    spec = ClusterSpec.model_validate(CLUSTER)
    names = [f"c{i}" for i in range(20)]
    results = await asyncio.gather(
        *(zones[i % 2].put_cluster(name, spec) for i, name in enumerate(names))
    )
    assert all(created for _, created in results)
    await until(lambda: len(first.store.clusters()) == 20 == len(second.store.clusters()))
    for service in zones:
        clusters = service.store.clusters()
        assert sorted(c.name for c in clusters) == sorted(names)
        for field in ("vni", "node_subnet", "pod_cidr", "service_cidr"):
            values = [getattr(c, field) for c in clusters]
            assert len(set(values)) == 20, (field, values)
    assert first.store.clusters() == second.store.clusters()
    # The allocation keys are exactly the clusters' allocations, none left by a lost race.
    store = first.store
    assert isinstance(store, EtcdZoneStore)
    _, kvs = await store.etcd.list_prefix(store.layout.prefix + "alloc/")
    held = {kv.key: kv.value.decode() for kv in kvs}
    wanted = {key: c.name for c in clusters for key in store.layout.allocations(c)}
    assert held == wanted


async def test_etcd_down_is_a_503_with_nothing_half_written_and_back_by_itself(
    tmp_path: Path, member: Member
) -> None:
    prefix = "/zone-down/"
    store = EtcdZoneStore(etcd_client(member.endpoint, request_timeout_s=1.0), prefix)
    await store.start()
    config = ZoneServerConfig(state_dir=tmp_path)
    service = ZoneService(store, config, LocalBackend(tmp_path / "pki"))
    app = zone_app(
        service,
        "admin-token",
        SECRET,
        metrics_text=lambda: b"",
        heartbeat_s=5.0,
        control=ControlPlane(ControlCaConfig(), tmp_path),
        zone_view=dict,
    )
    try:
        async with TestClient(TestServer(app)) as client:
            host = {"Authorization": f"Bearer {host_token(SECRET, 'h1')}"}
            assert (await client.put("/v1/hosts/h1", json=report(1), headers=host)).status == 201
            assert (await client.put("/v1/clusters/a", json=CLUSTER, headers=ADMIN)).status == 201
            _, before = await store.etcd.list_prefix(prefix)

            member.kill()
            response = await client.put("/v1/clusters/b", json=CLUSTER, headers=ADMIN)
            assert response.status == 503, await response.text()
            error = (await response.json())["error"]
            assert error["code"] == "store_unavailable"
            assert "etcd" in error["message"]
            listing = await client.get("/v1/clusters", headers=ADMIN)
            assert listing.status == 503
            beat = await client.put("/v1/hosts/h1", json=report(1), headers=host)
            assert beat.status == 503

            member.start()

            async def serving() -> bool:
                return (await client.get("/v1/clusters", headers=ADMIN)).status == 200

            await until(serving)
            _, after = await store.etcd.list_prefix(prefix)
            assert [(kv.key, kv.value) for kv in after] == [(kv.key, kv.value) for kv in before]
            assert [c.name for c in store.clusters()] == ["a"]
            response = await client.put("/v1/clusters/b", json=CLUSTER, headers=ADMIN)
            assert response.status == 201, await response.text()
            assert (await response.json())["status"]["vni"] == 4097
            assert (await client.put("/v1/hosts/h1", json=report(1), headers=host)).status == 200
    finally:
        await store.close()


async def test_a_store_that_cannot_reach_etcd_at_start_says_so(member: Member) -> None:
    member.kill()
    store = EtcdZoneStore(etcd_client(member.endpoint, request_timeout_s=1.0), "/x/")
    try:
        with pytest.raises(StoreUnavailable, match=member.endpoint):
            await store.start()
    finally:
        await store.close()


async def test_a_call_moves_on_from_a_dead_endpoint(etcd_member: Member) -> None:
    dead = etcd.Member(Path("/nonexistent"), free_port(), free_port()).endpoint
    client = etcd_client(dead, etcd_member.endpoint, request_timeout_s=10.0)
    try:
        revision, _ = await client.list_prefix(f"/test/{uuid.uuid4().hex}/")
        assert revision > 0
        assert client.endpoint == etcd_member.endpoint
    finally:
        await client.close()


async def test_the_second_of_two_stores_taking_the_same_vni_is_stale_and_writes_nothing(
    zones: list[ZoneService],
) -> None:
    first, second = zones
    await first.report("h1", HostReport.model_validate(report(1)))
    await until(lambda: second.store.host("h1") is not None)
    spec = ClusterSpec.model_validate(CLUSTER)
    # Both decide on the same state: the same VNI and ranges, for two names.
    plans = [service._plan(name, spec) for service, name in zip(zones, ("a", "b"), strict=True)]
    assert plans[0][0].vni == plans[1][0].vni
    await first.store.create_cluster(*plans[0])
    with pytest.raises(Stale):
        await second.store.create_cluster(*plans[1])
    assert [c.name for c in second.store.clusters()] == ["a"]
    assert [n.cluster for n in second.store.nodes()] == ["a"]
    # Deciding again on what it now sees, the second gets the next VNI.
    view, created = await second.put_cluster("b", spec)
    assert created
    assert view["status"]["vni"] == plans[0][0].vni + 1


def issue(ca_dir: Path, name: str, out: Path) -> tuple[Path, Path]:
    """A certificate for name (and 127.0.0.1) usable by a server and a client, signed by
    the CA in ca_dir (made on first use)."""
    ca_cert_path, ca_key_path = servicecerts.ensure_ca(ca_dir)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = keys.generate_key(keys.KeyType.ECDSA)
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(name)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(keys.load_private_key(ca_key_path.read_text()), hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.key").write_text(keys.private_pem(key))
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.crt", out / f"{name}.key"


async def test_etcd_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """As operators run etcd: https, and only clients with a certificate of its CA."""
    require(etcd_binary() is not None, "needs etcd (Debian's etcd-server: scripts/setup-host.sh)")
    ca_dir = tmp_path / "ca"
    server_cert, server_key = issue(ca_dir, "etcd", tmp_path / "certs")
    client_cert, client_key = issue(ca_dir, "zone", tmp_path / "certs")
    ca = ca_dir / "ca.crt"
    tls = etcd.ServerTls(ca, server_cert, server_key, client_cert, client_key)
    with etcd.start(tls=tls) as member:
        assert member.endpoint.startswith("https://")
        text = (
            f'state_dir = "{tmp_path}"\n[store]\nbackend = "etcd"\n'
            f'endpoints = ["{member.endpoint}"]\nca_file = "{ca}"\n'
            f'cert_file = "{client_cert}"\nkey_file = "{client_key}"\nrequest_timeout_s = 2.0\n'
        )
        (tmp_path / "zone.toml").write_text(text)
        config = load_zone_config(tmp_path / "zone.toml")
        store = make_store(config)
        await store.start()
        try:
            service = ZoneService(store, config, LocalBackend(tmp_path / "pki"))
            await service.report("h1", HostReport.model_validate(report(1)))
            view, created = await service.put_cluster("demo", ClusterSpec.model_validate(CLUSTER))
            assert created and view["status"]["vni"] == 4096
        finally:
            await store.close()
        # Without a client certificate etcd refuses the zone: a clear 503, not a hang.
        anonymous = config.store.model_copy(update={"cert_file": None, "key_file": None})
        store = make_store(config.model_copy(update={"store": anonymous}))
        try:
            with pytest.raises(StoreUnavailable, match="etcd"):
                await store.start()
        finally:
            await store.close()


async def test_a_cluster_too_large_for_etcds_transactions_is_refused_naming_the_flag(
    tmp_path: Path,
) -> None:
    """etcd's default --max-txn-ops (128) cannot hold a 98-node cluster's transaction: the
    zone answers 503 naming the flag, writes nothing, and the same cluster fits a member
    run as docs/zone.md asks."""
    require(etcd_binary() is not None, "needs etcd (Debian's etcd-server: scripts/setup-host.sh)")
    big = {**CLUSTER, "workers": {"count": 97, "vcpus": 1, "memory_mib": 256, "disk_gib": 1}}
    spec = ClusterSpec.model_validate(big)
    for max_txn_ops, fits in ((128, False), (2048, True)):
        with etcd.start(max_txn_ops=max_txn_ops) as member:
            store = EtcdZoneStore(etcd_client(member.endpoint), "/big/")
            await store.start()
            try:
                config = ZoneServerConfig(state_dir=tmp_path)
                service = ZoneService(store, config, LocalBackend(tmp_path / "pki"))
                for i in range(1, 41):
                    await service.report(f"h{i}", HostReport.model_validate(report(i)))
                if fits:
                    view, _ = await service.put_cluster("big", spec)
                    assert len(view["status"]["nodes"]) == 98
                    continue
                with pytest.raises(StoreUnavailable, match="--max-txn-ops"):
                    await service.put_cluster("big", spec)
                _, kvs = await store.etcd.list_prefix("/big/")
                assert all("/hosts/" in kv.key for kv in kvs), [kv.key for kv in kvs]
            finally:
                await store.close()


async def test_the_zone_serves_from_etcd_and_stops(tmp_path: Path, etcd_member: Member) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    text = (
        f'state_dir = "{tmp_path}"\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[store]\nbackend = "etcd"\nendpoints = ["{etcd_member.endpoint}"]\n'
        f'prefix = "{prefix}"\n'
    )
    (tmp_path / "zone.toml").write_text(text)
    zone = Zone(load_zone_config(tmp_path / "zone.toml"))
    await zone.start()
    try:
        await zone.service.report("h1", HostReport.model_validate(report(1)))
        await zone.service.put_cluster("demo", ClusterSpec.model_validate(CLUSTER))
        assert b'hostagent_zone_clusters{phase="Provisioning"} 1.0' in zone.metrics.render()
    finally:
        await zone.stop()
    assert not (tmp_path / "zone.db").exists()
    client = etcd_client(etcd_member.endpoint)
    try:
        _, kvs = await client.list_prefix(prefix)
        assert f"{prefix}clusters/demo" in {kv.key for kv in kvs}
        await client.txn([], [Delete(prefix, prefix=True)])
    finally:
        await client.close()


async def test_a_watch_behind_a_compaction_lists_again(
    tmp_path: Path, etcd_member: Member, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror follows from the last revision it saw; once etcd has compacted past it,
    the store lists its keys again and serves on."""
    require(shutil.which("etcdctl") is not None, "needs etcdctl (Debian's etcd-client)")
    caplog.set_level(logging.INFO, logger="hostagent.zone.etcdstore")
    prefix, elsewhere = f"/test/{uuid.uuid4().hex}/", f"/test/{uuid.uuid4().hex}/"
    store = EtcdZoneStore(etcd_client(etcd_member.endpoint), prefix)
    other = etcd_client(etcd_member.endpoint)
    await store.start()
    try:
        service = ZoneService(store, ZoneServerConfig(state_dir=tmp_path), LocalBackend(tmp_path))
        await service.report("h1", HostReport.model_validate(report(1)))
        seen = store.mirror.revision
        for i in range(3):  # the revision moves on past what the zone's prefix saw
            result = await other.txn([], [Put(f"{elsewhere}{i}", b"x")])
        subprocess.run(
            ["etcdctl", f"--endpoints={etcd_member.endpoint}", "compact", str(result.revision)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        assert result.revision > seen + 1
        await store.etcd.close()  # the connection drops: the watch resumes from seen + 1
        await until(lambda: "listing the zone's keys again" in caplog.text)
        await service.report("h2", HostReport.model_validate(report(2)))
        assert [h.id for h in store.hosts()] == ["h1", "h2"]
    finally:
        await store.close()
        await other.txn([], [Delete(prefix, prefix=True), Delete(elsewhere, prefix=True)])
        await other.close()


async def test_an_unreadable_record_is_a_503_naming_it_until_it_is_fixed(
    tmp_path: Path, etcd_member: Member, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    store = EtcdZoneStore(etcd_client(etcd_member.endpoint), prefix)
    other = etcd_client(etcd_member.endpoint)
    await store.start()
    try:
        service = ZoneService(store, ZoneServerConfig(state_dir=tmp_path), LocalBackend(tmp_path))
        await service.report("h1", HostReport.model_validate(report(1)))
        bad = f"{prefix}clusters/broken"
        await other.txn([], [Put(bad, b"{not json")])

        def refused() -> bool:
            try:
                store.hosts()
            except StoreUnavailable:
                return True
            return False

        await until(refused)
        assert f"etcd key {bad}" in caplog.text
        await other.txn([], [Delete(bad)])
        await until(lambda: not refused())
        assert [h.id for h in store.hosts()] == ["h1"]
        assert store.cluster("broken") is None
    finally:
        await store.close()
        await other.txn([], [Delete(prefix, prefix=True)])
        await other.close()


async def test_forgetting_a_delivery_never_made_returns_at_once(etcd_member: Member) -> None:
    """Deleting an absent key makes no revision: the write must not wait for one (the
    etcd's latest revision being another prefix's write)."""
    prefix, elsewhere = f"/test/{uuid.uuid4().hex}/", f"/test/{uuid.uuid4().hex}"
    store = EtcdZoneStore(etcd_client(etcd_member.endpoint), prefix)
    other = etcd_client(etcd_member.endpoint)
    await store.start()
    try:
        await other.txn([], [Put(elsewhere, b"x")])
        async with asyncio.timeout(2.0):  # the store's own wait would be 10 s
            await store.set_delivery("h1", "node", "demo/m1", None)
        await store.set_delivery("h1", "node", "demo/m1", "abc")
        assert store.deliveries("h1") == {("node", "demo/m1"): "abc"}
    finally:
        await store.close()
        await other.txn([], [Delete(prefix, prefix=True), Delete(elsewhere)])
        await other.close()
