"""Whether a node works once it was created (pure): what the agent observed -> a verdict,
and since when each verdict holds. The zone replaces unhealthy nodes
(hostagent/zone/remediation.py); this only says which and why."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hostagent.config import HealthConfig
from hostagent.model import EtcdHealth, NodeHealth, NodeKey, Phase

HEALTHY = NodeHealth()


class Reason(enum.StrEnum):
    FAILED = "failed"
    CRASH_LOOP = "crash-loop"
    NOT_RUNNING = "vm-not-running"
    NOT_REPORTING = "guest-not-reporting"


@dataclass(frozen=True)
class Observation:
    """One node as the agent sees it. running: its domain runs (False: stopped or gone);
    starts: times the reconciler started it within the crash-loop window; silent_s: how
    long since the guest last reported (None: not watched, see silence())."""

    phase: Phase
    deleting: bool
    message: str
    running: bool
    starts: int
    silent_s: float | None


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    message: str


def judge(node: Observation, config: HealthConfig, window_s: float) -> Verdict | None:
    """None when healthy. Only a node that was created is judged: one being created or
    deleted has its phase to say how it goes."""
    if node.deleting:
        return None
    if node.phase is Phase.FAILED:
        return Verdict(Reason.FAILED, node.message)
    if node.phase not in (Phase.RUNNING, Phase.READY):
        return None
    if node.starts >= config.crash_loop_starts:
        return Verdict(
            Reason.CRASH_LOOP,
            f"the VM was started {node.starts} times in the last {window_s:.0f}s",
        )
    if not node.running:
        return Verdict(Reason.NOT_RUNNING, "the VM is not running and the agent did not stop it")
    if node.silent_s is not None and node.silent_s > config.report_timeout_s:
        return Verdict(
            Reason.NOT_REPORTING,
            f"the guest has not reported for {node.silent_s:.0f}s "
            f"(timeout {config.report_timeout_s:.0f}s)",
        )
    return None


def reports_health(guest: Mapping[str, Any] | None) -> bool:
    """Whether the guest said, when it phoned home, that it reports its health."""
    return bool(guest and guest.get("health_interval_s"))


def silence(
    phase: Phase,
    now: float,
    watched_from: float,
    last_start: float | None,
    report: float | None,
    reporter: bool,
) -> float | None:
    """How long the guest has been silent, if its silence counts: a Ready node's, or a
    Running one's whose guest reported since its VM last started (a VM being created or
    booting again is not silent yet: its phone-home is awaited), and only when its
    phone-home said it reports its health (reporter; a guest made before there were
    health reports never does). Counted from the last of watched_from (the agent's
    start), the VM's last start and the last report."""
    since_start = report is not None and (last_start is None or report > last_start)
    if not reporter or (phase is not Phase.READY and not (phase is Phase.RUNNING and since_start)):
        return None
    return now - max(watched_from, last_start or watched_from, report or watched_from)


def etcd_report(report: Mapping[str, Any]) -> bool | None:
    """Whether the guest's health report says its etcd member is healthy (None: the
    report has no "etcd"). ValueError when "etcd" is not {"healthy": true|false}."""
    etcd = report.get("etcd")
    if etcd is None:
        return None
    if not isinstance(etcd, dict) or not isinstance(etcd.get("healthy"), bool):
        raise ValueError('"etcd" must be {"healthy": true} or {"healthy": false}')
    healthy: bool = etcd["healthy"]
    return healthy


class HealthBook:
    """When each guest last reported (monotonic seconds), the last verdict of each node and
    since when it holds (a wall-clock string), and what a master last said of its etcd
    member. Kept in memory: after a restart the agent gives every guest a full
    report_timeout_s again, and knows no etcd health until the next report. clock: the
    monotonic seconds of the reports, the same as the reconciler's start history."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._health: dict[NodeKey, NodeHealth] = {}
        self._reports: dict[NodeKey, float] = {}
        self._etcd: dict[NodeKey, EtcdHealth] = {}

    def reported(self, key: NodeKey, etcd_healthy: bool | None = None, now: str = "") -> None:
        """A report from the guest; with etcd_healthy, its etcd member's health as of now."""
        self._reports[key] = self.clock()
        if etcd_healthy is not None:
            self._etcd[key] = EtcdHealth(healthy=etcd_healthy, checked_at=now)

    def last_report(self, key: NodeKey) -> float | None:
        return self._reports.get(key)

    def get(self, key: NodeKey) -> NodeHealth:
        health = self._health.get(key, HEALTHY)
        etcd = self._etcd.get(key)
        return health if etcd is None else health.model_copy(update={"etcd": etcd})

    def record(self, key: NodeKey, verdict: Verdict | None, now: str) -> NodeHealth:
        before = self._health.get(key, HEALTHY)
        if verdict is None:
            health = HEALTHY
        elif before.reason == verdict.reason.value:
            health = before.model_copy(update={"message": verdict.message})
        else:
            health = NodeHealth(
                healthy=False, reason=verdict.reason.value, message=verdict.message, since=now
            )
        self._health[key] = health
        return health

    def keep_only(self, keys: Iterable[NodeKey]) -> None:
        """Forget the nodes that are gone."""
        wanted = set(keys)
        self._health = {k: v for k, v in self._health.items() if k in wanted}
        self._reports = {k: v for k, v in self._reports.items() if k in wanted}
        self._etcd = {k: v for k, v in self._etcd.items() if k in wanted}

    def unhealthy(self) -> dict[tuple[str, str], str]:
        """(cluster, node) -> reason of each unhealthy node (the metric's labels)."""
        return {(k.cluster, k.name): v.reason for k, v in self._health.items() if not v.healthy}
