"""pki.zone.ZoneBackend against FakeZone (tests/fakezone.py), an in-process stand-in for the
zone's PKI endpoints that signs with a real local CA: a whole node provisioned through
it, each call, and the mapping of the zone's errors to pki.errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hostagent.config import Config, PkiConfig, ZoneConfig
from pki import files, keys
from pki.certset import CaName, NodeIdentity, requests_for
from pki.errors import BackendRefused, BackendUnavailable, PkiError
from pki.local import LocalBackend
from pki.provision import provision_node
from pki.zone import ZoneBackend, ZoneSettings
from tests.fakezone import FakeZone, serve_tls, tls_files

TOKEN = "host-token-h1"
MASTER = NodeIdentity("demo", "m1", "master", "10.128.0.10")


@pytest.fixture
def zone(tmp_path: Path) -> FakeZone:
    zone = FakeZone({"h1": TOKEN}, pki=LocalBackend(tmp_path / "zone"))
    zone.add_cluster("demo")
    return zone


@pytest.fixture
async def backend(zone: FakeZone) -> AsyncIterator[ZoneBackend]:
    async with TestServer(zone.app()) as server:
        url = str(server.make_url("")).rstrip("/")
        yield ZoneBackend(ZoneSettings(url=url, token=TOKEN, timeout=5.0))


async def call(function: object, *args: object) -> object:
    """Backends are synchronous; the stand-in serves on this loop, so call from a thread."""
    assert callable(function)
    return await asyncio.to_thread(function, *args)


def csr_for(
    name: str, node: NodeIdentity = MASTER, ttl: dt.timedelta = dt.timedelta(days=90)
) -> tuple[object, str]:
    request = next(r for r in requests_for(node, ttl=ttl) if r.name == name)
    return request, keys.build_csr(keys.generate_key(keys.KeyType.ECDSA), request)


async def test_a_master_is_provisioned_through_the_zone(
    backend: ZoneBackend, zone: FakeZone, tmp_path: Path
) -> None:
    directory = tmp_path / "node" / "pki"
    directory.mkdir(parents=True)  # the provisioner makes it, owned by QEMU's user
    expiries = await provision_node(backend, MASTER, directory, uid=os.getuid(), gid=os.getgid())
    assert {r.name for r in requests_for(MASTER)} <= set(expiries)
    assert zone.pki is not None
    zone_ca = zone.pki.ca_certificates("demo")
    for ca, cert in ((CaName.KUBERNETES, "apiserver"), (CaName.ETCD, "etcd/server")):
        issuer = x509.load_pem_x509_certificate(zone_ca[ca].encode())
        leaf = x509.load_pem_x509_certificate((directory / f"{cert}.crt").read_bytes())
        leaf.verify_directly_issued_by(issuer)  # signed by the zone's CA, not a local one
    assert (directory / "ca.crt").read_text() == zone_ca[CaName.KUBERNETES]
    assert (directory / "sa.key").read_text() == zone.pki.service_account_key("demo")[0]
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for h in zone.headers)
    assert files.read_expiries(directory) == expiries


async def test_ca_certificates_and_ensure_cluster(backend: ZoneBackend, zone: FakeZone) -> None:
    await call(backend.ensure_cluster, "demo")
    cas = await call(backend.ca_certificates, "demo")
    assert zone.pki is not None
    assert cas == zone.pki.ca_certificates("demo")
    with pytest.raises(PkiError, match="404"):
        await call(backend.ensure_cluster, "other")


async def test_sign_returns_the_cert_and_its_ca(backend: ZoneBackend, zone: FakeZone) -> None:
    request, csr = csr_for("kubelet-client", ttl=dt.timedelta(days=10))
    issued = await call(backend.issue, "demo", request, csr)
    lifetime = issued.not_after - issued.not_before  # type: ignore[attr-defined]
    assert (
        dt.timedelta(days=9) < lifetime < dt.timedelta(days=11)
    )  # [pki] ttl_days reaches the zone
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())  # type: ignore[attr-defined]
    assert cert.subject.rfc4514_string() == "O=system:nodes,CN=system:node:m1"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert zone.pki is not None
    assert issued.ca_pem == zone.pki.ca_certificates("demo")[CaName.KUBERNETES]  # type: ignore[attr-defined]


async def test_service_account_key_is_the_zones(backend: ZoneBackend, zone: FakeZone) -> None:
    pair = await call(backend.service_account_key, "demo")
    assert zone.pki is not None
    assert pair == zone.pki.service_account_key("demo")


async def test_a_csr_outside_the_role_is_refused(backend: ZoneBackend) -> None:
    other = NodeIdentity("demo", "m2", "master", "10.128.0.11")
    request, _ = csr_for("kubelet-client")
    _, foreign = csr_for("admin", other)  # CN kubernetes-admin under the kubelet role
    with pytest.raises(BackendRefused, match="422"):
        await call(backend.issue, "demo", request, foreign)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_a_zone_that_cannot_serve_is_unavailable(
    backend: ZoneBackend, zone: FakeZone, status: int
) -> None:
    zone.failures = [status]
    request, csr = csr_for("kube-proxy")
    with pytest.raises(BackendUnavailable, match=str(status)):
        await call(backend.issue, "demo", request, csr)
    issued = await call(backend.issue, "demo", request, csr)  # and works once it can
    assert issued is not None


async def test_an_unreachable_zone_is_unavailable(tmp_path: Path) -> None:
    backend = ZoneBackend(ZoneSettings(url="http://127.0.0.1:9", token=TOKEN, timeout=2.0))
    with pytest.raises(BackendUnavailable, match="not reachable"):
        await call(backend.ca_certificates, "demo")


async def test_tls_failure_is_unavailable_and_names_the_ca_file(
    zone: FakeZone, tmp_path: Path
) -> None:
    ca_file, context = tls_files(tmp_path)
    runner, url = await serve_tls(zone.app(), context)
    try:
        trusting = ZoneBackend(ZoneSettings(url=url, token=TOKEN, ca_file=ca_file))
        assert await call(trusting.ca_certificates, "demo")
        system = ZoneBackend(ZoneSettings(url=url, token=TOKEN))
        with pytest.raises(BackendUnavailable, match="TLS verification failed"):
            await call(system.ca_certificates, "demo")
    finally:
        await runner.cleanup()


async def test_a_wrong_token_is_refused(backend: ZoneBackend) -> None:
    other = ZoneBackend(ZoneSettings(url=backend.settings.url, token="wrong"))
    with pytest.raises(BackendRefused, match="401"):
        await call(other.ca_certificates, "demo")


async def test_a_cluster_not_on_this_host_is_refused(backend: ZoneBackend, zone: FakeZone) -> None:
    zone.failures = [403]  # the zone's answer for a cluster with no node on this host
    with pytest.raises(BackendRefused, match="403"):
        await call(backend.ca_certificates, "demo")


async def test_revoke_cluster_is_left_to_the_zone(backend: ZoneBackend, zone: FakeZone) -> None:
    requests_before = len(zone.headers)
    await call(backend.revoke_cluster, "demo")
    assert len(zone.headers) == requests_before  # not even a call
    assert await call(backend.ca_certificates, "demo")
    assert backend.maintain() == float("inf")


def test_a_bad_cluster_name_never_reaches_a_url() -> None:
    backend = ZoneBackend(ZoneSettings(url="http://127.0.0.1:9", token=TOKEN))
    with pytest.raises(ValueError, match="DNS-1123"):
        backend.ca_certificates("../hosts")


def test_the_token_is_not_in_the_repr() -> None:
    assert TOKEN not in repr(ZoneSettings(url="http://127.0.0.1:9", token=TOKEN))


def test_make_backend_picks_the_zone(tmp_path: Path) -> None:
    from hostagent.certificates import make_backend

    token = tmp_path / "zone-token"
    token.write_text(TOKEN + "\n")
    config = Config(
        state_dir=tmp_path,
        pki=PkiConfig(backend="zone"),
        zone=ZoneConfig(url="https://10.250.0.1:8471", token_file=token, ca_file=tmp_path / "c"),
    )
    backend = make_backend(config)
    assert isinstance(backend, ZoneBackend)
    assert backend.settings.token == TOKEN
    assert backend.settings.ca_file == tmp_path / "c"
    assert backend.description == "zone at https://10.250.0.1:8471"
