"""Prometheus metrics of one agent and of the zone, each in a registry of its own (tests run
several in one process); the only module that imports prometheus_client."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hostagent.model import Phase
from hostagent.zoneclient import ZoneStatus
from pki.renewal import NodeRenewalStatus

RenewalStatus = Callable[[], dict[tuple[str, str], NodeRenewalStatus]]
Expiries = Callable[[], dict[tuple[str, str], datetime]]
# The agent's background loops that count the errors they survive.
LOOPS = ("health", "images", "peers", "reconciler", "rewirer")
# (cluster, node) -> why the node is unhealthy (nodehealth.Reason), for unhealthy nodes only
Unhealthy = Callable[[], dict[tuple[str, str], str]]


class Metrics:
    def __init__(
        self,
        phases: Callable[[], dict[Phase, int]],
        reconnects: Callable[[], int],
        renewals: RenewalStatus,
        expiries: Expiries,
        zone: Callable[[], ZoneStatus] | None = None,
        kvm_unusable: Callable[[], bool] = lambda: False,
        unhealthy: Unhealthy = dict,
        images: Callable[[], dict[str, int]] = dict,
        image_bytes: Callable[[], int] = lambda: 0,
        peers: Callable[[], dict[str, bool]] = dict,
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
        self.loop_errors = Counter(
            "hostagent_loop_errors",
            "Unexpected errors a background loop logged and went on after, by loop",
            ["loop"],
            registry=self.registry,
        )
        for loop in LOOPS:
            self.loop_errors.labels(loop=loop)  # every series from the start, at 0
        self.libvirt_reconnects = Gauge(
            "hostagent_libvirt_reconnects",
            "Times the agent reconnected to libvirtd since it started",
            registry=self.registry,
        )
        self.libvirt_call_seconds = Histogram(
            "hostagent_libvirt_call_duration_seconds",
            "Time one libvirt call took, by call (define, start, lookup, list, ...)",
            ["call"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.kvm_device_unusable = Gauge(
            "hostagent_kvm_device_unusable",
            "1 when /dev/kvm exists but QEMU's user cannot open it: libvirt then re-probes "
            "QEMU on every call (fix in docs/operations.md)",
            registry=self.registry,
        )
        self.phone_homes = Counter(
            "hostagent_phone_home", "Phone-home calls by result", ["result"], registry=self.registry
        )
        self.cert_expiry = Gauge(
            "hostagent_certificate_soonest_expiry_timestamp_seconds",
            "When the node's first certificate expires (Unix time); renewal runs well before",
            ["cluster", "node"],
            registry=self.registry,
        )
        self.cert_failures = Gauge(
            "hostagent_certificate_renewal_failures",
            "Consecutive failed renewal attempts of the node's certificates (0: healthy)",
            ["cluster", "node"],
            registry=self.registry,
        )
        self.node_unhealthy = Gauge(
            "hostagent_node_unhealthy",
            "1 for each node the agent finds unhealthy, by why (docs/operations.md)",
            ["cluster", "node", "reason"],
            registry=self.registry,
        )
        self.images = Gauge(
            "hostagent_images",
            "Pulled images on this host by phase (Downloading, Ready, Failed)",
            ["phase"],
            registry=self.registry,
        )
        self.image_bytes = Gauge(
            "hostagent_image_bytes",
            "Bytes the pulled images hold on disk (each digest once)",
            registry=self.registry,
        )
        self.image_removed_bytes = Counter(
            "hostagent_image_removed_bytes",
            "Bytes of pulled images removed (deleted, or collected unused)",
            registry=self.registry,
        )
        self.image_pulls = Counter(
            "hostagent_image_pulls",
            "Image pulls that ended, by result (ready, failed)",
            ["result"],
            registry=self.registry,
        )
        for result in ("ready", "failed"):
            self.image_pulls.labels(result=result)
        self.peer_reachable = Gauge(
            "hostagent_peer_reachable",
            "1 when the peer host answered the last underlay check, else 0",
            ["address"],
            registry=self.registry,
        )
        # Standalone agents export no zone series.
        self.zone = ZoneGauges(self.registry) if zone is not None else None
        self._zone = zone
        self._phases = phases
        self._reconnects = reconnects
        self._renewals = renewals
        self._expiries = expiries
        self._kvm_unusable = kvm_unusable
        self._unhealthy = unhealthy
        self._images = images
        self._image_bytes = image_bytes
        self._peers = peers

    def image_pulled(self, ok: bool) -> None:
        self.image_pulls.labels(result="ready" if ok else "failed").inc()

    def image_removed(self, freed: int) -> None:
        self.image_removed_bytes.inc(freed)

    def loop_error(self, loop: str) -> None:
        """One unexpected error the background loop named survived (one of LOOPS)."""
        self.loop_errors.labels(loop=loop).inc()

    def render(self) -> bytes:
        counts = self._phases()
        for phase in Phase:
            self.nodes.labels(phase=phase.value).set(counts.get(phase, 0))
        self.libvirt_reconnects.set(self._reconnects())
        self.kvm_device_unusable.set(1 if self._kvm_unusable() else 0)
        self.cert_expiry.clear()
        self.cert_failures.clear()
        for (cluster, node), when in self._expiries().items():
            self.cert_expiry.labels(cluster=cluster, node=node).set(when.timestamp())
        for (cluster, node), status in self._renewals().items():
            self.cert_failures.labels(cluster=cluster, node=node).set(status.failures)
        pulled = self._images()
        for image_phase in ("Downloading", "Ready", "Failed"):
            self.images.labels(phase=image_phase).set(pulled.get(image_phase, 0))
        self.image_bytes.set(self._image_bytes())
        self.peer_reachable.clear()
        for address, reachable in self._peers().items():
            self.peer_reachable.labels(address=address).set(1 if reachable else 0)
        self.node_unhealthy.clear()
        for (cluster, node), reason in self._unhealthy().items():
            self.node_unhealthy.labels(cluster=cluster, node=node, reason=reason).set(1)
        if self._zone is not None and self.zone is not None:
            self.zone.set(self._zone())
        return generate_latest(self.registry)


class ZoneGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "hostagent_zone_connected",
            "1 when the last heartbeat to the zone succeeded, else 0",
            registry=registry,
        )
        self.failures = Gauge(
            "hostagent_zone_heartbeat_failures",
            "Consecutive failed heartbeats to the zone (0: connected)",
            registry=registry,
        )
        self.last_heartbeat = Gauge(
            "hostagent_zone_last_heartbeat_timestamp_seconds",
            "When the zone last took this host's report (Unix time; 0: never)",
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "hostagent_zone_certificate_expiry_timestamp_seconds",
            "When this host's client certificate of the zone expires (Unix time; 0: none "
            "held, or no mutual TLS)",
            registry=registry,
        )

    def set(self, status: ZoneStatus) -> None:
        self.connected.set(1 if status.connected else 0)
        self.failures.set(status.failures)
        last = status.last_heartbeat
        self.last_heartbeat.set(last.timestamp() if last else 0)
        held = status.certificate.not_after if status.certificate else None
        self.certificate_expiry.set(held.timestamp() if held else 0)


class ZoneMetrics:
    """The zone's gauges, read from callables when /metrics is asked for."""

    def __init__(
        self,
        hosts_by_state: Callable[[], dict[str, int]],
        clusters_by_phase: Callable[[], dict[str, int]],
        failing_delivery: Callable[[], int],
        delivery_passes: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        self.hosts = Gauge(
            "hostagent_zone_hosts", "Hosts by state", ["state"], registry=self.registry
        )
        self.clusters = Gauge(
            "hostagent_zone_clusters", "Clusters by phase", ["phase"], registry=self.registry
        )
        self.failing = Gauge(
            "hostagent_zone_hosts_failing_delivery",
            "Hosts whose last delivery attempt failed",
            registry=self.registry,
        )
        self.passes = Gauge(
            "hostagent_zone_delivery_passes", "Delivery passes since start", registry=self.registry
        )
        self.leader = Gauge(
            "hostagent_zone_leader",
            "1 while this zone replica leads (runs the deliveries), else 0",
            registry=self.registry,
        )
        self.leader_changes = Counter(
            "hostagent_zone_leader_changes",
            "Leaders this replica has seen take over (the first it saw included)",
            registry=self.registry,
        )
        self.leading: Callable[[], bool] = lambda: True
        self._hosts = hosts_by_state
        self._clusters = clusters_by_phase
        self._failing = failing_delivery
        self._passes = delivery_passes

    def render(self) -> bytes:
        for state, count in self._hosts().items():
            self.hosts.labels(state).set(count)
        for phase, count in self._clusters().items():
            self.clusters.labels(phase).set(count)
        self.failing.set(self._failing())
        self.passes.set(self._passes())
        self.leader.set(1 if self.leading() else 0)
        return generate_latest(self.registry)
