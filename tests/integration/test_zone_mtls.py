"""Mutual TLS between a real zone (served from this process over TLS on loopback) and a
real `hostagent serve` (real libvirt): the agent bootstraps its certificate with its
one-time host token, then reports with the certificate only and renews it without a
restart; the zone refuses the used token, another host's certificate, a foreign CA's
and an expired one, and no credentials; the agent takes the zone's client certificate
on its cluster endpoints, refuses a host's, and still takes its own token (the CLI); the
zone renews its own certificate while running; a certificate lost while the agent was
down is bootstrapped again with a new token, without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import http
from hostagent.config import ApiConfig
from hostagent.zone.config import AgentsConfig, ControlCaConfig, HostsConfig, ZoneServerConfig
from hostagent.zone.server import Zone
from hostagent.zone.tokens import next_host_token
from pki import controlca, keys
from pki.servicecerts import issue_server_cert
from tests.conftest import require_libvirt
from tests.e2e.agent import Agent, cleanup, poll
from tests.fakezone import free_port

pytestmark = pytest.mark.integration
HOST_CERT_TTL_S = 24.0  # renewed at 2/3: every 16 s while the tests run


@dataclass
class Lab:
    zone: Zone
    zone_url: str
    agent: Agent
    agent_url: str
    service_ca: Path  # verifies both servers
    host_token: str
    loop: asyncio.AbstractEventLoop

    @property
    def client_pem(self) -> Path:
        return self.agent.state_dir / "zone-tls" / "client.pem"

    @property
    def control_dir(self) -> Path:
        return self.zone.config.state_dir / "control-ca"

    def client(self, url: str, cert: Path | None = None, token: str | None = None) -> http.Client:
        tls = http.tls_context(self.service_ca, cert_file=cert)
        return http.client(url, tls=tls, token=token, timeout_s=10.0)

    def reports(self) -> int:
        record = self.zone.store.host(self.agent.host_id)
        return 0 if record is None else int(record.last_heartbeat * 1000)


def _serial(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_libvirt()
    tmp = tmp_path_factory.mktemp("mtls")
    zone_port = free_port()
    zone_cert, zone_key = issue_server_cert(tmp / "ca", "zone", "127.0.0.1", tmp / "tls")
    state = Path("/var/lib/hostagent-e2e") / f"mtls-{tmp.name}"
    agent = Agent(state_dir=state, image_dir=state / "images")  # QEMU must reach both
    # the agent's server certificate names its host id, as the zone checks
    agent_cert, agent_key = issue_server_cert(tmp / "ca", agent.host_id, "127.0.0.1", tmp / "tls")
    service_ca = tmp / "ca" / "ca.crt"
    config = ZoneServerConfig(
        state_dir=tmp / "zone",
        api=ApiConfig(listen=f"127.0.0.1:{zone_port}", tls_cert=zone_cert, tls_key=zone_key),
        hosts=HostsConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0),
        agents=AgentsConfig(ca_file=service_ca),
        control_ca=ControlCaConfig(
            host_cert_ttl_days=HOST_CERT_TTL_S / 86400,
            zone_cert_ttl_days=HOST_CERT_TTL_S / 86400,
        ),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    zone = asyncio.run_coroutine_threadsafe(_start_zone(config), loop).result(30)

    (state / "images").mkdir(parents=True, exist_ok=True)
    token = next_host_token(config, agent.host_id)
    token_file = state / "zone-token"
    token_file.write_text(token + "\n")
    agent.write_config()
    agent.config_path.write_text(
        agent.config_path.read_text().replace(
            f'listen = "127.0.0.1:{agent.api_port}"\n',
            f'listen = "127.0.0.1:{agent.api_port}"\ntls_cert = "{agent_cert}"\n'
            f'tls_key = "{agent_key}"\n',
        )
        + f'[zone]\nurl = "https://127.0.0.1:{zone_port}"\ntoken_file = "{token_file}"\n'
        f'ca_file = "{service_ca}"\n'
    )
    lab = Lab(
        zone,
        f"https://127.0.0.1:{zone_port}",
        agent,
        f"https://127.0.0.1:{agent.api_port}",
        service_ca,
        token,
        loop,
    )
    try:
        _start(agent)
        yield lab
    finally:
        try:
            print(agent.log_tail())
            cleanup(agent, [])
        finally:
            asyncio.run_coroutine_threadsafe(zone.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def _start(agent: Agent) -> None:
    with agent.log_path.open("ab") as log:
        agent.process = subprocess.Popen(
            [sys.executable, "-m", "hostagent", "-c", str(agent.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _start_zone(config: ZoneServerConfig) -> Zone:
    zone = Zone(config)
    await zone.start()
    return zone


def _registered(lab: Lab) -> bool:
    assert lab.agent.process is not None and lab.agent.process.poll() is None, "agent exited"
    return lab.zone.store.host(lab.agent.host_id) is not None


def test_the_agent_bootstraps_and_reports_with_its_certificate_only(lab: Lab) -> None:
    poll(lambda: _registered(lab), 60, "the agent to register")
    pem = lab.client_pem.read_text()
    assert oct(lab.client_pem.stat().st_mode & 0o777) == "0o600"
    assert "PRIVATE KEY" in pem
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.subject.rfc4514_string() == f"CN={lab.agent.host_id}"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"urn:hostagent:host:{lab.agent.host_id}"]
    assert (lab.agent.state_dir / "zone-tls" / "ca.crt").read_text() == (
        lab.control_dir / "ca.crt"
    ).read_text()
    record = lab.zone.store.host(lab.agent.host_id)
    assert record is not None and record.report.api_token is None  # the zone holds no token
    with lab.client(lab.zone_url, token=lab.zone.admin_token) as admin:
        (view,) = [h for h in admin.get("/v1/hosts").json()["items"] if h["host"] == record.id]
    assert view["certificate"]["token_generation"] == 1
    assert view["certificate"]["not_after"].endswith("Z") and "api_token" not in view
    before = lab.reports()
    poll(lambda: lab.reports() > before, 30, "heartbeats with the certificate")
    assert lab.host_token not in lab.agent.log_tail()


def test_the_host_token_bootstraps_once(lab: Lab) -> None:
    poll(lambda: _registered(lab), 60, "the agent to register")
    _, csr = controlca.host_csr(lab.agent.host_id)
    path = f"/v1/hosts/{lab.agent.host_id}/certificate"
    with lab.client(lab.zone_url, token=lab.host_token) as client:
        again = client.post(path, json={"csr": csr})
        assert again.status_code == 403, again.text
        message = again.json()["error"]["message"]
        assert "hostagent zone host-token" in message and "already used" in message
        # nor does the token report for its host any more
        report = client.put(f"/v1/hosts/{lab.agent.host_id}", json={})
        assert report.status_code == 403
    fresh = next_host_token(lab.zone.config, lab.agent.host_id)
    assert fresh != lab.host_token
    with lab.client(lab.zone_url, token=fresh) as client:
        assert client.post(path, json={"csr": csr}).status_code == 201  # re-bootstrap
        assert client.post(path, json={"csr": csr}).status_code == 403


def test_the_certificate_is_renewed_without_a_restart(lab: Lab) -> None:
    poll(lambda: _registered(lab), 60, "the agent to register")
    assert lab.agent.process is not None
    pid, first = lab.agent.process.pid, _serial(lab.client_pem)
    poll(lambda: _serial(lab.client_pem) != first, HOST_CERT_TTL_S * 2, "a renewed certificate")
    before = lab.reports()
    poll(lambda: lab.reports() > before, 30, "heartbeats with the renewed certificate")
    assert lab.agent.process.pid == pid and lab.agent.process.poll() is None
    renewed = x509.load_pem_x509_certificate(lab.client_pem.read_bytes())
    assert renewed.not_valid_after_utc > dt.datetime.now(dt.UTC)


def _answers(lab: Lab) -> bool:
    assert lab.agent.process is not None and lab.agent.process.poll() is None, "agent exited"
    with lab.client(lab.agent_url) as client:
        try:
            return client.get("/healthz").status_code == 200
        except http.TransportError:
            return False


def test_a_host_can_only_act_as_itself(lab: Lab) -> None:
    poll(lambda: _registered(lab), 60, "the agent to register")
    with lab.client(lab.zone_url, cert=lab.client_pem) as client:
        other = client.put("/v1/hosts/other-host", json={})
        assert other.status_code == 403, other.text
        assert set(other.json()["error"]) == {"code", "message"}
        _, csr = controlca.host_csr("other-host")
        assert client.post("/v1/hosts/other-host/certificate", json={"csr": csr}).status_code == 403
        assert client.get("/v1/clusters").status_code == 403  # admin calls are not a host's
    assert lab.zone.store.host("other-host") is None
    zone_pem = lab.control_dir / "zone-client.pem"
    with lab.client(lab.zone_url, cert=zone_pem) as client:
        assert client.put(f"/v1/hosts/{lab.agent.host_id}", json={}).status_code == 403


def _certificate(ca_cert: str, ca_key: str, host: str, valid: tuple[int, int]) -> str:
    """A client certificate of host by the CA, valid from/to `valid` hours from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca = x509.load_pem_x509_certificate(ca_cert.encode())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(hours=valid[0]))
        .not_valid_after(now + dt.timedelta(hours=valid[1]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:hostagent:host:{host}")]
            ),
            critical=False,
        )
        .sign(keys.load_private_key(ca_key), hashes.SHA256())
    )
    return keys.private_pem(key) + cert.public_bytes(serialization.Encoding.PEM).decode()


def test_no_credentials_a_foreign_ca_and_an_expired_certificate_are_refused(
    lab: Lab, tmp_path: Path
) -> None:
    poll(lambda: _registered(lab), 60, "the agent to register")
    host = lab.agent.host_id
    with lab.client(lab.zone_url) as client:
        refused = client.put(f"/v1/hosts/{host}", json={})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    foreign_ca, foreign_key = controlca.make_ca("someone else's CA")
    zone_ca = (lab.control_dir / "ca.crt").read_text()
    zone_key = (lab.control_dir / "ca.key").read_text()
    for name, pem in {
        "foreign": _certificate(foreign_ca, foreign_key, host, (-1, 1)),
        "expired": _certificate(zone_ca, zone_key, host, (-2, -1)),
    }.items():
        path = tmp_path / f"{name}.pem"
        path.write_text(pem)
        with lab.client(lab.zone_url, cert=path) as client, pytest.raises(http.TransportError):
            client.put(f"/v1/hosts/{host}", json={})  # the handshake fails: no HTTP answer


def test_the_agent_takes_the_zones_certificate_and_its_own_token(lab: Lab) -> None:
    poll(lambda: _registered(lab), 60, "the agent to register")
    node = "/v1/clusters/mtls-none/nodes/n1"
    token = (lab.agent.state_dir / "api-token").read_text().strip()
    with lab.client(lab.agent_url) as client:
        refused = client.get(node)
        assert refused.status_code == 401, refused.text
        assert client.delete(node).status_code == 401
    with lab.client(lab.agent_url, cert=lab.control_dir / "zone-client.pem") as client:
        assert client.get(node).status_code == 404  # past authentication: no such node
        assert client.get("/v1/host").status_code == 403  # the zone's is for clusters only
    with lab.client(lab.agent_url, cert=lab.client_pem) as client:
        host_cert = client.get(node)
        assert host_cert.status_code == 403, host_cert.text
        assert lab.agent.host_id in host_cert.json()["error"]["message"]
    with lab.client(lab.agent_url, token=token) as client:
        assert client.get(node).status_code == 404
        assert client.get("/v1/host").status_code == 200


def test_a_lost_certificate_is_bootstrapped_again_with_a_new_token(lab: Lab) -> None:
    """The certificate gone while the agent was down: its spent token is refused with what
    to do (shown in GET /v1/host), a new token in the token file is taken without a
    restart."""
    poll(lambda: _registered(lab), 60, "the agent to register")
    token = (lab.agent.state_dir / "api-token").read_text().strip()

    def certificate() -> dict[str, Any]:
        with lab.client(lab.agent_url, token=token) as client:
            zone: dict[str, Any] = client.get("/v1/host").json()["zone"]
        return zone

    held = poll(lambda: certificate()["certificate"]["not_after"], 30, "a certificate shown")
    assert dt.datetime.fromisoformat(held) > dt.datetime.now(dt.UTC)
    with lab.client(lab.agent_url) as client:
        metrics = client.get("/metrics").text
    expiry = next(
        line
        for line in metrics.splitlines()
        if line.startswith("hostagent_zone_certificate_expiry_timestamp_seconds ")
    )
    assert float(expiry.split()[1]) > dt.datetime.now(dt.UTC).timestamp()
    lab.agent.stop()
    lab.client_pem.unlink()
    _start(lab.agent)
    assert lab.agent.process is not None
    pid = lab.agent.process.pid
    spent = poll(
        lambda: _answers(lab) and "already used" in (certificate()["certificate"]["problem"] or ""),
        60,
        "the spent token refused",
    )
    assert spent
    # and no report without a certificate, saying why
    poll(lambda: "already used" in (certificate()["last_error"] or ""), 30, "the report's error")
    token_file = lab.agent.state_dir / "zone-token"
    token_file.write_text(next_host_token(lab.zone.config, lab.agent.host_id) + "\n")
    poll(lambda: lab.client_pem.exists(), 120, "a certificate bootstrapped again")
    poll(lambda: certificate()["connected"], 60, "reports again")
    assert certificate()["certificate"]["problem"] is None
    assert lab.agent.process.pid == pid and lab.agent.process.poll() is None


def test_the_zone_calls_the_agent_with_its_renewed_certificate(lab: Lab) -> None:
    """Through the zone's own context (the Deliverer's): the agent's server certificate
    names its host, the zone's client certificate is taken, and after the zone renewed
    it while running the new one is presented (the first one has expired by then)."""
    poll(lambda: _registered(lab), 60, "the agent to register")
    zone_pem = lab.control_dir / "zone-client.pem"
    node = f"{lab.agent_url}/v1/clusters/mtls-none/nodes/n1"

    def zone_call() -> int:
        async def call() -> int:
            async with http.async_client(tls=lab.zone.agents_tls, timeout_s=10) as client:
                return (await client.get(node)).status_code

        return asyncio.run_coroutine_threadsafe(call(), lab.loop).result(30)

    assert zone_call() == 404  # past authentication: no such node
    first = x509.load_pem_x509_certificate(zone_pem.read_bytes())
    poll(lambda: _serial(zone_pem) != first.serial_number, HOST_CERT_TTL_S * 2, "a renewal")
    poll(
        lambda: dt.datetime.now(dt.UTC) > first.not_valid_after_utc,
        HOST_CERT_TTL_S * 2,
        "the first zone certificate to expire",
    )
    assert zone_call() == 404  # an expired certificate would fail the agent's handshake
