"""The agent's background loops outlive an unexpected error: they log it, count it in
hostagent_loop_errors_total{loop} and go on (one ending would stop the watchdog pings and
systemd would restart the whole agent). Mocks only inject the one failure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pytest_mock import MockerFixture

from hostagent import loops
from hostagent.config import ReconcilerConfig
from hostagent.loops import NetworkRewirer, PeerMonitor
from hostagent.metrics import Metrics
from hostagent.model import NodeKey
from hostagent.reconciler import Reconciler
from hostagent.store import Store
from hostagent.virt.domain import DomainInfo, DomainMeta
from network.health import PeerHealth
from network.model import NetworkError


def metrics() -> Metrics:
    return Metrics(lambda: {}, lambda: 0, lambda: {}, lambda: {})


def loop_errors(m: Metrics, loop: str) -> float:
    value = m.registry.get_sample_value("hostagent_loop_errors_total", {"loop": loop})
    assert value is not None, f"no hostagent_loop_errors_total series for {loop}"
    return value


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


def test_every_loop_has_a_series_from_the_start() -> None:
    text = metrics().render().decode()
    for loop in ("peers", "reconciler", "rewirer"):
        assert f'hostagent_loop_errors_total{{loop="{loop}"}} 0.0' in text


# --- the peer check loop ----------------------------------------------------------------------


async def test_the_peer_loop_goes_on_after_a_network_error(
    mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = {"10.250.0.12": PeerHealth("10.250.0.12", True, 0.1, datetime.now(UTC))}
    failures = [NetworkError("no raw sockets")]

    async def check_peers(addresses: set[str], timeout_s: float) -> dict[str, PeerHealth]:
        if failures:
            raise failures.pop()
        return healthy

    check = mocker.patch.object(loops, "check_peers", side_effect=check_peers)
    m = metrics()
    monitor = PeerMonitor(lambda: {"10.250.0.12"}, 0.001, 1.0, lambda: m.loop_error("peers"))
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: check.call_count >= 2)
        assert not task.done()
        assert monitor.health == healthy
    finally:
        task.cancel()
    assert loop_errors(m, "peers") == 1
    assert "no raw sockets" in caplog.text


async def test_the_rewiring_loop_counts_what_it_survives() -> None:
    calls: list[int] = []

    async def ensure_networks() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    m = metrics()
    rewirer = NetworkRewirer(ensure_networks, lambda: m.loop_error("rewirer"))
    task = asyncio.create_task(rewirer.run())
    try:
        rewirer.peers_changed("alpha")
        await until(lambda: len(calls) == 1 and loop_errors(m, "rewirer") == 1)
        rewirer.peers_changed("alpha")
        await until(lambda: len(calls) == 2)
        assert not task.done()
    finally:
        task.cancel()
    assert loop_errors(m, "rewirer") == 1


# --- the reconciler's loop --------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


def domain(name: str, cluster: str, node: str) -> DomainInfo:
    meta = DomainMeta(cluster=cluster, node=node, host="h1", spec_hash="x")
    return DomainInfo(name=name, meta=meta, running=True, domain_id=1)


def reconciler(store: Store, m: Metrics, owned: Any) -> Reconciler:
    virt = SimpleNamespace(owned_domains=owned)
    provisioner: Any = SimpleNamespace(virt=virt, ensure_networks=lambda records: asyncio.sleep(0))
    config = ReconcilerConfig(concurrency=1, resync_interval_s=0.001)
    return Reconciler(store, provisioner, config, m, "h1", shutdown_timeout_s=1.0)


async def test_a_domain_with_bad_metadata_is_skipped_not_fatal(
    store: Store, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    async def owned(host: str) -> list[DomainInfo]:
        return [
            domain("Bad_Cluster-m1", "Bad_Cluster", "m1"),
            domain("alpha-../x", "alpha", "../x"),
            domain("alpha-w1", "alpha", "w1"),
        ]

    m = metrics()
    r = reconciler(store, m, owned)
    enqueue = mocker.spy(r, "enqueue")
    await r.resync()
    await r.resync()  # a second pass warns no more
    assert [c.args for c in enqueue.call_args_list] == [(NodeKey(cluster="alpha", name="w1"),)] * 2
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "Bad_Cluster-m1" in caplog.text
    assert loop_errors(m, "reconciler") == 2


async def test_the_reconciler_loop_goes_on_after_an_unexpected_error(
    store: Store, mocker: MockerFixture
) -> None:
    m = metrics()
    failures = [RuntimeError("boom")]

    async def owned_domains(host: str) -> list[DomainInfo]:
        if failures:
            raise failures.pop()
        return []

    owned = mocker.AsyncMock(side_effect=owned_domains)
    r = reconciler(store, m, owned)
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: owned.call_count >= 3)
        assert not task.done()
    finally:
        task.cancel()
    assert loop_errors(m, "reconciler") == 1
