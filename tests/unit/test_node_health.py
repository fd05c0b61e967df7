"""Node health: the verdicts (pure), then the HealthMonitor over the real Reconciler, Store,
Provisioner and libvirt's in-process test driver (the `world` of test_reconciler_faults):
a VM that is not running, one that crash-loops, a guest that stops reporting, and each
back to healthy once the cause is gone."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import libvirt
import pytest

from hostagent.config import HealthConfig
from hostagent.errors import LibvirtUnavailable
from hostagent.images import ImageCatalog
from hostagent.loops import HealthMonitor
from hostagent.metrics import Metrics
from hostagent.model import EtcdHealth, NodeHealth, NodeKey, Phase
from hostagent.nodehealth import (
    HealthBook,
    Observation,
    Reason,
    etcd_report,
    judge,
    reports_health,
    silence,
)
from hostagent.nodes import NodeService
from hostagent.reconciler import StartHistory
from hostagent.store import NodeRecord
from hostagent.virt.domain import DomainInfo
from tests.unit.test_reconciler_faults import SPEC, World, until
from tests.unit.test_reconciler_faults import world as world  # the fixture

CONFIG = HealthConfig()
REPORTER = b'{"health_interval_s": 30}'  # what a guest that reports its health phones home with
WINDOW_S = 600.0
FINE = Observation(Phase.READY, False, "", running=True, starts=1, silent_s=10.0)


@pytest.mark.parametrize(
    ("observed", "reason"),
    [
        (FINE, None),
        (replace(FINE, running=False), Reason.NOT_RUNNING),
        (replace(FINE, starts=3), Reason.CRASH_LOOP),
        (replace(FINE, starts=3, running=False), Reason.CRASH_LOOP),
        (replace(FINE, silent_s=121.0), Reason.NOT_REPORTING),
        (replace(FINE, silent_s=None), None),  # never phoned home: nothing to miss
        (replace(FINE, phase=Phase.RUNNING, running=False), Reason.NOT_RUNNING),
        (replace(FINE, phase=Phase.FAILED, message="boom"), Reason.FAILED),
        (replace(FINE, phase=Phase.PROVISIONING, running=False), None),
        (replace(FINE, deleting=True, running=False), None),  # the agent stops it
    ],
)
def test_verdicts(observed: Observation, reason: Reason | None) -> None:
    verdict = judge(observed, CONFIG, WINDOW_S)
    assert (verdict.reason if verdict else None) is reason


@pytest.mark.parametrize(
    ("phase", "last_start", "report", "silent"),
    [
        (Phase.READY, 10.0, 150.0, 50.0),  # from the last report
        (Phase.READY, None, None, 100.0),  # from the agent's start (after a restart of it)
        (Phase.READY, 120.0, 50.0, 80.0),  # the VM started again: from that start
        (Phase.RUNNING, 120.0, 50.0, None),  # booting again, its phone-home awaited
        (Phase.RUNNING, 120.0, 130.0, 70.0),  # reported since it started: watched
        (Phase.RUNNING, None, None, None),  # never reported
        (Phase.PROVISIONING, None, 150.0, None),
    ],
)
def test_silence_counts_once_the_guest_has_spoken(
    phase: Phase, last_start: float | None, report: float | None, silent: float | None
) -> None:
    assert silence(phase, 200.0, 100.0, last_start, report, reporter=True) == silent
    # A guest that never said it reports its health (made by an older agent) is not silent.
    assert silence(phase, 200.0, 100.0, last_start, report, reporter=False) is None


def test_a_guest_reports_its_health_if_its_phone_home_says_so() -> None:
    assert reports_health({"health_interval_s": 30})
    assert not reports_health({"hostname": "w1"})
    assert not reports_health(None)


def test_since_holds_while_the_reason_does() -> None:
    book = HealthBook()
    key = NodeKey(cluster="alpha", name="w1")
    down = judge(replace(FINE, running=False), CONFIG, WINDOW_S)
    first = book.record(key, down, "t1")
    assert first == NodeHealth(
        healthy=False, reason="vm-not-running", message=first.message, since="t1"
    )
    assert book.record(key, down, "t2").since == "t1"
    looping = judge(replace(FINE, starts=4), CONFIG, WINDOW_S)
    assert book.record(key, looping, "t3").since == "t3"
    assert book.unhealthy() == {("alpha", "w1"): "crash-loop"}
    assert book.record(key, None, "t4") == NodeHealth()
    assert book.unhealthy() == {}


def test_a_masters_etcd_report_is_kept_beside_the_verdict_until_the_node_goes() -> None:
    assert etcd_report({"kubelet": "active"}) is None
    assert etcd_report({"etcd": {"healthy": False}}) is False
    for bad in ({"etcd": True}, {"etcd": {"healthy": "true"}}, {"etcd": []}):
        with pytest.raises(ValueError, match="etcd"):
            etcd_report(bad)
    book = HealthBook()
    key = NodeKey(cluster="alpha", name="m1")
    book.reported(key, True, "t1")
    book.reported(key)  # a report without etcd leaves the last word on it
    assert book.get(key).etcd == EtcdHealth(healthy=True, checked_at="t1")
    down = judge(replace(FINE, running=False), CONFIG, WINDOW_S)
    assert book.record(key, down, "t2").etcd is None  # the verdict alone
    sick = book.get(key)
    assert (sick.healthy, sick.since, sick.etcd) == (
        False,
        "t2",
        EtcdHealth(healthy=True, checked_at="t1"),
    )
    book.reported(key, False, "t3")
    assert book.get(key).etcd == EtcdHealth(healthy=False, checked_at="t3")
    book.keep_only([])
    assert book.get(key) == NodeHealth()


# --- on the reconciler ----------------------------------------------------------------------


@dataclass
class Watch:
    world: World
    monitor: HealthMonitor
    service: NodeService
    metrics: Metrics
    offset: float = 0.0  # added to the health book's clock: time passing without waiting

    def health(self) -> NodeHealth:
        return self.service.get(self.world.key).status.health

    def unhealthy_metric(self, reason: str) -> float | None:
        labels = {"cluster": self.world.key.cluster, "node": self.world.key.name, "reason": reason}
        self.metrics.render()
        return self.metrics.registry.get_sample_value("hostagent_node_unhealthy", labels)

    def stop_vm(self) -> None:
        """The VM dies under the agent (the agent did not stop it)."""
        conn = libvirt.open("test:///default")
        try:
            conn.lookupByName(self.world.key.domain).destroy()
        finally:
            conn.close()

    async def restarted(self) -> None:
        """libvirt's lifecycle event reaches the reconciler, which starts the VM again and
        then records it Running (the domain is active a moment before the record)."""
        self.world.reconciler.enqueue(self.world.key)
        await until(lambda: self._running() and self.world.node().phase is Phase.RUNNING)

    def _running(self) -> bool:
        conn = libvirt.open("test:///default")
        try:
            return bool(conn.lookupByName(self.world.key.domain).isActive())
        finally:
            conn.close()


@pytest.fixture
async def watch(world: World) -> Watch:
    holder: list[Watch] = []
    book = HealthBook(clock=lambda: time.monotonic() + (holder[0].offset if holder else 0.0))
    metrics = Metrics(lambda: {}, lambda: 0, lambda: {}, lambda: {}, unhealthy=book.unhealthy)
    config = world.provisioner.config
    images = ImageCatalog(config.images)
    service = NodeService(config, world.store, images, None, lambda _: None, book)  # type: ignore[arg-type]
    monitor = HealthMonitor(
        book,
        world.store.all,
        lambda: world.virt.owned_domains(config.host_id),
        world.reconciler.starts,
        CONFIG,
        lambda: None,
    )
    holder.append(Watch(world, monitor, service, metrics))
    await world.put()
    await until(lambda: world.node().phase is Phase.RUNNING)
    return holder[0]


async def test_a_vm_that_is_not_running_is_unhealthy_until_it_runs_again(watch: Watch) -> None:
    await watch.monitor.check()
    assert watch.health() == NodeHealth()
    watch.stop_vm()
    await watch.monitor.check()
    health = watch.health()
    assert (health.healthy, health.reason) == (False, "vm-not-running")
    assert health.since is not None
    assert watch.unhealthy_metric("vm-not-running") == 1
    await watch.monitor.check()
    assert watch.health().since == health.since  # the same episode
    await watch.restarted()
    await watch.monitor.check()
    assert watch.health() == NodeHealth()
    assert watch.unhealthy_metric("vm-not-running") is None


async def test_a_vm_that_keeps_dying_crash_loops_then_fails(watch: Watch) -> None:
    for _ in range(CONFIG.crash_loop_starts - 1):  # the first start was the creation
        watch.stop_vm()
        await watch.restarted()
    await watch.monitor.check()
    health = watch.health()
    assert (health.healthy, health.reason) == (False, "crash-loop")
    assert f"started {CONFIG.crash_loop_starts} times" in health.message
    assert watch.unhealthy_metric("crash-loop") == 1
    # The reconciler gives up at its own limit: the node fails, still unhealthy.
    limit = watch.world.reconciler.config.crash_loop_starts
    for _ in range(limit - CONFIG.crash_loop_starts):
        watch.stop_vm()
        await watch.restarted()
    watch.stop_vm()
    watch.world.reconciler.enqueue(watch.world.key)
    await until(lambda: watch.world.node().phase is Phase.FAILED)
    await watch.monitor.check()
    assert watch.health().reason == "failed"
    assert "started" in watch.health().message


async def test_a_guest_that_stops_reporting_is_unhealthy_until_it_reports(watch: Watch) -> None:
    world, key = watch.world, watch.world.key
    await watch.service.phone_home(key, world.node().token, REPORTER)
    assert world.node().phase is Phase.READY
    watch.offset = CONFIG.report_timeout_s - 5
    await watch.monitor.check()
    assert watch.health().healthy
    watch.offset = CONFIG.report_timeout_s + 5
    await watch.monitor.check()
    health = watch.health()
    assert (health.healthy, health.reason) == (False, "guest-not-reporting")
    assert watch.unhealthy_metric("guest-not-reporting") == 1
    # The guest's timer posts again: healthy at the next check.
    watch.service.guest_health(key, world.node().token, b'{"kubelet": "active"}')
    await watch.monitor.check()
    assert watch.health() == NodeHealth()


async def test_a_guest_booting_again_is_not_silent_until_it_has_spoken(watch: Watch) -> None:
    world, key = watch.world, watch.world.key
    await watch.service.phone_home(key, world.node().token, REPORTER)
    watch.stop_vm()
    await watch.restarted()  # Running again; cloud-init does not phone home twice
    assert world.node().phase is Phase.RUNNING
    watch.offset = CONFIG.report_timeout_s * 2
    await watch.monitor.check()
    assert watch.health() == NodeHealth()
    watch.service.guest_health(key, world.node().token, b"{}")  # its timer runs again
    watch.offset += CONFIG.report_timeout_s + 5
    await watch.monitor.check()
    assert watch.health().reason == "guest-not-reporting"


async def test_a_guest_made_before_health_reports_is_never_silent(watch: Watch) -> None:
    world, key = watch.world, watch.world.key
    await watch.service.phone_home(key, world.node().token, b'{"hostname": "m1"}')
    watch.offset = CONFIG.report_timeout_s * 10
    await watch.monitor.check()
    assert watch.health() == NodeHealth()


async def test_a_node_the_agent_deletes_is_never_unhealthy(watch: Watch) -> None:
    await watch.service.delete(watch.world.key)
    watch.world.reconciler.enqueue(watch.world.key)
    await until(lambda: watch.world.store.get(watch.world.key) is None)
    await watch.monitor.check()
    assert watch.monitor.book.unhealthy() == {}


async def test_a_pass_blind_to_libvirt_keeps_the_verdicts_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = NodeKey(cluster="alpha", name="w1")
    record = NodeRecord(key, SPEC, "t", Phase.READY, "", "", False, {}, 1)
    book = HealthBook()
    outage = {"on": False}
    calls = {"n": 0}

    async def domains() -> list[DomainInfo]:
        calls["n"] += 1
        if outage["on"]:
            raise LibvirtUnavailable("libvirtd is not answering")
        return []  # the VM is gone: not running

    config = HealthConfig(check_interval_s=0.01)
    monitor = HealthMonitor(
        book, lambda: [record], domains, StartHistory(5, 600), config, lambda: None
    )
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: book.get(key).reason == "vm-not-running")
        since = book.get(key).since
        outage["on"], seen = True, calls["n"]
        await until(lambda: calls["n"] >= seen + 5)
        assert book.get(key).since == since  # kept, not judged again
        warnings = [r for r in caplog.records if "cannot list the domains" in r.message]
        assert len(warnings) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
