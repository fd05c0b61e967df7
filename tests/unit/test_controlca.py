"""The control-plane CA's pure parts (pki/controlca.py), the zone's CA files
(hostagent/zone/controlplane.py) and the one-time host token generations in the store."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import ssl
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from common import http
from hostagent.errors import ConfigError
from hostagent.zone.config import ControlCaConfig, ZoneServerConfig, load_zone_config
from hostagent.zone.controlplane import ControlPlane
from hostagent.zone.store import HostCertificate, SqliteZoneStore, Stale
from hostagent.zone.tokens import next_host_token
from pki import controlca
from pki.servicecerts import issue_server_cert
from tests.conftest import StoreFactory
from tests.fakezone import free_port
from tests.unit.test_zone_service import report

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> tuple[str, str]:
    return controlca.make_ca()


def _names(cert_pem: str) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    common = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return common, sans.get_values_for_type(x509.UniformResourceIdentifier)


def test_a_host_certificate_names_the_host_whatever_the_csr_asks(ca: tuple[str, str]) -> None:
    key_pem, csr_pem = controlca.host_csr("someone-else")
    issued = controlca.sign_host(*ca, csr_pem, "h1", DAY)
    assert _names(issued.cert_pem) == (["h1"], ["urn:hostagent:host:h1"])
    assert issued.ca_pem == ca[0]
    assert issued.not_after - issued.not_before == DAY + controlca.BACKDATE
    pem = key_pem + issued.cert_pem
    assert controlca.usable(pem, pem, ca[0], "h1", dt.datetime.now(dt.UTC))
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_the_zone_certificate_names_the_zone(ca: tuple[str, str]) -> None:
    key_pem, issued = controlca.sign_zone_client(*ca, DAY)
    assert _names(issued.cert_pem) == (["hostagent-zone"], ["urn:hostagent:zone"])
    assert "PRIVATE KEY" in key_pem


def test_a_bad_csr_is_refused(ca: tuple[str, str]) -> None:
    with pytest.raises(controlca.BadRequest, match="not a PEM"):
        controlca.sign_host(*ca, "garbage", "h1", DAY)
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h1")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, None)
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(controlca.BadRequest, match="unsupported key"):
        controlca.sign_host(*ca, pem, "h1", DAY)
    _, good = controlca.host_csr("h1")
    with pytest.raises(controlca.BadRequest, match="DNS-1123"):
        controlca.sign_host(*ca, good, "not_a_label", DAY)


def test_usable_refuses_another_host_ca_key_or_an_expired_certificate(
    ca: tuple[str, str],
) -> None:
    key_pem, csr_pem = controlca.host_csr("h1")
    cert_pem = controlca.sign_host(*ca, csr_pem, "h1", DAY).cert_pem
    other_key, _ = controlca.host_csr("h1")
    other_ca, _ = controlca.make_ca("other")
    now = dt.datetime.now(dt.UTC)  # after the issue (a module-level time can be older than it)
    assert controlca.usable(cert_pem, key_pem, ca[0], "h1", now)
    assert not controlca.usable(cert_pem, key_pem, ca[0], "h2", now)
    assert not controlca.usable(cert_pem, other_key, ca[0], "h1", now)
    assert not controlca.usable(cert_pem, key_pem, other_ca, "h1", now)
    assert not controlca.usable(cert_pem, key_pem, ca[0], "h1", now + 2 * DAY)
    assert not controlca.usable("", key_pem, ca[0], "h1", now)


def test_renewal_is_at_two_thirds_of_the_lifetime_from_the_issue(ca: tuple[str, str]) -> None:
    issued = controlca.sign_host(*ca, controlca.host_csr("h1")[1], "h1", 30 * DAY)
    at = controlca.renew_at(issued.not_before, issued.not_after)
    assert abs(at - (issued.not_before + controlca.BACKDATE + 20 * DAY)) < dt.timedelta(seconds=1)


def _peer(cn: str, uri: str) -> dict[str, Any]:
    """A certificate as ssl's getpeercert() gives it."""
    return {"subject": ((("commonName", cn),),), "subjectAltName": (("URI", uri), ("DNS", cn))}


@pytest.mark.parametrize(
    ("peer", "identity"),
    [
        (_peer("h1", "urn:hostagent:host:h1"), controlca.Identity("host", "h1")),
        (
            _peer("hostagent-zone", "urn:hostagent:zone"),
            controlca.Identity("zone", "hostagent-zone"),
        ),
        (_peer("h1", "urn:hostagent:host:h2"), None),  # names disagree
        (_peer("h1", "urn:hostagent:zone"), None),
        (_peer("hostagent-zone", "urn:hostagent:host:h1"), None),
        (_peer("h1", "spiffe://other/h1"), None),
        ({"subject": ((("commonName", "h1"),),)}, None),  # no URI
        ({}, None),
        (None, None),
    ],
)
def test_identity_of_a_verified_certificate(
    peer: dict[str, Any] | None, identity: controlca.Identity | None
) -> None:
    assert controlca.identity_of(peer) == identity


def test_check_ca_refuses_a_wrong_key_or_a_leaf(ca: tuple[str, str]) -> None:
    controlca.check_ca(*ca)
    with pytest.raises(ValueError, match="does not belong"):
        controlca.check_ca(ca[0], controlca.make_ca()[1])
    key_pem, csr = controlca.host_csr("h1")
    leaf = controlca.sign_host(*ca, csr, "h1", DAY).cert_pem
    with pytest.raises(ValueError, match="not a CA"):
        controlca.check_ca(leaf, key_pem)


def test_the_zone_makes_its_ca_once_with_a_private_key(tmp_path: Path) -> None:
    first = ControlPlane(ControlCaConfig(), tmp_path)
    key = tmp_path / "control-ca" / "ca.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "control-ca").stat().st_mode & 0o777 == 0o700
    second = ControlPlane(ControlCaConfig(), tmp_path)
    assert first.ca_pem == second.ca_pem
    first.refresh_zone_cert()
    assert first.zone_cert_file.stat().st_mode & 0o777 == 0o600
    assert first.agents_tls(None, None) is not None


def _ca_of(state_dir: str, start: Any) -> str:
    start.wait()  # all at once
    return ControlPlane(ControlCaConfig(), Path(state_dir)).ca_pem


def test_replicas_starting_at_once_on_one_state_dir_make_one_ca(tmp_path: Path) -> None:
    """Processes, as replicas are: each makes the CA if it finds none; all end with the
    same CA and a key that belongs to it (a mismatched pair stops a zone at start)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(6, mp_context=context) as pool:
        start = manager.Barrier(6, timeout=60)
        cas = list(pool.map(_ca_of, [str(tmp_path)] * 6, [start] * 6))
    assert len(set(cas)) == 1
    assert ControlPlane(ControlCaConfig(), tmp_path).ca_pem == cas[0]


def test_a_given_ca_is_used_and_a_wrong_one_is_a_clear_error(tmp_path: Path) -> None:
    cert_pem, key_pem = controlca.make_ca("given")
    (tmp_path / "ca.crt").write_text(cert_pem)
    (tmp_path / "ca.key").write_text(key_pem)
    given = ControlCaConfig(cert_file=tmp_path / "ca.crt", key_file=tmp_path / "ca.key")
    assert ControlPlane(given, tmp_path / "state").ca_pem == cert_pem
    assert not (tmp_path / "state" / "control-ca" / "ca.key").exists()
    (tmp_path / "ca.key").write_text(controlca.make_ca()[1])
    with pytest.raises(ConfigError, match=r"control_ca: .*does not belong"):
        ControlPlane(given, tmp_path / "state")
    config = tmp_path / "zone.toml"
    config.write_text(f'[control_ca]\ncert_file = "{tmp_path / "ca.crt"}"\n')
    with pytest.raises(ConfigError, match=r"control_ca.*both cert_file and key_file"):
        load_zone_config(config)


async def test_a_token_generation_bootstraps_once(zone_stores: StoreFactory) -> None:
    store = await zone_stores()
    assert store.token_generation("h1") == 0
    await store.record_certificate("h1", 1, "2030-01-01T00:00:00Z")
    assert store.token_generation("h1") == 1
    with pytest.raises(Stale):
        await store.record_certificate("h1", 1, "2030-01-01T00:00:00Z")
    await store.record_certificate("h1", None, "2030-02-01T00:00:00Z")  # a renewal
    assert store.token_generation("h1") == 1
    await store.record_certificate("h1", 3, "2030-03-01T00:00:00Z")
    with pytest.raises(Stale):
        await store.record_certificate("h1", 2, "2030-03-01T00:00:00Z")
    assert store.token_generation("h2") == 0
    assert store.certificates() == {"h1": HostCertificate("2030-03-01T00:00:00Z", 3)}
    await store.put_host("h1", report(1), 1.0)
    await store.remove_host("h1")  # a spent token stays spent when the host leaves
    assert (await zone_stores()).token_generation("h1") == 3


async def test_the_next_host_token_follows_the_sqlite_store(tmp_path: Path) -> None:
    store = SqliteZoneStore(tmp_path / "zone.db")
    await store.start()
    try:
        await store.record_certificate("h1", 3, "2030-03-01T00:00:00Z")
    finally:
        await store.close()
    config = ZoneServerConfig(state_dir=tmp_path)
    assert next_host_token(config, "h1").startswith("host.h1.4.")
    assert next_host_token(config, "h2").startswith("host.h2.1.")
    fresh = ZoneServerConfig(state_dir=tmp_path / "never-ran")
    assert next_host_token(fresh, "h1").startswith("host.h1.1.")
    assert not (tmp_path / "never-ran" / "zone.db").exists()  # read beside the zone only


@pytest.mark.parametrize(("named", "refused"), [("h1", False), ("agent", True)])
async def test_the_zone_refuses_an_agent_certificate_naming_another_host(
    tmp_path: Path, named: str, refused: bool
) -> None:
    """A real TLS server on loopback: the zone's calls to the agent at 127.0.0.1 (which
    host h1 reports) go through only when its server certificate names h1, and the
    refusal comes in the handshake, before the request is sent."""
    cert, key = issue_server_cert(tmp_path / "ca", named, "127.0.0.1", tmp_path / "tls")
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/host", answer)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_tls).start()
    control = ControlPlane(ControlCaConfig(), tmp_path / "zone")
    control.refresh_zone_cert()
    hosts = {"127.0.0.1": {"h1"}}
    tls = control.agents_tls(tmp_path / "ca" / "ca.crt", lambda a: hosts.get(a, set()))
    try:
        async with http.async_client(tls=tls, timeout_s=10) as client:
            if refused:
                with pytest.raises(http.TransportError, match=r"names none of the hosts.*h1"):
                    await client.get(f"https://127.0.0.1:{port}/v1/host")
                assert seen == []
            else:
                response = await client.get(f"https://127.0.0.1:{port}/v1/host")
                assert response.status_code == 200 and seen == ["/v1/host"]
    finally:
        await runner.cleanup()
