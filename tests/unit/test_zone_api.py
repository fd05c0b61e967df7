"""The zone's HTTP API over real HTTP (aiohttp's test server) with its real store and a
real local CA: who may call what, status codes, the error shape, PKI for agents."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostagent.zone import api
from hostagent.zone.api import zone_app
from hostagent.zone.auth import HostToken, host_token, parse_host_token
from hostagent.zone.config import ControlCaConfig, ZoneServerConfig
from hostagent.zone.controlplane import ControlPlane
from hostagent.zone.service import ZoneService, parse_body
from pki.local import LocalBackend
from tests.conftest import StoreFactory
from tests.rawhttp import bearer_error

ADMIN = {"Authorization": "Bearer admin-token"}
SECRET = "host-secret"
CLUSTER: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "masters": {"count": 1, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
    "workers": {"count": 1, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}


def as_host(host: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {host_token(SECRET, host)}"}


def report(i: int) -> dict[str, Any]:
    return {
        "api_url": f"https://10.250.0.{10 + i}:8470",
        "api_token": f"agent-{i}",
        "underlay_address": f"10.250.0.{10 + i}",
        "allocatable": {"vcpus": 8, "memory_mib": 8192, "disk_gib": 100},
        "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
    }


@pytest.fixture
async def client(tmp_path: Path, zone_stores: StoreFactory) -> AsyncIterator[TestClient[Any, Any]]:
    config = ZoneServerConfig(state_dir=tmp_path)
    service = ZoneService(await zone_stores(), config, LocalBackend(tmp_path / "pki"))
    app = zone_app(
        service,
        "admin-token",
        SECRET,
        metrics_text=lambda: b"",
        heartbeat_s=5.0,
        control=ControlPlane(ControlCaConfig(), tmp_path),
        zone_view=dict,
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body["error"]) == {"code", "message"}
    error: dict[str, str] = body["error"]
    return error


def test_host_tokens_name_their_host_and_generation_and_cannot_be_forged() -> None:
    token = host_token(SECRET, "h1")
    assert parse_host_token(SECRET, token) == HostToken("h1", 1)
    assert parse_host_token(SECRET, host_token(SECRET, "h1", 7)) == HostToken("h1", 7)
    assert parse_host_token("other-secret", token) is None
    assert parse_host_token(SECRET, token.replace("h1", "h2")) is None
    assert parse_host_token(SECRET, token.replace("h1.1.", "h1.2.")) is None
    assert parse_host_token(SECRET, token.replace("h1.1.", "h1.01.")) is None
    assert parse_host_token(SECRET, "garbage") is None
    assert parse_host_token(SECRET, "host.h1.1.wröng") is None
    assert parse_host_token(SECRET, "host.h1.1.wr\udcf6ng") is None  # aiohttp's 0xf6
    assert parse_host_token(SECRET, "host.h1.wr\udcf6ng") is None  # no generation
    with pytest.raises(ValueError):
        host_token(SECRET, "h1", 0)


async def test_certificates_are_issued_over_tls_only(client: TestClient[Any, Any]) -> None:
    body = {"csr": "unused"}
    response = await client.post("/v1/hosts/h1/certificate", json=body, headers=as_host("h1"))
    assert "over TLS only" in (await error_of(response, 403))["message"]


async def test_no_or_wrong_token_is_401(client: TestClient[Any, Any]) -> None:
    await error_of(await client.get("/v1/clusters"), 401)
    bad = {"Authorization": "Bearer nope"}
    await error_of(await client.get("/v1/clusters", headers=bad), 401)
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("token", ["wröng".encode(), b"wr\xf6ng", b"host.h1.\xf6"])
async def test_a_non_ascii_token_is_401_not_an_error(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture, token: bytes
) -> None:
    caplog.set_level(logging.ERROR)
    await bearer_error(client.server, "GET", "/v1/clusters", token)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_host_registers_only_for_itself(client: TestClient[Any, Any]) -> None:
    first = await client.put("/v1/hosts/h1", json=report(1), headers=as_host("h1"))
    assert first.status == 201
    assert (await first.json())["heartbeat_interval_s"] == 5.0
    again = await client.put("/v1/hosts/h1", json=report(1), headers=as_host("h1"))
    assert again.status == 200
    error = await error_of(
        await client.put("/v1/hosts/h2", json=report(2), headers=as_host("h1")), 403
    )
    assert "cannot report for host h2" in error["message"]
    await error_of(await client.put("/v1/hosts/h1", json=report(1), headers=ADMIN), 403)
    hosts = await (await client.get("/v1/hosts", headers=ADMIN)).json()
    assert [h["host"] for h in hosts["items"]] == ["h1"]
    assert "api_token" not in hosts["items"][0]
    await error_of(await client.get("/v1/hosts", headers=as_host("h1")), 403)


async def test_a_repeated_heartbeat_is_not_validated_again(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most heartbeats repeat the host's last report byte for byte: it is parsed once; a
    changed report is parsed (and refused when invalid, the last good one kept)."""
    parsed: list[str] = []

    def counting(model: type[Any], body: bytes, what: str) -> Any:
        parsed.append(what)
        return parse_body(model, body, what)

    monkeypatch.setattr(api, "parse_body", counting)
    for _ in range(3):
        response = await client.put("/v1/hosts/h1", json=report(1), headers=as_host("h1"))
        assert response.status in (200, 201)
    assert parsed == ["host report"]
    busy = {**report(1), "allocated": {"vcpus": 2, "memory_mib": 512, "disk_gib": 5}}
    assert (await client.put("/v1/hosts/h1", json=busy, headers=as_host("h1"))).status == 200
    assert len(parsed) == 2
    bad = {**busy, "allocated": {**busy["allocated"], "vcpus": -1}}
    await error_of(await client.put("/v1/hosts/h1", json=bad, headers=as_host("h1")), 422)
    await error_of(await client.put("/v1/hosts/h1", json=bad, headers=as_host("h1")), 422)
    assert len(parsed) == 4
    hosts = await (await client.get("/v1/hosts", headers=ADMIN)).json()
    assert hosts["items"][0]["allocated"]["vcpus"] == 2
    assert (await client.put("/v1/hosts/h1", json=busy, headers=as_host("h1"))).status == 200
    assert len(parsed) == 4


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (
            "/v1/clusters/demo",
            {**CLUSTER, "masters": {**CLUSTER["masters"], "count": True}},
            "count",
        ),
        (
            "/v1/clusters/demo",
            {**CLUSTER, "workers": {**CLUSTER["workers"], "vcpus": "1"}},
            "vcpus",
        ),
        (
            "/v1/hosts/h1",
            {**report(1), "overhead": {"base_mib": 192, "per_gib_mib": False}},
            "per_gib_mib",
        ),
        (
            "/v1/hosts/h1",
            {**report(1), "allocated": {**report(1)["allocated"], "vcpus": "0"}},
            "vcpus",
        ),
    ],
)
async def test_a_number_must_be_a_json_number(
    client: TestClient[Any, Any], path: str, body: dict[str, Any], words: str
) -> None:
    """Not true (pydantic's lax mode reads it as 1) nor a string of digits: the documents
    say integer or number."""
    await client.put("/v1/hosts/h1", json=report(1), headers=as_host("h1"))
    before = await (await client.get("/v1/hosts", headers=ADMIN)).json()
    headers = as_host("h1") if path.startswith("/v1/hosts/") else ADMIN
    error = await error_of(await client.put(path, json=body, headers=headers), 422)
    assert words in error["message"]
    assert (await (await client.get("/v1/clusters", headers=ADMIN)).json())["items"] == []
    after = await (await client.get("/v1/hosts", headers=ADMIN)).json()
    assert [h["allocated"] for h in after["items"]] == [h["allocated"] for h in before["items"]]


async def test_bad_bodies(client: TestClient[Any, Any]) -> None:
    headers = {**ADMIN, "Content-Type": "application/json"}
    await error_of(await client.put("/v1/clusters/demo", data=b"{", headers=headers), 400)
    await error_of(await client.put("/v1/clusters/demo", data=b"[]", headers=headers), 400)
    even = {**CLUSTER, "masters": {**CLUSTER["masters"], "count": 2}}
    error = await error_of(await client.put("/v1/clusters/demo", json=even, headers=ADMIN), 422)
    assert "must be odd" in error["message"]
    unknown = {**CLUSTER, "colour": "blue"}
    await error_of(await client.put("/v1/clusters/demo", json=unknown, headers=ADMIN), 422)
    await error_of(await client.put("/v1/clusters/Demo", json=CLUSTER, headers=ADMIN), 422)
    await error_of(await client.get("/v1/clusters/nope", headers=ADMIN), 404)
    bad_report = {**report(1), "api_url": "ftp://x"}
    await error_of(await client.put("/v1/hosts/h1", json=bad_report, headers=as_host("h1")), 422)
    assert (await (await client.get("/v1/clusters", headers=ADMIN)).json())["items"] == []


@pytest.mark.parametrize(
    "url", ["http://10.250.0.11:8470", "http://agent.example:8470", "http://[fd00::1]:8470"]
)
async def test_plain_http_to_an_agent_off_loopback_is_refused(
    client: TestClient[Any, Any], url: str
) -> None:
    """The zone would send the agent's token over it: the agent config's rule, once."""
    plain = {**report(1), "api_url": url}
    error = await error_of(await client.put("/v1/hosts/h1", json=plain, headers=as_host("h1")), 422)
    assert "loopback" in error["message"]
    assert (await (await client.get("/v1/hosts", headers=ADMIN)).json())["items"] == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:8470", "http://[::1]:8470", "https://a:1"])
async def test_loopback_http_or_https_agents_are_taken(
    client: TestClient[Any, Any], url: str
) -> None:
    response = await client.put(
        "/v1/hosts/h1", json={**report(1), "api_url": url + "/"}, headers=as_host("h1")
    )
    assert response.status == 201
    hosts = await (await client.get("/v1/hosts", headers=ADMIN)).json()
    assert [h["api_url"] for h in hosts["items"]] == [url]


async def test_cluster_lifecycle_codes(client: TestClient[Any, Any]) -> None:
    await error_of(await client.put("/v1/clusters/demo", json=CLUSTER, headers=ADMIN), 507)
    for i in (1, 2):
        await client.put(f"/v1/hosts/h{i}", json=report(i), headers=as_host(f"h{i}"))
    created = await client.put("/v1/clusters/demo", json=CLUSTER, headers=ADMIN)
    assert created.status == 201
    same = await client.put("/v1/clusters/demo", json=CLUSTER, headers=ADMIN)
    assert same.status == 200
    other = {**CLUSTER, "masters": {**CLUSTER["masters"], "count": 3}}
    await error_of(await client.put("/v1/clusters/demo", json=other, headers=ADMIN), 409)
    skip = {**CLUSTER, "kubernetes_version": "1.33.0"}
    error = await error_of(await client.put("/v1/clusters/demo", json=skip, headers=ADMIN), 422)
    assert "one minor at a time" in error["message"]
    down = {**CLUSTER, "kubernetes_version": "1.30.4"}
    error = await error_of(await client.put("/v1/clusters/demo", json=down, headers=ADMIN), 422)
    assert "cannot go down" in error["message"]
    rolled = await client.put(
        "/v1/clusters/demo", json={**CLUSTER, "image": "other"}, headers=ADMIN
    )
    assert (await rolled.json())["status"]["phase"] == "Upgrading"
    gone = await client.delete("/v1/clusters/demo", headers=ADMIN)
    assert gone.status == 202
    assert (await gone.json())["status"]["phase"] == "Deleting"
    await error_of(await client.put("/v1/clusters/demo", json=CLUSTER, headers=ADMIN), 409)


async def test_openapi_lists_every_zone_path(client: TestClient[Any, Any]) -> None:
    document = await (await client.get("/v1/openapi.json", headers=ADMIN)).json()
    for path in ("/v1/hosts", "/v1/hosts/{host}", "/v1/clusters", "/v1/clusters/{cluster}"):
        assert path in document["paths"]
    assert "ClusterSpec" in document["components"]["schemas"]


def _csr(common_name: str, organization: str | None = None) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(names))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_pki_for_the_hosts_of_a_cluster(client: TestClient[Any, Any]) -> None:
    for i in (1, 2, 3):
        await client.put(f"/v1/hosts/h{i}", json=report(i), headers=as_host(f"h{i}"))
    view = await (await client.put("/v1/clusters/demo", json=CLUSTER, headers=ADMIN)).json()
    hosts = {n["name"]: n["host"] for n in view["status"]["nodes"]}
    master = as_host(hosts["m1"])
    cas = (await (await client.get("/v1/clusters/demo/pki/ca", headers=master)).json())["cas"]
    assert set(cas) == {"kubernetes", "etcd", "front-proxy"}
    body = {"name": "kube-proxy", "csr": _csr("system:kube-proxy")}
    signed = await client.post("/v1/clusters/demo/pki/sign", json=body, headers=master)
    assert signed.status == 200, await signed.text()
    issued = await signed.json()
    cert = x509.load_pem_x509_certificate(issued["cert"].encode())
    ca = x509.load_pem_x509_certificate(cas["kubernetes"].encode())
    assert cert.issuer == ca.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:kube-proxy"
    refused = {"name": "kube-proxy", "csr": _csr("system:masters-wannabe")}
    await error_of(
        await client.post("/v1/clusters/demo/pki/sign", json=refused, headers=master), 422
    )
    sa = await (await client.get("/v1/clusters/demo/pki/service-account", headers=master)).json()
    assert "PRIVATE KEY" in sa["key"]
    idle = next(h for h in ("h1", "h2", "h3") if h not in hosts.values())
    await error_of(await client.get("/v1/clusters/demo/pki/ca", headers=as_host(idle)), 403)
    await error_of(await client.get("/v1/clusters/demo/pki/ca", headers=ADMIN), 403)


@pytest.mark.parametrize("body", [b"{", b'{"name": "", "csr": "", "ttl_s": 0}'])
async def test_signing_with_the_admin_token_is_403_whatever_the_body(
    client: TestClient[Any, Any], body: bytes
) -> None:
    """Who may not call is told so first, not what is wrong with the request."""
    headers = {**ADMIN, "Content-Type": "application/json"}
    response = await client.post("/v1/clusters/demo/pki/sign", data=body, headers=headers)
    assert (await error_of(response, 403))["code"] == "forbidden"
