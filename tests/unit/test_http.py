"""common.http against a TLS server in the test's own process: the bearer token and base
URL, trust in the CA file and nothing else, no environment variable overriding it, a
client certificate presented for mutual TLS, and which failures count as TLS failures."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from common import http
from pki import keys
from pki.certset import NodeIdentity, requests_for
from pki.local import LocalBackend
from pki.servicecerts import issue_server_cert
from tests.fakezone import free_port, serve_tls


async def whoami(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    subject = dict(item[0] for item in peer["subject"]) if peer else {}
    return web.json_response(
        {"authorization": request.headers.get("Authorization"), "cn": subject.get("commonName")}
    )


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/v1/whoami", whoami)
    return application


def server_context(tmp_path: Path, *, client_ca: str | None = None) -> ssl.SSLContext:
    """The server's certificate from the lab CA (in tmp_path/ca); with client_ca (PEM), a
    client certificate that it signed is required."""
    cert, key = issue_server_cert(tmp_path / "ca", "server", "127.0.0.1", tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_cert(tmp_path: Path) -> tuple[Path, Path, str]:
    """A client certificate (node w1's kubelet-client) and key from a local cluster CA,
    and that CA's PEM."""
    backend = LocalBackend(tmp_path / "pki")
    backend.ensure_cluster("demo")
    node = NodeIdentity("demo", "w1", "worker", "10.0.0.2")
    request = next(r for r in requests_for(node) if r.name == "kubelet-client")
    key = keys.generate_key(keys.KeyType.ECDSA)
    issued = backend.issue("demo", request, keys.build_csr(key, request))
    cert_path, key_path = tmp_path / "client.crt", tmp_path / "client.key"
    cert_path.write_text(issued.cert_pem)
    key_path.write_text(keys.private_pem(key))
    return cert_path, key_path, issued.ca_pem


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    runner, url = await serve_tls(app(), server_context(tmp_path))
    try:
        yield url
    finally:
        await runner.cleanup()


async def test_the_token_and_the_base_url(server: str, tmp_path: Path) -> None:
    tls = http.tls_context(tmp_path / "ca" / "ca.crt")
    async with http.async_client(server, token="s3cret", tls=tls) as client:
        answer = (await client.get("/v1/whoami")).json()
    assert answer == {"authorization": "Bearer s3cret", "cn": None}


async def test_the_ca_file_is_trusted_and_the_system_cas_are_not_it(
    server: str, tmp_path: Path
) -> None:
    tls = http.tls_context(tmp_path / "ca" / "ca.crt")
    async with http.async_client(server, tls=tls) as client:
        assert (await client.get("/v1/whoami")).status_code == 200
    async with http.async_client(server) as system_cas:
        with pytest.raises(http.TransportError) as failed:
            await system_cas.get("/v1/whoami")
    assert http.is_tls_error(failed.value)


async def test_the_environment_cannot_override_the_ca_file_or_add_a_proxy(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    for variable in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(variable, str(bogus))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # nobody listens
    tls = http.tls_context(tmp_path / "ca" / "ca.crt")
    async with http.async_client(server, tls=tls) as client:
        assert (await client.get("/v1/whoami")).status_code == 200

    def fetch() -> int:  # the synchronous client, in a thread: the server runs on this loop
        with http.client(server, tls=tls) as client:
            return client.get("/v1/whoami").status_code

    assert await asyncio.to_thread(fetch) == 200


async def test_a_client_certificate_is_presented(tmp_path: Path) -> None:
    cert, key, client_ca = client_cert(tmp_path)
    runner, url = await serve_tls(app(), server_context(tmp_path, client_ca=client_ca))
    try:
        tls = http.tls_context(tmp_path / "ca" / "ca.crt", cert_file=cert, key_file=key)
        async with http.async_client(url, tls=tls) as client:
            assert (await client.get("/v1/whoami")).json()["cn"] == "system:node:w1"
        anonymous = http.tls_context(tmp_path / "ca" / "ca.crt")
        async with http.async_client(url, tls=anonymous) as client:
            with pytest.raises(http.HTTPError):
                await client.get("/v1/whoami")
    finally:
        await runner.cleanup()


def test_files_that_cannot_be_loaded_raise(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        http.tls_context(tmp_path / "missing.pem")
    cert, _, _ = client_cert(tmp_path)
    with pytest.raises(ssl.SSLError):
        http.tls_context(cert_file=cert, key_file=cert)  # no key in it


def test_a_refused_connection_is_no_tls_error() -> None:
    with (
        http.client(f"http://127.0.0.1:{free_port()}") as client,
        pytest.raises(http.TransportError) as failed,
    ):
        client.get("/healthz")
    assert not http.is_tls_error(failed.value)
