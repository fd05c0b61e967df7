"""FakeZone: a stand-in for the zone service (docs/zone.md), served in the test's own process.

The agent's side of the zone (hostagent/zoneclient.py, pki/zone.py) needs a zone to talk
to while the real one (hostagent/zone/) is built on its own. FakeZone serves only the
endpoints an agent calls, with the contract's auth (host tokens bound to a host), answer
shapes and error documents, signs with a real local CA, and fails on demand. It is no
second implementation of the zone: the real zone's end-to-end tests cover the agent
against the real thing too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.certset import PROFILE_BY_NAME, CertRequest
from pki.errors import BackendRefused
from pki.local import LocalBackend


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass
class FakeZone:
    tokens: dict[str, str]  # host id -> its host token
    pki: LocalBackend | None = None  # the zone's own CA backend
    heartbeat_interval_s: float = 5.0
    clusters: set[str] = field(default_factory=set)  # whose CAs exist
    failures: list[int] = field(default_factory=list)  # answered first, one per request
    delay_s: float = 0.0  # before answering a heartbeat (timeouts)
    reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)

    def add_cluster(self, cluster: str) -> None:
        """What the zone does when a cluster is created: make its CAs."""
        assert self.pki is not None
        self.pki.ensure_cluster(cluster)
        self.clusters.add(cluster)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/v1/hosts/{host}", self._put_host)
        app.router.add_get("/v1/clusters/{cluster}/pki/ca", self._ca)
        app.router.add_post("/v1/clusters/{cluster}/pki/sign", self._sign)
        app.router.add_get("/v1/clusters/{cluster}/pki/service-account", self._service_account)
        return app

    # --- auth and injected failures --------------------------------------------------

    def _host_of(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        for host, expected in self.tokens.items():
            if hmac.compare_digest(token.strip(), expected):
                return host
        return None

    def _refusal(self, request: web.Request, host: str | None = None) -> web.Response | None:
        self.headers.append(dict(request.headers))
        caller = self._host_of(request)
        if caller is None:
            return error(401, "unauthorized", "missing or wrong host token")
        if host is not None and caller != host:
            return error(403, "forbidden", f"this token belongs to host {caller}")
        if self.failures:
            status = self.failures.pop(0)
            return error(status, "injected", f"injected failure {status}")
        return None

    # --- hosts -----------------------------------------------------------------------

    async def _put_host(self, request: web.Request) -> web.Response:
        host = request.match_info["host"]
        refused = self._refusal(request, host)
        if refused is not None:
            return refused
        await asyncio.sleep(self.delay_s)
        try:
            report = json.loads(await request.read())
        except ValueError:
            return error(400, "malformed", "the body is not JSON")
        self.reports.append((host, report))
        created = host not in self.registered
        self.registered.add(host)
        answer = {"host": host, "heartbeat_interval_s": self.heartbeat_interval_s}
        return web.json_response(answer, status=201 if created else 200)

    # --- PKI -------------------------------------------------------------------------

    def _cluster(self, request: web.Request) -> tuple[str, web.Response | None]:
        cluster = request.match_info["cluster"]
        refused = self._refusal(request)
        if refused is None and cluster not in self.clusters:
            refused = error(404, "not_found", f"cluster {cluster} does not exist")
        return cluster, refused

    async def _ca(self, request: web.Request) -> web.Response:
        cluster, refused = self._cluster(request)
        if refused is not None:
            return refused
        assert self.pki is not None
        cas = {ca.value: pem for ca, pem in self.pki.ca_certificates(cluster).items()}
        return web.json_response({"cas": cas})

    async def _sign(self, request: web.Request) -> web.Response:
        cluster, refused = self._cluster(request)
        if refused is not None:
            return refused
        assert self.pki is not None
        body = await request.json()
        profile = PROFILE_BY_NAME.get(body.get("name", ""))
        if profile is None:
            return error(422, "invalid", f"no certificate is named {body.get('name')!r}")
        ttl = timedelta(seconds=body.get("ttl_s", 90 * 86400))
        request_ = CertRequest(profile.name, profile.ca, "", (), (), (), (), ttl)
        try:
            issued = self.pki.issue(cluster, request_, body["csr"])
        except BackendRefused as exc:
            return error(422, "invalid", str(exc))
        return web.json_response({"cert": issued.cert_pem, "ca": issued.ca_pem})

    async def _service_account(self, request: web.Request) -> web.Response:
        cluster, refused = self._cluster(request)
        if refused is not None:
            return refused
        assert self.pki is not None
        private, public = self.pki.service_account_key(cluster)
        return web.json_response({"key": private, "public": public})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def tls_files(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA file and a server context whose certificate (for 127.0.0.1) that CA signed."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test zone CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zone")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "zone.crt", directory / "k"
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context


async def serve_tls(app: web.Application, context: ssl.SSLContext) -> tuple[web.AppRunner, str]:
    """Serve app over TLS on loopback; returns the runner (clean it up) and the base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, f"https://127.0.0.1:{port}"
