"""network.health.check_peers against real ICMP: a host namespace and a peer namespace.

    here (192.0.2.1/24) --veth-- peer (192.0.2.2/24); 192.0.2.99 is nobody.

check_peers runs inside "here": a thread enters the namespace and runs its own event loop
(raw sockets belong to the namespace of the thread that opens them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from pyroute2 import IPRoute, netns

from network.health import PeerHealth, check_peers
from tests.conftest import require

pytestmark = pytest.mark.integration

T = TypeVar("T")
PEER, NOBODY = "192.0.2.2", "192.0.2.99"


@pytest.fixture
def here() -> Iterator[str]:
    require(os.geteuid() == 0, "network namespace tests need root (and raw sockets)")
    run = uuid.uuid4().hex[:8]
    here, peer = f"hatest-{run}-here", f"hatest-{run}-peer"
    made: list[str] = []
    try:
        for name in (here, peer):
            netns.create(name)
            made.append(name)
        with IPRoute(netns=here, flags=0) as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer="eth0-peer")
            ipr.link("set", index=ipr.link_lookup(ifname="eth0-peer")[0], net_ns_fd=peer)
        for name, address, device in ((here, "192.0.2.1", "eth0"), (peer, PEER, "eth0-peer")):
            with IPRoute(netns=name, flags=0) as ipr:
                index = ipr.link_lookup(ifname=device)[0]
                ipr.addr("add", index=index, address=address, prefixlen=24)
                ipr.link("set", index=index, state="up")
        yield here
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                netns.remove(name)


def run_in(namespace: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    result: list[T] = []
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            netns.setns(namespace, flags=0)
            result.append(asyncio.run(main()))
        except BaseException as err:
            failure.append(err)

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def test_reachable_and_unreachable_peers(here: str) -> None:
    start = datetime.now(UTC)
    results = run_in(here, lambda: check_peers([PEER, NOBODY, PEER], timeout_s=0.5))
    assert set(results) == {PEER, NOBODY}
    peer, nobody = results[PEER], results[NOBODY]
    assert peer.reachable
    assert peer.rtt_ms is not None and 0 < peer.rtt_ms < 500
    assert nobody == PeerHealth(NOBODY, reachable=False, rtt_ms=None, checked_at=nobody.checked_at)
    for health in results.values():
        assert start <= health.checked_at <= datetime.now(UTC) + timedelta(seconds=1)


def test_checks_run_concurrently_and_never_block_the_loop(here: str) -> None:
    async def main() -> tuple[dict[str, PeerHealth], int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        began = time.monotonic()
        silent = [f"192.0.2.{n}" for n in range(100, 110)]
        # 1 s: a reply that the kernel gives at once can still wait that long for a loaded
        # machine (TCG guests booting on both cores) to run this process.
        results = await check_peers([PEER, *silent], timeout_s=1.0)
        took = time.monotonic() - began
        task.cancel()
        return results, ticks, took

    results, ticks, took = run_in(here, main)
    assert [address for address, health in results.items() if health.reachable] == [PEER]
    assert took < 3.0, "ten silent peers must cost one timeout, not ten"
    assert ticks >= 25, "the event loop kept running while waiting for replies"
