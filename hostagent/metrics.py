"""Prometheus metrics of one agent, in a registry of its own (tests run several agents)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hostagent.model import Phase


class Metrics:
    def __init__(
        self, phases: Callable[[], dict[Phase, int]], reconnects: Callable[[], int]
    ) -> None:
        self.registry = CollectorRegistry()
        self.nodes = Gauge(
            "hostagent_nodes", "Nodes on this host by phase", ["phase"], registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "hostagent_reconcile_duration_seconds",
            "Time one reconcile of one node took",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "hostagent_reconcile_errors", "Reconcile attempts that failed", registry=self.registry
        )
        self.libvirt_reconnects = Gauge(
            "hostagent_libvirt_reconnects",
            "Times the agent reconnected to libvirtd since it started",
            registry=self.registry,
        )
        self.phone_homes = Counter(
            "hostagent_phone_home", "Phone-home calls by result", ["result"], registry=self.registry
        )
        self._phases = phases
        self._reconnects = reconnects

    def render(self) -> bytes:
        counts = self._phases()
        for phase in Phase:
            self.nodes.labels(phase=phase.value).set(counts.get(phase, 0))
        self.libvirt_reconnects.set(self._reconnects())
        return generate_latest(self.registry)
