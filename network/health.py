"""Underlay health: can this host reach its peers? One ICMP echo each, all at once.

icmplib's async API sends through raw sockets registered with the running event loop (the
agent runs as root, so privileged=True), so a check never blocks the loop: a silent peer
costs timeout_s of waiting, not of a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import icmplib  # type: ignore[import-untyped]

from network.model import NetworkError, ipv4

MAX_CONCURRENT = 64  # raw sockets open at once; each sees every ICMP packet the host gets


@dataclass(frozen=True)
class PeerHealth:
    """One check of one peer: rtt_ms is None when no reply came within the timeout."""

    address: str
    reachable: bool
    rtt_ms: float | None
    checked_at: datetime


async def check_peers(addresses: Iterable[str], timeout_s: float) -> dict[str, PeerHealth]:
    """Ping every peer's underlay address once; returns the result per address.

    Addresses must be IPv4 literals (no name lookups here). Raises NetworkError when the
    process may not open raw ICMP sockets (not root, no CAP_NET_RAW).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s}")
    peers = sorted({ipv4(address, "peer address") for address in addresses})
    limit = asyncio.Semaphore(MAX_CONCURRENT)
    results = await asyncio.gather(*(_check(peer, timeout_s, limit) for peer in peers))
    return {health.address: health for health in results}


async def _check(address: str, timeout_s: float, limit: asyncio.Semaphore) -> PeerHealth:
    async with limit:
        try:
            host = await icmplib.async_ping(address, count=1, timeout=timeout_s, privileged=True)
        except icmplib.SocketPermissionError as err:
            raise NetworkError(f"checking peers needs raw ICMP sockets (root): {err}") from err
        except icmplib.ICMPLibError:
            host = None
    checked_at = datetime.now(UTC)
    if host is None or not host.is_alive:
        return PeerHealth(address, reachable=False, rtt_ms=None, checked_at=checked_at)
    return PeerHealth(address, reachable=True, rtt_ms=float(host.avg_rtt), checked_at=checked_at)
