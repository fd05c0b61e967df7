"""Certificate renewal: the loop that renews nodes' certificates (`Renewer`).

Like cert-manager, a certificate is renewed 2/3 of the way through its actual lifetime
(pki.lifetime says when), with a fresh key each time. The service-account key is never
rotated: that would invalidate every token of the cluster (cert-operator exempts it for
the same reason). CAs are not rotated here.

How the guest notices: the files change in place under its read-only 9p mount, and
after each renewal the host rewrites `<dir>/.rotated` (a timestamp and the renewed
names). Components that reach the API through a kubeconfig naming certificate *files*
(kubelet, kube-proxy, controller-manager, scheduler) re-read them by themselves:
client-go reloads file-based client certificates every 5 minutes. Servers and the API
server's own client certificates (apiserver, etcd, the kubelet's serving certificate)
load them at start only, so the guest must restart them: a systemd *timer* (9p delivers
no inotify events for changes made on the host, so a path unit would never fire) runs a
oneshot every minute that compares `.rotated` with the copy it saw last and, on a
change, stops the static pods' containers (`crictl stop`; the kubelet starts them again
with the new files) and restarts the kubelet. The kubelet's `rotateCertificates` is NOT
what renews here: it asks the guest's API for new certificates, and the guest has no
CA key to sign them (see pki.layout).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from common.backoff import Backoff
from pki import files
from pki.certset import CA_FILES, DEFAULT_TTL
from pki.errors import PkiError
from pki.keys import KeyType
from pki.lifetime import RENEW_FRACTION, renew_at
from pki.provision import ensure_certificates

if TYPE_CHECKING:
    from pki.backend import Backend
    from pki.certset import NodeIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenewalTarget:
    """A provisioned node whose directory the Renewer keeps current."""

    node: NodeIdentity
    directory: Path
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class NodeRenewalStatus:
    """For metrics and the API, per node (cluster, name)."""

    soonest_expiry: datetime | None = None  # of its certificates, CAs excluded
    next_renewal: datetime | None = None
    failures: int = 0  # consecutive failed attempts; 0 after a success
    failures_total: int = 0
    renewals_total: int = 0  # certificates re-issued
    last_error: str = ""


@dataclass
class _State:
    status: NodeRenewalStatus = field(default_factory=NodeRenewalStatus)
    retry_at: float = 0.0  # monotonic; before it, a failed node is left alone


Targets = Callable[[], Iterable[RenewalTarget] | Awaitable[Iterable[RenewalTarget]]]


class Renewer:
    """Keeps every listed node's certificates renewed; `run()` forever, or `run_once()`.

    `targets` is called on every pass (sync or async) and lists the provisioned nodes;
    a node whose directory has no manifest yet is left to provisioning. The backend's
    own upkeep (`maintain`: the Vault token) runs on every pass as well.
    """

    def __init__(
        self,
        backend: Backend,
        targets: Targets,
        *,
        key_type: KeyType | None = None,  # None: keep each node's current key type
        ttl: timedelta = DEFAULT_TTL,
        fraction: float = RENEW_FRACTION,
        max_sleep: float = 3600.0,
        backoff_initial: float = 5.0,
        backoff_max: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        on_renewed: Callable[[str, str, list[str]], Awaitable[None]] | None = None,
    ) -> None:
        """on_renewed(cluster, node, certificate names): told after each renewal that
        rotated certificates (the agent keeps it as a node event)."""
        self.backend = backend
        self.on_renewed = on_renewed
        self.targets = targets
        self.key_type = key_type
        self.ttl = ttl
        self.fraction = fraction
        self.max_sleep = max_sleep
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._clock = clock
        self._states: dict[tuple[str, str], _State] = {}
        self._node_retry = self.retry()  # by each node's count of failures
        self._backend_retry = self.retry()

    def retry(self) -> Backoff:
        """Doubling from backoff_initial to backoff_max, with up to 10 % jitter so hosts
        that lost Vault together do not return together."""
        return Backoff(self.backoff_initial, self.backoff_max, jitter=0.1)

    def status(self) -> dict[tuple[str, str], NodeRenewalStatus]:
        return {key: state.status for key, state in self._states.items()}

    async def run(self) -> None:
        retry = self.retry()
        while True:
            try:
                delay = await self.run_once()
                retry.reset()
            except Exception:
                # Listing the nodes failed, or a bug: the loop must outlive it, or every
                # certificate would quietly run out.
                delay = retry.next()
                log.exception("certificate renewal pass failed; next try in %.0fs", delay)
            await asyncio.sleep(delay)

    async def run_once(self) -> float:
        """One pass over every node; the seconds until the next pass is needed."""
        targets = list(await _call(self.targets))
        listed = {(t.node.cluster, t.node.name) for t in targets}
        for gone in set(self._states) - listed:
            del self._states[gone]
        delays = [self.max_sleep, await self._maintain()]
        for target in targets:
            delays.append(await self._renew(target))
        return max(min(delays), 1.0)

    async def _maintain(self) -> float:
        try:
            delay = await asyncio.to_thread(self.backend.maintain)
        except PkiError as exc:
            log.warning("PKI backend upkeep failed: %s", exc)
            return self._backend_retry.next()
        self._backend_retry.reset()
        return delay

    async def _renew(self, target: RenewalTarget) -> float:
        state = self._states.setdefault((target.node.cluster, target.node.name), _State())
        if self._clock() < state.retry_at:
            return state.retry_at - self._clock()
        manifest = files.read_manifest(target.directory)
        if manifest is None:
            return self.max_sleep  # not provisioned yet: the agent's provisioning does that
        try:
            outcome = await ensure_certificates(
                self.backend,
                target.node,
                target.directory,
                key_type=self.key_type or KeyType(manifest.key_type),
                ttl=self.ttl,
                uid=target.uid,
                gid=target.gid,
                fraction=self.fraction,
            )
        except PkiError as exc:
            return self._failed(target, state, exc)
        except Exception as exc:  # a bug must not stop the other nodes' renewals
            log.exception("node %s/%s: renewal failed unexpectedly", *_key(target))
            return self._failed(target, state, exc)
        if outcome.rotated:
            log.info("node %s/%s: renewed %s", *_key(target), ", ".join(outcome.rotated))
            if self.on_renewed is not None:
                await self.on_renewed(*_key(target), list(outcome.rotated))
        state.retry_at = 0.0
        state.status = replace(
            self._scheduled(target.directory),
            failures_total=state.status.failures_total,
            renewals_total=state.status.renewals_total + len(outcome.rotated),
        )
        return _seconds_until(state.status.next_renewal, self.max_sleep)

    def _failed(self, target: RenewalTarget, state: _State, exc: Exception) -> float:
        failures = state.status.failures + 1
        delay = self._node_retry.delay(failures)
        state.retry_at = self._clock() + delay
        state.status = replace(
            state.status,
            failures=failures,
            failures_total=state.status.failures_total + 1,
            last_error=str(exc),
        )
        log.warning("node %s/%s: renewal failed (retry in %.0fs): %s", *_key(target), delay, exc)
        return delay

    def _scheduled(self, directory: Path) -> NodeRenewalStatus:
        manifest = files.read_manifest(directory)
        if manifest is None:
            return NodeRenewalStatus()
        ca_names = {cert.name for cert in CA_FILES.values()}
        leaves = [r for name, r in manifest.certs.items() if name not in ca_names]
        if not leaves:
            return NodeRenewalStatus()
        return NodeRenewalStatus(
            soonest_expiry=min(r.not_after for r in leaves),
            next_renewal=min(renew_at(r.not_before, r.not_after, self.fraction) for r in leaves),
        )


async def _call(targets: Targets) -> Iterable[RenewalTarget]:
    result = targets()
    if inspect.isawaitable(result):
        return await result
    return result


def _key(target: RenewalTarget) -> tuple[str, str]:
    return target.node.cluster, target.node.name


def _seconds_until(when: datetime | None, default: float) -> float:
    if when is None:
        return default
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
