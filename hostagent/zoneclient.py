"""The agent's side of the zone (docs/zone.md): registration and heartbeat in one call.

`PUT {zone}/v1/hosts/{host}` with the host's report, at start and then as often as the
zone's answer says (`heartbeat_interval_s`; 5 s until the first answer). A failed beat
is retried after the interval shortened at random by up to half. The zone being down,
slow or refusing never stops the agent from serving its API and its nodes; the failure
is logged when it starts, when its kind changes and when it ends, not on every beat.
GET /v1/host and the metrics show the connection's state. The host token and the
agent's API token are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from common import http
from common.backoff import jittered
from common.failover import FAILOVER_STATUS, Urls, first_serving
from hostagent import __version__
from hostagent.capacity import Resources
from hostagent.config import Config
from hostagent.errors import ConfigError
from hostagent.imagesource import ImageInfo
from hostagent.model import NodeHealth, NodeKey
from hostagent.store import NodeRecord
from hostagent.zonetls import CertificateStatus, ZoneIdentity

log = logging.getLogger(__name__)
FIRST_INTERVAL_S = 5.0
MAX_INTERVAL_S = 3600.0
Report = Callable[[], dict[str, Any]]


def host_report(
    config: Config,
    *,
    api_token: str | None,
    allocatable: Resources,
    allocated: Resources,
    domain_type: str | None,
    records: Iterable[NodeRecord],
    health: Callable[[NodeKey], NodeHealth],
    images: Iterable[ImageInfo] = (),
) -> dict[str, Any]:
    """The body of `PUT /v1/hosts/{host}` (pure). domain_type is None until libvirt
    answered the probe; health: each node's (nodehealth); images: the host's (the zone
    delivers its catalogue's by them)."""
    records = list(records)
    networks = {(r.key.cluster, r.spec.network.vni) for r in records}
    return {
        "api_url": config.agent_url,
        "api_token": api_token,
        "underlay_address": config.network.underlay_address,
        "failure_domain": config.zone.failure_domain,
        "allocatable": _resources(allocatable),
        "allocated": _resources(allocated),
        "overhead": {
            "base_mib": config.capacity.qemu_overhead_base_mib,
            "per_gib_mib": config.capacity.qemu_overhead_per_gib_mib,
        },
        "domain_type": domain_type,
        "version": __version__,
        "nodes": [
            {
                "cluster": r.key.cluster,
                "name": r.key.name,
                "phase": r.phase.value,
                "message": r.message,
                "updated_at": r.updated_at,
                "spec_hash": r.spec.spec_hash(),
                "health": health(r.key).model_dump(mode="json"),
            }
            for r in records
        ],
        "networks": [{"cluster": c, "vni": v} for c, v in sorted(networks)],
        "images": [
            {
                "name": i.name,
                "digest": i.digest,
                "phase": i.status.phase.value,
                "message": i.status.message,
            }
            for i in images
        ],
    }


def _resources(r: Resources) -> dict[str, float]:
    return {"vcpus": r.vcpus, "memory_mib": r.memory_mib, "disk_gib": r.disk_gib}


@dataclass(frozen=True)
class ZoneStatus:
    """The connection as GET /v1/host shows it. registered: the zone accepted a report
    since the agent started; connected: the last beat succeeded; last_error: why the
    current run of failures fails (None while connected)."""

    url: str
    registered: bool
    connected: bool
    last_heartbeat: datetime | None
    last_error: str | None
    failures: int  # consecutive failed beats
    heartbeat_interval_s: float
    # mutual TLS: the host's certificate of the zone (None without mutual TLS)
    certificate: CertificateStatus | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "certificate": self.certificate.as_dict() if self.certificate else None,
            "url": self.url,
            "registered": self.registered,
            "connected": self.connected,
            "last_heartbeat": _stamp(self.last_heartbeat),
            "last_error": self.last_error,
            "failures": self.failures,
            "heartbeat_interval_s": self.heartbeat_interval_s,
        }


def _stamp(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


class BeatFailed(Exception):
    """One beat failed; kind is what the logging compares ("unreachable", "http 403")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ZoneClient:
    def __init__(
        self,
        url: str,
        host_id: str,
        token: str | None,
        report: Report,
        *,
        ca_file: Path | None = None,
        identity: ZoneIdentity | None = None,
        timeout_s: float = 10.0,
        first_interval_s: float = FIRST_INTERVAL_S,
        urls: Sequence[str] = (),
    ) -> None:
        self.url = url.rstrip("/")
        # urls: the zone's replicas (url among them): a beat moves on to the next one when
        # the current one is unreachable or answers 503 (common/failover.py).
        self._urls = Urls(list(urls) or [url])
        self.host_id = host_id
        self._token = token
        self._report = report
        self._identity = identity  # mutual TLS: its context presents the certificate
        if identity is not None:
            self._tls: ssl.SSLContext | None = identity.tls
        else:
            self._tls = _tls(ca_file) if url.startswith("https:") else None
        self._timeout_s = timeout_s
        self.interval_s = first_interval_s
        self._registered = False
        self._last_ok: datetime | None = None
        self._error: BeatFailed | None = None
        self._failures = 0

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/hosts/{self.host_id}"

    def status(self) -> ZoneStatus:
        return ZoneStatus(
            url=self.url,
            registered=self._registered,
            connected=self._error is None and self._last_ok is not None,
            last_heartbeat=self._last_ok,
            last_error=str(self._error) if self._error else None,
            failures=self._failures,
            heartbeat_interval_s=self.interval_s,
            certificate=self._identity.status() if self._identity else None,
        )

    def session(self) -> http.AsyncClient:
        """An HTTP client that carries the host token or presents the host's certificate;
        use it on one event loop."""
        return http.async_client(token=self._token, tls=self._tls, timeout_s=self._timeout_s)

    async def run(self) -> None:
        """Beat forever; nothing a beat meets ends the loop (only cancellation does)."""
        async with self.session() as session:
            while True:
                took = await self.beat(session)
                await self._pause(took)

    async def _pause(self, took: bool) -> None:
        """The interval after a beat, shortened after a failure; a wait for the first
        certificate of the zone ends as soon as it is there."""
        delay = self.interval_s if took else self.retry_in()
        if took or self._identity is None or self._identity.ready.is_set():
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._identity.ready.wait()

    def retry_in(self) -> float:
        """After a failed beat: the interval, shortened at random by up to half, so the
        hosts that lost a restarting zone together do not all return in the same instant
        (never longer: the zone counts the beats it misses)."""
        return jittered(self.interval_s)

    async def beat(self, session: http.AsyncClient) -> bool:
        """One report; True when the zone took it."""
        if self._identity is not None and not self._identity.ready.is_set():
            problem = self._identity.problem or "no certificate of the zone yet"
            self._failed(BeatFailed("certificate", f"no report without a certificate: {problem}"))
            return False
        try:
            answer = await first_serving(self._urls, partial(self._put_to, session), _moves_on)
        except BeatFailed as exc:
            self._failed(exc)
            return False
        except Exception as exc:  # e.g. building the report: the loop must go on
            self._failed(BeatFailed("crash", f"heartbeat crashed: {exc!r}"), exc_info=True)
            return False
        self._succeeded(answer)
        return True

    async def _put_to(self, session: http.AsyncClient, url: str) -> dict[str, Any]:
        self.url = url
        return await self._put(session)

    async def _put(self, session: http.AsyncClient) -> dict[str, Any]:
        body = self._report()
        try:
            async with asyncio.timeout(self._timeout_s):  # one deadline for the whole beat
                response = await session.put(self.endpoint, json=body)
        except (http.HTTPError, TimeoutError, OSError) as exc:
            if http.is_tls_error(exc):
                message = f"TLS with the zone failed ([zone] ca_file?): {exc}"
                raise BeatFailed("tls", message) from exc
            raise BeatFailed("unreachable", f"the zone is not reachable: {exc!r}") from exc
        if response.status_code >= 400:
            raise BeatFailed(
                f"http {response.status_code}",
                f"the zone answered {response.status_code}: {_error_text(response)}"
                + _hint(response.status_code),
            )
        try:
            answer = response.json()
        except ValueError as exc:
            raise BeatFailed("answer", f"the zone's answer is not JSON: {exc}") from exc
        if not isinstance(answer, dict):
            raise BeatFailed("answer", "the zone's answer is not a JSON object")
        return answer

    def _succeeded(self, answer: dict[str, Any]) -> None:
        interval = answer.get("heartbeat_interval_s")
        if isinstance(interval, int | float) and 0 < interval <= MAX_INTERVAL_S:
            self.interval_s = float(interval)
        if self._error is not None:
            log.info("the zone at %s takes reports again", self.url)
        elif not self._registered:
            log.info(
                "registered with the zone at %s as host %s (heartbeat every %gs)",
                self.url,
                self.host_id,
                self.interval_s,
            )
        self._registered = True
        self._error = None
        self._failures = 0
        self._last_ok = datetime.now(UTC)

    def _failed(self, error: BeatFailed, exc_info: bool = False) -> None:
        if self._error is None or self._error.kind != error.kind:
            log.warning(
                "heartbeat to %s failed, retrying every %gs: %s",
                self.url,
                self.interval_s,
                error,
                exc_info=exc_info,
            )
        self._error = error
        self._failures += 1


def _moves_on(error: Exception) -> bool:
    """A beat that failed so goes on to the next zone replica."""
    kinds = ("unreachable", f"http {FAILOVER_STATUS}")
    return isinstance(error, BeatFailed) and error.kind in kinds


def _tls(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return http.tls_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"zone.ca_file: cannot load {ca_file}: {exc}") from exc


def _error_text(response: http.Response) -> str:
    """The message of an error document (docs/zone.md), else the start of the body."""
    text = response.text
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300] or response.reason_phrase


def _hint(status: int) -> str:
    if status in (401, 403):
        return (
            " (the host's certificate of the zone, or on plain http [zone] token_file: "
            "`hostagent zone host-token HOST`)"
        )
    return ""
