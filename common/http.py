"""Outbound HTTP, the only module that imports httpx: clients of the agent, the zone and
the zone's PKI, synchronous (`client`, for the CLI and for code run in threads) and
asynchronous (`async_client`, on the event loop). aiohttp serves; it is not a client here.

Every client gets its trust from `tls_context`, an explicit SSL context: the configured
CA file alone, which no SSL_CERT_FILE or REQUESTS_CA_BUNDLE in the environment can
replace; without one, the system's CAs as OpenSSL finds them (SSL_CERT_FILE included,
the CLI's documented way to trust a lab CA), never certifi's bundle. A client
certificate and key, when given, are presented for mutual TLS. Daemons build their
clients with trust_env=False (the default): no proxy variable in a unit's environment
reroutes the host token.

Timeouts are per phase (connect, read, write, pool), each `timeout_s`, as requests had
them; a caller that needs one deadline for the whole request puts asyncio.timeout
around it. Requests are not retried here: the callers' loops retry with common.backoff.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from os import PathLike
from typing import Any, TypedDict

import httpx

# The types and errors callers see, so that no other module imports httpx.
Client = httpx.Client
AsyncClient = httpx.AsyncClient
Response = httpx.Response
HTTPError = httpx.HTTPError  # any failed request: transport, protocol, decoding
TransportError = httpx.TransportError  # not reachable, timed out, TLS, protocol

FilePath = str | PathLike[str]
MAX_CONNECTIONS = 100
# (the name the client asked for, the verified certificate as ssl's getpeercert() gives
# it): raises ssl.SSLCertVerificationError to refuse the peer
PeerCheck = Callable[[str | None, dict[str, Any]], None]


def tls_context(
    ca_file: FilePath | None = None,
    *,
    cert_file: FilePath | None = None,
    key_file: FilePath | None = None,
    check_peer: PeerCheck | None = None,
) -> ssl.SSLContext:
    """Trust `ca_file` (PEM), else the system's CAs; with cert_file, present it (and
    key_file, else the key in cert_file); with check_peer, let it refuse a verified
    server in the handshake, before any request is sent (asynchronous clients). Raises
    OSError or ssl.SSLError for a file that cannot be loaded: the caller names the
    setting."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if check_peer is not None:
        context.sslobject_class = _checking(check_peer)
    return context


def _checking(check_peer: PeerCheck) -> type[ssl.SSLObject]:
    """The SSLObject class of a context whose handshakes end with check_peer (the
    asynchronous clients' TLS runs over memory BIOs, i.e. SSLObjects)."""

    class Checked(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check_peer(self.server_hostname, self.getpeercert() or {})

    return Checked


def is_tls_error(exc: BaseException) -> bool:
    """Whether a failed request failed in the TLS handshake (verification, protocol)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError | ssl.CertificateError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class _Options(TypedDict):
    base_url: str
    headers: dict[str, str]
    verify: ssl.SSLContext
    timeout: float
    trust_env: bool


def _options(
    base_url: str, token: str | None, tls: ssl.SSLContext | None, timeout_s: float, trust_env: bool
) -> _Options:
    return {
        "base_url": base_url,
        "headers": {"Authorization": f"Bearer {token}"} if token is not None else {},
        "verify": tls or tls_context(),
        "timeout": timeout_s,
        "trust_env": trust_env,
    }


def client(
    base_url: str = "",
    *,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 10.0,
    trust_env: bool = False,
) -> httpx.Client:
    """A synchronous client; `tls` from tls_context (None: the system's CAs). One client
    may be shared by threads."""
    return httpx.Client(**_options(base_url, token, tls, timeout_s, trust_env))


def async_client(
    base_url: str = "",
    *,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 10.0,
    trust_env: bool = False,
    max_connections: int = MAX_CONNECTIONS,
) -> httpx.AsyncClient:
    """An asynchronous client for one event loop; keeps up to max_connections open. httpx
    assigns each request in time linear in the open connections: rather many small
    clients than one large one (the zone's Deliverer: a client of one connection per
    agent)."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx.AsyncClient(limits=limits, **_options(base_url, token, tls, timeout_s, trust_env))
