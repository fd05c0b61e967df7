"""The agent's background loops besides the reconciler: each runs until cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common.errors import ProvisioningError
from hostagent.config import HealthConfig
from hostagent.model import NodeHealth, NodeKey
from hostagent.nodehealth import HealthBook, Observation, judge, reports_health, silence
from hostagent.reconciler import StartHistory
from hostagent.store import NodeRecord
from hostagent.store import now as store_now
from hostagent.virt.domain import DomainInfo
from network.health import PeerHealth, check_peers
from network.model import NetworkError

log = logging.getLogger(__name__)


class NetworkRewirer:
    """Rewires the cluster networks after peer lists changed; one pass covers every
    change made before it began."""

    def __init__(
        self, ensure_networks: Callable[[], Awaitable[None]], crashed: Callable[[], None]
    ) -> None:
        self._ensure = ensure_networks
        self._crashed = crashed
        self._dirty = asyncio.Event()

    def peers_changed(self, cluster: str) -> None:
        log.info("cluster %s: peer list changed, rewiring the cluster networks", cluster)
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._ensure()
            except ProvisioningError as exc:
                log.warning("rewiring after a peer change failed; the next resync retries: %s", exc)
            except Exception:  # this loop ending would restart the agent (watchdog)
                log.exception("rewiring after a peer change crashed; the next resync retries")
                self._crashed()


class PeerMonitor:
    """Underlay health: pings every peer host of every cluster, now and then; a check that
    fails keeps the last results (each says when it was made)."""

    def __init__(
        self,
        addresses: Callable[[], set[str]],
        interval_s: float,
        timeout_s: float,
        failed: Callable[[], None],
    ) -> None:
        self._addresses = addresses
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._failed = failed
        self.health: dict[str, PeerHealth] = {}

    async def run(self) -> None:
        while True:
            try:
                addresses = self._addresses()
                if addresses:
                    self.health = await check_peers(addresses, self._timeout_s)
            except NetworkError as exc:
                log.warning(
                    "checking the peers failed, next try in %.0fs: %s", self._interval_s, exc
                )
                self._failed()
            except Exception:  # this loop ending would restart the agent (watchdog)
                log.exception("checking the peers crashed, next try in %.0fs", self._interval_s)
                self._failed()
            await asyncio.sleep(self._interval_s)


class HealthMonitor:
    """Node health (nodehealth.judge) every check_interval_s, from the store, libvirt's
    domains, the reconciler's start history and the guests' reports. A pass that cannot
    list the domains changes no verdict: not seeing a VM is not seeing it stopped."""

    def __init__(
        self,
        book: HealthBook,
        records: Callable[[], list[NodeRecord]],
        domains: Callable[[], Awaitable[list[DomainInfo]]],
        starts: StartHistory,
        config: HealthConfig,
        failed: Callable[[], None],
    ) -> None:
        self.book = book
        self._records = records
        self._domains = domains
        self._starts = starts
        self._config = config
        self._failed = failed
        self._since = book.clock()  # a guest gets a full timeout after the agent starts

    async def check(self) -> None:
        running = {d.name: d.running for d in await self._domains()}
        records = self._records()
        now, stamp = self.book.clock(), store_now()
        for record in records:
            observed = self._observe(record, running, now)
            verdict = judge(observed, self._config, self._starts.window_s)
            before = self.book.get(record.key)
            health = self.book.record(record.key, verdict, stamp)
            if health.reason != before.reason:
                self._log(record.key, health)
        self.book.keep_only(r.key for r in records)

    def _observe(self, record: NodeRecord, running: dict[str, bool], now: float) -> Observation:
        key = record.key
        starts = self._starts.recent(key)
        last_start = starts[-1] if starts else None
        report = self.book.last_report(key)
        return Observation(
            phase=record.phase,
            deleting=record.deleting,
            message=record.message,
            running=running.get(key.domain, False),
            starts=len(starts),
            silent_s=silence(
                record.phase, now, self._since, last_start, report, reports_health(record.guest)
            ),
        )

    @staticmethod
    def _log(key: NodeKey, health: NodeHealth) -> None:
        if health.healthy:
            log.info("%s is healthy again", key)
        else:
            log.warning("%s is unhealthy (%s): %s", key, health.reason, health.message)

    async def run(self) -> None:
        blind = False  # warned that libvirt cannot be asked: once per outage
        while True:
            try:
                await self.check()
                blind = False
            except ProvisioningError as exc:
                if not blind:
                    log.warning("node health: cannot list the domains, verdicts kept: %s", exc)
                blind = True
            except Exception:  # this loop ending would restart the agent (watchdog)
                log.exception("node health check crashed; the next one retries")
                self._failed()
            await asyncio.sleep(self._config.check_interval_s)
