"""The host's control-plane certificate of the zone (docs/zone.md, "Mutual TLS").

An agent whose zone is https and which holds no usable certificate makes a key here (it
never leaves the host) and sends a CSR to `POST {zone}/v1/hosts/{host}/certificate`
with its one-time host token ([zone] token_file, read at each attempt, so a new token
works without a restart). From then on it calls the zone with the certificate only, and
renews it by the same call, authenticated by the certificate, at 2/3 of its lifetime; a
failure is retried with the common backoff, and an expired certificate falls back to
the token. With several zone URLs (the zone's replicas) each attempt moves on to the next
replica when one is unreachable or answers 503, as the heartbeats do. The files:
<state_dir>/zone-tls/client.pem (key and certificate together, 0600, replaced
atomically) and ca.crt (the zone's control-plane CA).

`tls` is the one SSL context of every call to the zone (heartbeats, the zone PKI
backend): it trusts [zone] ca_file and presents the current certificate; a renewal loads
the new one into it, so new connections use it without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import http
from common.backoff import Backoff
from common.failover import FAILOVER_STATUS, Urls, first_serving
from common.files import write_atomically
from hostagent.config import Config, read_secret
from hostagent.errors import ConfigError
from pki import controlca

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertificateStatus:
    """The host's certificate of the zone as GET /v1/host and /metrics show it."""

    file: Path
    not_after: datetime | None  # None: no usable certificate held
    renew_at: datetime | None
    problem: str | None  # why the last bootstrap or renewal failed; None after a success

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "not_after": _stamp(self.not_after),
            "renew_at": _stamp(self.renew_at),
            "problem": self.problem,
        }


class CertificateFailed(Exception):
    """One bootstrap or renewal failed; the message says why and what to do. refused: the
    zone refused the current certificate (a TLS alert, 401), e.g. its CA was made anew."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class _Unserved(CertificateFailed):
    """This replica did not serve (unreachable, or 503): the next one may."""


class ZoneIdentity:
    def __init__(
        self,
        config: Config,
        *,
        on_ca: Callable[[Path], None] = lambda path: None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 300.0,
    ) -> None:
        assert config.zone.url is not None and config.zone.token_file is not None
        self.url = config.zone.url.rstrip("/")  # the replica that answered last
        self._urls = Urls(config.zone.urls or (config.zone.url,))
        self.host_id = config.host_id
        self._token_file = config.zone.token_file
        self._timeout_s = config.zone.timeout_s
        self.directory = config.zone_tls_dir
        self.pem_file = self.directory / "client.pem"
        self.ca_file = self.directory / "ca.crt"
        self._on_ca = on_ca
        self._retry = (retry_initial_s, retry_max_s)
        try:
            self.tls = http.tls_context(config.zone.ca_file)
            # a bootstrap presents no certificate: an expired one would fail the handshake
            self._bare_tls = http.tls_context(config.zone.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"zone.ca_file: cannot load {config.zone.ca_file}: {exc}") from exc
        self.ready = asyncio.Event()
        self.problem: str | None = "no certificate of the zone yet"
        self.not_before: datetime | None = None
        self.not_after: datetime | None = None
        self._try_token = False  # the zone refused the certificate: bootstrap once
        if self._usable():
            self._load()

    def _usable(self) -> bool:
        try:
            pem, ca = self.pem_file.read_text(), self.ca_file.read_text()
        except OSError:
            return False
        return controlca.usable(pem, pem, ca, self.host_id, datetime.now(UTC))

    def _load(self) -> None:
        self.tls.load_cert_chain(self.pem_file)
        self.not_before, self.not_after = controlca.validity(self.pem_file.read_text())
        self.problem = None
        self.ready.set()
        self._on_ca(self.ca_file)

    def status(self) -> CertificateStatus:
        held = self.ready.is_set() and self.not_after is not None
        return CertificateStatus(
            file=self.pem_file,
            not_after=self.not_after if held else None,
            renew_at=self.renew_at() if held else None,
            problem=self.problem,
        )

    def renew_at(self) -> datetime:
        assert self.not_before is not None and self.not_after is not None
        return controlca.renew_at(self.not_before, self.not_after)

    async def run(self) -> None:
        """Bootstrap when needed, then renew forever (only cancellation ends it)."""
        retry = Backoff(*self._retry)
        renewing = http.async_client(tls=self.tls, timeout_s=self._timeout_s)
        bootstrapping = http.async_client(tls=self._bare_tls, timeout_s=self._timeout_s)
        async with renewing, bootstrapping:
            while True:
                if self.ready.is_set():
                    wait = (self.renew_at() - datetime.now(UTC)).total_seconds()
                    await asyncio.sleep(max(wait, 0.0))
                bootstrap = self._try_token or not self._usable()
                self._try_token = False
                try:
                    session = bootstrapping if bootstrap else renewing
                    await self.obtain(session, bootstrap=bootstrap)
                except Exception as exc:  # whatever fails, the loop goes on
                    self._failed(exc, bootstrap)
                    # a certificate the zone refuses: the next attempt with the token
                    # (its CA made anew?), then renewal again, in turn until one works
                    refused = isinstance(exc, CertificateFailed) and exc.refused
                    self._try_token = refused and not bootstrap
                    await asyncio.sleep(retry.next())
                    continue
                retry.reset()

    def _failed(self, exc: Exception, bootstrap: bool) -> None:
        expected = isinstance(exc, CertificateFailed)
        problem = (
            str(exc)
            if expected
            else f"certificate {'bootstrap' if bootstrap else 'renewal'} crashed: {exc!r}"
        )
        if self.problem != problem:
            log.warning("%s; retrying", problem, exc_info=not expected)
        self.problem = problem
        if bootstrap and not self._usable():
            self.ready.clear()

    async def obtain(self, session: http.AsyncClient, *, bootstrap: bool) -> None:
        """One certificate: with the host token (bootstrap, a session presenting no
        certificate) or the current certificate (renewal, a session of `tls`)."""
        what = "bootstrap" if bootstrap else "renewal"
        headers = {}
        if bootstrap:
            try:
                token = read_secret(self._token_file, "zone.token_file")
            except ConfigError as exc:
                raise CertificateFailed(f"certificate {what}: {exc}") from exc
            headers["Authorization"] = f"Bearer {token}"
        key_pem, csr_pem = controlca.host_csr(self.host_id)

        async def post(url: str) -> http.Response:
            return await self._post(session, url, what, headers, {"csr": csr_pem})

        response = await first_serving(self._urls, post, lambda e: isinstance(e, _Unserved))
        try:
            answer = response.json()
            cert_pem, ca_pem = str(answer["certificate"]), str(answer["ca"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CertificateFailed(f"certificate {what}: the zone's answer: {exc!r}") from exc
        if not controlca.usable(cert_pem, key_pem, ca_pem, self.host_id, datetime.now(UTC)):
            raise CertificateFailed(
                f"certificate {what}: the zone returned no usable certificate of this host "
                "for this key"
            )
        await asyncio.to_thread(self._save, key_pem + cert_pem, ca_pem)
        self._load()
        log.info(
            "certificate %s with the zone %s: valid until %s, renewed from %s",
            what,
            self.url,
            self.not_after,
            self.renew_at(),
        )

    async def _post(
        self,
        session: http.AsyncClient,
        url: str,
        what: str,
        headers: dict[str, str],
        body: dict[str, str],
    ) -> http.Response:
        """One replica's answer of 201; _Unserved when it did not serve."""
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await session.post(
                    f"{url}/v1/hosts/{self.host_id}/certificate", json=body, headers=headers
                )
        except (http.HTTPError, TimeoutError, OSError) as exc:
            tls = http.is_tls_error(exc)
            kind = "TLS with the zone failed ([zone] ca_file?)" if tls else "unreachable zone"
            raise _Unserved(f"certificate {what}: {kind} {url}: {exc!r}", tls) from exc
        if response.status_code != 201:
            failed = _Unserved if response.status_code == FAILOVER_STATUS else CertificateFailed
            raise failed(
                f"certificate {what}: the zone {url} answered {response.status_code}: "
                f"{_message(response)}",
                response.status_code == 401,
            )
        self.url = url
        return response

    def _save(self, pem: str, ca_pem: str) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.ca_file, ca_pem.encode(), 0o644)
        write_atomically(self.pem_file, pem.encode(), 0o600)


def _stamp(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


def _message(response: http.Response) -> str:
    try:
        return str(json.loads(response.text)["error"]["message"])[:400]
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase
