"""The agent's background loops besides the reconciler: each runs until cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common.errors import ProvisioningError
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
