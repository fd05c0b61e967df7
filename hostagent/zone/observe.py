"""A cluster's nodes as the leader's rollouts and remediations see them, from the zone's
records and the hosts' reports. Pure: everything comes from the store, so a new leader
sees what the old one saw (rollout.plan and remediation.decide remember nothing).

- Ready: its host is Ready and reports the node Ready at the spec the zone last sent it
  (the reported spec_hash is that spec's), so a master re-created in place is not Ready
  again until its agent has re-created it.
- Unhealthy: its agent says so (ReportedHealth), or its host stopped reporting (since the
  host's last heartbeat). Never earlier than its current incarnation was created, so a
  replacement is not blamed for what its predecessor did.
- Applying: its host reports it at another spec (spec_hash) than the zone sent (it has
  not taken the new one yet): what it reports is its old incarnation's.
- etcd: what a master's guest last said of its own etcd member (ReportedHealth.etcd),
  counted only when checked after its current incarnation was created.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from hostagent.model import EtcdMode, Phase, Role
from hostagent.zone.desired import node_shape, node_spec
from hostagent.zone.model import HostState, ReportedNode
from hostagent.zone.remediation import NodeHealth, Remediated
from hostagent.zone.rollout import Plan, RolloutNode, Target, plan, target_of
from hostagent.zone.status import host_state
from hostagent.zone.store import ClusterEvent, ClusterRecord, Gateway, HostRecord, NodeRecord

REMEDIATION = "remediation"


@dataclass(frozen=True)
class Observed:
    node: NodeRecord
    ready: bool
    failed: bool
    unhealthy_since: float | None
    reason: str
    etcd: bool | None = None
    applying: bool = False


def epoch(stamp: str) -> float:
    """A stored time (hostagent.store.now(), ISO 8601 UTC) in seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def observe(
    cluster: ClusterRecord,
    nodes: Sequence[NodeRecord],
    gateways: Iterable[Gateway],
    hosts: Mapping[str, HostRecord],
    now: float,
    timeout_s: float,
    mtu: int,
) -> list[Observed]:
    gateway_of = {g.host: g.address for g in gateways}
    live = [n for n in nodes if not n.deleting]
    found = []
    for node in nodes:
        host = hosts.get(node.host)
        reported = _reported(node, host)
        gateway = gateway_of.get(node.host)
        digest = None
        if gateway is not None and not node.deleting:
            digest = node_spec(cluster, node, gateway, live, mtu).spec_hash()
        current = reported is not None and reported.spec_hash == digest
        up = host is not None and host_state(host, now, timeout_s) is HostState.READY
        ready = up and current and reported is not None and reported.phase == Phase.READY.value
        failed = up and current and reported is not None and reported.phase == Phase.FAILED.value
        since, reason = _unhealthy(node, host, reported, up, current)
        etcd = _etcd(node, reported) if current else None
        # An agent that reports no spec_hash says nothing about which spec it runs.
        known = reported is not None and bool(reported.spec_hash) and digest is not None
        found.append(Observed(node, ready, failed, since, reason, etcd, known and not current))
    return found


def _etcd(node: NodeRecord, reported: ReportedNode | None) -> bool | None:
    """The master's etcd member healthy or not, None without a report since this
    incarnation was created (one from before its re-creation says nothing of it)."""
    etcd = reported.health.etcd if reported is not None else None
    if node.deleting or etcd is None or epoch(etcd.checked_at) < epoch(node.created_at):
        return None
    return etcd.healthy


def _reported(node: NodeRecord, host: HostRecord | None) -> ReportedNode | None:
    if host is None:
        return None
    key = (node.cluster, node.name)
    return next((r for r in host.report.nodes if (r.cluster, r.name) == key), None)


def _unhealthy(
    node: NodeRecord,
    host: HostRecord | None,
    reported: ReportedNode | None,
    up: bool,
    current: bool,
) -> tuple[float | None, str]:
    born = epoch(node.created_at)
    if node.deleting:
        return None, ""
    if host is not None and not up:
        return max(born, host.last_heartbeat), f"host {node.host} is not reporting"
    if reported is None or not current or reported.health.healthy:
        return None, ""
    health = reported.health
    since = epoch(health.since) if health.since else born
    return max(born, since), f"{health.reason}: {health.message}".strip(": ")


def target(cluster: ClusterRecord) -> Target:
    rollout = cluster.spec.rollout
    return target_of(
        cluster.spec, rollout.max_surge, rollout.max_unavailable, rollout.ready_timeout_s
    )


def rolling(cluster: ClusterRecord, nodes: Iterable[NodeRecord]) -> bool:
    """Whether a live node runs another shape than the spec wants: a rollout is on."""
    wanted = target(cluster)
    return any(node_shape(cluster, n) != wanted.shape(n.role) for n in nodes if not n.deleting)


def rollout_on(cluster: ClusterRecord, observed: Sequence[Observed]) -> bool:
    """Whether a rollout is on: a live node runs another shape than the spec wants, or its
    host has not taken the spec the zone last sent it (the last node re-created: until
    its agent has the new spec, the Ready it reports is its old incarnation's)."""
    live = [o for o in observed if not o.node.deleting]
    return rolling(cluster, (o.node for o in live)) or any(o.applying for o in live)


def etcd_healthy(cluster: ClusterRecord, observed: Iterable[Observed]) -> bool:
    """Whether the cluster's etcd is healthy, the rollout's gate between two masters: every
    master Ready and healthy, and its etcd member healthy by its guest's latest report.
    With etcd as a unit (etcd_mode systemd) every master must have reported its member
    healthy since it was (re-)created; a static-pod master without an etcd report counts
    by its readiness alone."""
    unit = cluster.spec.etcd_mode is EtcdMode.SYSTEMD
    masters = [o for o in observed if o.node.role is Role.MASTER and not o.node.deleting]
    return all(
        o.ready and o.unhealthy_since is None and (o.etcd or (o.etcd is None and not unit))
        for o in masters
    )


def rollout_plan(cluster: ClusterRecord, observed: Sequence[Observed], now: float) -> Plan:
    nodes = [
        RolloutNode(
            o.node.name,
            o.node.role,
            node_shape(cluster, o.node),
            o.ready,
            epoch(o.node.created_at),
            failed=o.failed,
            removing=o.node.deleting,
        )
        for o in observed
    ]
    return plan(target(cluster), nodes, etcd_healthy(cluster, observed), now)


def health(observed: Iterable[Observed]) -> list[NodeHealth]:
    """The live nodes as remediation.decide takes them."""
    return [
        NodeHealth(o.node.name, o.node.role, o.unhealthy_since, o.reason)
        for o in observed
        if not o.node.deleting
    ]


def remediated(events: Iterable[ClusterEvent]) -> list[Remediated]:
    """The replacements made, from the cluster's events (the window's bookkeeping)."""
    return [
        Remediated(e.node, e.role, e.at)
        for e in events
        if e.kind == REMEDIATION and e.role is not None
    ]
