"""common.http against a TLS server in the test's own process: the bearer token and base
URL, trust in the CA file and nothing else, no environment variable overriding it, a
client certificate presented for mutual TLS, and which failures count as TLS failures."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import http
from hostagent.lab.tls import ensure_ca, issue_server_cert
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


def server_context(tmp_path: Path, *, require_client_cert: bool = False) -> ssl.SSLContext:
    cert, key = issue_server_cert(tmp_path / "ca", "server", "127.0.0.1", tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if require_client_cert:
        context.load_verify_locations(tmp_path / "ca" / "ca.crt")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A client certificate for `name` that the test CA signed."""
    ca_cert_path, ca_key_path = ensure_ca(tmp_path / "ca")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


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
    context = server_context(tmp_path, require_client_cert=True)
    runner, url = await serve_tls(app(), context)
    cert, key = client_cert(tmp_path, "h1")
    try:
        tls = http.tls_context(tmp_path / "ca" / "ca.crt", cert_file=cert, key_file=key)
        async with http.async_client(url, tls=tls) as client:
            assert (await client.get("/v1/whoami")).json()["cn"] == "h1"
        anonymous = http.tls_context(tmp_path / "ca" / "ca.crt")
        async with http.async_client(url, tls=anonymous) as client:
            with pytest.raises(http.HTTPError):
                await client.get("/v1/whoami")
    finally:
        await runner.cleanup()


def test_files_that_cannot_be_loaded_raise(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        http.tls_context(tmp_path / "missing.pem")
    cert, _ = client_cert(tmp_path, "h1")
    with pytest.raises(ssl.SSLError):
        http.tls_context(cert_file=cert, key_file=cert)  # no key in it


def test_a_refused_connection_is_no_tls_error() -> None:
    with (
        http.client(f"http://127.0.0.1:{free_port()}") as client,
        pytest.raises(http.TransportError) as failed,
    ):
        client.get("/healthz")
    assert not http.is_tls_error(failed.value)
