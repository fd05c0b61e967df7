"""hostagent.zoneclient against FakeZone (tests/fakezone.py), an in-process stand-in for the
zone: the report's body, registration, the interval the zone asks for, retries, logging
once per state change, TLS with [zone] ca_file, and the metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from hostagent import __version__
from hostagent.capacity import Resources
from hostagent.config import CapacityConfig, Config, NetworkConfig, ZoneConfig
from hostagent.imagesource import ImageInfo, ImagePhase, ImageStatus
from hostagent.metrics import Metrics
from hostagent.model import NodeHealth, NodeKey, NodeSpec, Phase
from hostagent.store import Store
from hostagent.zone.model import HostReport, ReportedHealth
from hostagent.zoneclient import ZoneClient, host_report
from tests.fakezone import FakeZone, free_port, serve_tls, tls_files

TOKEN = "host-token-h1"
SPEC = NodeSpec.model_validate(
    {
        "role": "master",
        "vcpus": 2,
        "memory_mib": 2048,
        "disk_gib": 20,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4100, "address": "10.128.0.10/24", "gateway": "10.128.0.254"},
    }
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


@pytest.fixture
def zone() -> FakeZone:
    return FakeZone({"h1": TOKEN, "h2": "host-token-h2"}, heartbeat_interval_s=0.02)


@pytest.fixture
async def zone_url(zone: FakeZone) -> AsyncIterator[str]:
    async with TestServer(zone.app()) as server:
        yield str(server.make_url("")).rstrip("/")


def config(tmp_path: Path, url: str = "http://127.0.0.1:8471") -> Config:
    return Config(
        host_id="h1",
        state_dir=tmp_path,
        capacity=CapacityConfig(qemu_overhead_base_mib=200, qemu_overhead_per_gib_mib=20),
        network=NetworkConfig(underlay_address="10.250.0.11"),
        zone=ZoneConfig(url=url, token_file=tmp_path / "zone-token", failure_domain="rack-1"),
    )


SICK = NodeHealth(
    healthy=False, reason="vm-not-running", message="gone", since="2026-12-07T05:00:00Z"
)


PULLED = ImageInfo(
    name="debian-12",
    origin="pulled",
    digest="sha256:" + "ab" * 32,
    status=ImageStatus(phase=ImagePhase.FAILED, message="digest mismatch", updated_at="t"),
)


def reporter(cfg: Config, store: Store, health: NodeHealth = SICK) -> Any:
    return lambda: host_report(
        cfg,
        api_token="agent-api-token",
        allocatable=Resources(12.0, 30720, 490),
        allocated=Resources(2.0, 2288, 20),
        domain_type="kvm",
        records=store.all(),
        health=lambda key: health,
        images=[PULLED],
    )


def client(url: str, report: Any, token: str = TOKEN, **kwargs: Any) -> ZoneClient:
    kwargs.setdefault("first_interval_s", 0.02)
    return ZoneClient(url, "h1", token, report, **kwargs)


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# --- the report -------------------------------------------------------------------------------


async def test_the_report_is_the_body_of_docs_zone_md(
    tmp_path: Path, store: Store, zone: FakeZone, zone_url: str
) -> None:
    await store.create(NodeKey(cluster="demo", name="m1"), SPEC, "node-token")
    await store.set_phase(NodeKey(cluster="demo", name="m1"), Phase.RUNNING, "")
    record = store.all()[0]
    beats = client(zone_url, reporter(config(tmp_path), store))
    async with beats.session() as session:
        assert await beats.beat(session) is True

    assert [host for host, _ in zone.reports] == ["h1"]
    assert zone.reports[0][1] == {
        "api_url": "http://127.0.0.1:8470",
        "api_token": "agent-api-token",
        "underlay_address": "10.250.0.11",
        "failure_domain": "rack-1",
        "allocatable": {"vcpus": 12.0, "memory_mib": 30720, "disk_gib": 490},
        "allocated": {"vcpus": 2.0, "memory_mib": 2288, "disk_gib": 20},
        "overhead": {"base_mib": 200, "per_gib_mib": 20},
        "domain_type": "kvm",
        "version": __version__,
        "nodes": [
            {
                "cluster": "demo",
                "name": "m1",
                "phase": "Running",
                "message": "",
                "updated_at": record.updated_at,
                "spec_hash": SPEC.spec_hash(),
                "health": {
                    "healthy": False,
                    "reason": "vm-not-running",
                    "message": "gone",
                    "since": "2026-12-07T05:00:00Z",
                    "etcd": None,
                },
            }
        ],
        "networks": [{"cluster": "demo", "vni": 4100}],
        "images": [
            {
                "name": "debian-12",
                "digest": "sha256:" + "ab" * 32,
                "phase": "Failed",
                "message": "digest mismatch",
            }
        ],
    }
    (taken,) = HostReport.model_validate(zone.reports[0][1]).nodes
    assert taken.health == ReportedHealth.model_validate(SICK.model_dump())
    assert zone.headers[0]["Authorization"] == f"Bearer {TOKEN}"
    assert zone.reports[0][0] == "h1"


async def test_networks_are_listed_once_per_cluster(tmp_path: Path, store: Store) -> None:
    for name, address in (("m1", "10.128.0.10/24"), ("w1", "10.128.0.11/24")):
        network = {**SPEC.network.model_dump(mode="json"), "address": address}
        spec = SPEC.model_copy(update={"network": SPEC.network.model_validate(network)})
        await store.create(NodeKey(cluster="demo", name=name), spec, "t")
    report = reporter(config(tmp_path), store)()
    assert report["networks"] == [{"cluster": "demo", "vni": 4100}]
    assert [node["name"] for node in report["nodes"]] == ["m1", "w1"]


# --- registration, interval, retries ----------------------------------------------------------


async def test_registers_then_beats_at_the_zones_interval(
    tmp_path: Path, store: Store, zone: FakeZone, zone_url: str
) -> None:
    zone.heartbeat_interval_s = 0.05
    beats = client(zone_url, reporter(config(tmp_path), store), first_interval_s=5.0)
    status = beats.status()
    assert (status.registered, status.connected, status.last_heartbeat) == (False, False, None)
    task = asyncio.create_task(beats.run())
    try:
        await until(lambda: len(zone.reports) >= 3)  # 3 beats: not 5 s apart, but 0.05 s
    finally:
        task.cancel()
    status = beats.status()
    assert status.registered and status.connected
    assert status.last_error is None and status.failures == 0
    assert status.heartbeat_interval_s == 0.05
    assert status.last_heartbeat is not None
    assert dt.datetime.now(dt.UTC) - status.last_heartbeat < dt.timedelta(seconds=5)
    assert status.as_dict()["url"] == zone_url


async def test_failures_are_retried_and_logged_once_per_state_change(
    tmp_path: Path,
    store: Store,
    zone: FakeZone,
    zone_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.zoneclient")
    zone.failures = [503, 503, 503, 403, 403]
    beats = client(zone_url, reporter(config(tmp_path), store))
    task = asyncio.create_task(beats.run())
    try:
        await until(lambda: beats.status().failures == 3)
        status = beats.status()
        assert not status.registered and not status.connected
        assert status.last_error is not None and "503" in status.last_error
        assert "injected failure 503" in status.last_error  # the zone's own message
        await until(lambda: beats.status().failures == 5)
        assert "403" in (beats.status().last_error or "")
        await until(lambda: beats.status().registered)
    finally:
        task.cancel()
    assert beats.status().connected and beats.status().failures == 0
    assert len(zone.reports) >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # once for the 503s, once when they became 403s
    assert "503" in warnings[0] and "403" in warnings[1]
    assert "host-token" in warnings[1]  # says what to check
    assert any("takes reports again" in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


async def test_an_unreachable_zone_never_ends_the_loop(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hostagent.zoneclient")
    beats = client(f"http://127.0.0.1:{free_port()}", reporter(config(tmp_path), store))
    task = asyncio.create_task(beats.run())
    try:
        await until(lambda: beats.status().failures >= 4)
        assert not task.done()
    finally:
        task.cancel()
    status = beats.status()
    assert not status.registered and not status.connected
    assert "not reachable" in (status.last_error or "")
    assert status.heartbeat_interval_s == 0.02  # the first interval until a zone answers
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_a_failed_beat_is_retried_within_the_interval_at_random() -> None:
    beats = client("http://127.0.0.1:9", dict, first_interval_s=4.0)
    delays = [beats.retry_in() for _ in range(200)]
    assert all(2.0 <= delay <= 4.0 for delay in delays)  # never later: the zone counts beats
    assert len(set(delays)) > 100  # hosts that lost the zone together come back apart


async def test_a_slow_zone_times_out(
    tmp_path: Path, store: Store, zone: FakeZone, zone_url: str
) -> None:
    zone.delay_s = 1.0
    beats = client(zone_url, reporter(config(tmp_path), store), timeout_s=0.1)
    async with beats.session() as session:
        assert await beats.beat(session) is False
    assert "not reachable" in (beats.status().last_error or "")


async def test_a_crashing_report_is_a_failed_beat(zone_url: str) -> None:
    def report() -> dict[str, Any]:
        raise RuntimeError("store gone")

    beats = client(zone_url, report)
    async with beats.session() as session:
        assert await beats.beat(session) is False
        assert "store gone" in (beats.status().last_error or "")


async def test_another_hosts_token_is_403(
    tmp_path: Path, store: Store, zone: FakeZone, zone_url: str
) -> None:
    beats = client(zone_url, reporter(config(tmp_path), store), token="host-token-h2")
    async with beats.session() as session:
        assert await beats.beat(session) is False
    assert "403" in (beats.status().last_error or "")
    assert zone.reports == []


@pytest.mark.parametrize("interval", [0, -1, "5", None, 1e9])
async def test_a_bad_interval_in_the_answer_is_ignored(
    tmp_path: Path, store: Store, zone: FakeZone, zone_url: str, interval: Any
) -> None:
    zone.heartbeat_interval_s = interval
    beats = client(zone_url, reporter(config(tmp_path), store), first_interval_s=5.0)
    async with beats.session() as session:
        assert await beats.beat(session) is True
    assert beats.status().heartbeat_interval_s == 5.0


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture
async def tls_zone(zone: FakeZone, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    ca_file, context = tls_files(tmp_path)
    runner, url = await serve_tls(zone.app(), context)
    try:
        yield url, ca_file
    finally:
        await runner.cleanup()


async def test_tls_is_verified_with_the_ca_file(
    tmp_path: Path, store: Store, zone: FakeZone, tls_zone: tuple[str, Path]
) -> None:
    url, ca_file = tls_zone
    trusting = client(url, reporter(config(tmp_path), store), ca_file=ca_file)
    async with trusting.session() as session:
        assert await trusting.beat(session) is True
    assert len(zone.reports) == 1

    system_cas = client(url, reporter(config(tmp_path), store))
    async with system_cas.session() as session:
        assert await system_cas.beat(session) is False
    assert "TLS" in (system_cas.status().last_error or "")
    assert len(zone.reports) == 1


# --- metrics ----------------------------------------------------------------------------------


async def test_metrics_show_the_zone(
    tmp_path: Path, store: Store, zone: FakeZone, zone_url: str
) -> None:
    beats = client(zone_url, reporter(config(tmp_path), store))
    metrics = Metrics(dict, lambda: 0, dict, dict, beats.status)
    assert b"hostagent_zone_connected 0.0" in metrics.render()
    zone.failures = [500]
    async with beats.session() as session:
        await beats.beat(session)
        assert b"hostagent_zone_heartbeat_failures 1.0" in metrics.render()
        await beats.beat(session)
    text = metrics.render().decode()
    assert "hostagent_zone_connected 1.0" in text
    assert "hostagent_zone_heartbeat_failures 0.0" in text
    line = next(x for x in text.splitlines() if x.startswith("hostagent_zone_last_heartbeat"))
    assert float(line.split()[1]) > 0


def test_standalone_metrics_have_no_zone_series() -> None:
    metrics = Metrics(dict, lambda: 0, dict, dict)
    assert b"hostagent_zone" not in metrics.render()
