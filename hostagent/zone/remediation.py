"""Which unhealthy nodes of a cluster the zone replaces now, and why the others wait. Pure.

The limits follow the two systems operators already trust
(/work/shared/research/day2-peers.md, rows 15 and 16 and section c):

- Giant Swarm's badnodedetector (giantswarm/badnodedetector:pkg/detector/detector.go:16-37):
  a node NotReady for 6 ticks of 30 s is terminated; at most 10 % of the nodes per run and
  at most one master; then a 10 minute pause. Here: `unhealthy_for_s` 180 s, at most
  max(1, 10 %) of the cluster's nodes and one master per `window_s` (600 s).
- Cluster API's KubeadmControlPlane (controlplane/kubeadm/.../remediation.go:213-310) never
  remediates a control plane of one machine, nor while another control-plane machine is
  being created or deleted, nor when etcd would lose quorum. Here: a master is replaced only
  when the healthy masters left (it is unhealthy already) are a majority of all masters,
  and never while a rollout step runs (MachineHealthCheck waits for a Machine that is being
  updated the same way).

Workers are replaced by re-creation, masters in place (same name, address, etcd disk).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hostagent.model import Role

GIANT_SWARM_FRACTION = 0.10


@dataclass(frozen=True)
class Limits:
    unhealthy_for_s: float = 180.0  # badnodedetector: 6 ticks x 30 s
    window_s: float = 600.0  # badnodedetector: 10 minute pause after terminations
    max_fraction: float = GIANT_SWARM_FRACTION

    def __post_init__(self) -> None:
        if self.unhealthy_for_s < 0 or self.window_s < 0 or not 0 < self.max_fraction <= 1:
            raise ValueError(
                "unhealthy_for_s and window_s must not be negative, max_fraction in (0, 1]"
            )


@dataclass(frozen=True)
class NodeHealth:
    """One node of the cluster. unhealthy_since: when its agent first reported it
    unhealthy (None: healthy); reason: the agent's words."""

    name: str
    role: Role
    unhealthy_since: float | None = None
    reason: str = ""

    @property
    def healthy(self) -> bool:
        return self.unhealthy_since is None


@dataclass(frozen=True)
class Remediated:
    """A replacement the zone made (it keeps these as the cluster's events)."""

    node: str
    role: Role
    at: float


@dataclass(frozen=True)
class Decision:
    replace: tuple[str, ...]  # nodes to replace now, the longest unhealthy first
    held: tuple[tuple[str, str], ...]  # (node, why it is not replaced now)


def budget(node_count: int, limits: Limits) -> int:
    """Replacements allowed per window: max(1, max_fraction) of the cluster's nodes."""
    return max(1, int(node_count * limits.max_fraction))


def decide(
    nodes: Sequence[NodeHealth],
    recent: Iterable[Remediated],
    limits: Limits,
    now: float,
    rollout_step_running: bool,
) -> Decision:
    due = sorted((n.unhealthy_since, n.name, n) for n in nodes if n.unhealthy_since is not None)
    if rollout_step_running:
        return Decision((), tuple((name, "a rollout step is running") for _, name, _ in due))
    in_window = [r for r in recent if now - r.at < limits.window_s]
    left = budget(len(nodes), limits) - len(in_window)
    master_done = any(r.role is Role.MASTER for r in in_window)
    replace: list[str] = []
    held: list[tuple[str, str]] = []
    for since, _, node in due:
        why = _hold(node, now - since, nodes, limits, left - len(replace), master_done)
        if why:
            held.append((node.name, why))
            continue
        replace.append(node.name)
        master_done = master_done or node.role is Role.MASTER
    return Decision(tuple(replace), tuple(held))


def _hold(
    node: NodeHealth,
    waited: float,
    nodes: Sequence[NodeHealth],
    limits: Limits,
    left: int,
    master_done: bool,
) -> str:
    if waited < limits.unhealthy_for_s:
        return f"unhealthy for {waited:.0f}s of {limits.unhealthy_for_s:.0f}s"
    if left <= 0:
        return (
            f"{budget(len(nodes), limits)} replacement(s) per {limits.window_s:.0f}s already "
            f"made in this cluster (max(1, {limits.max_fraction:.0%}) of its nodes)"
        )
    if node.role is Role.MASTER:
        return _master_hold(nodes, limits, master_done)
    return ""


def _master_hold(nodes: Sequence[NodeHealth], limits: Limits, master_done: bool) -> str:
    if master_done:
        return f"one master per {limits.window_s:.0f}s is replaced at most"
    masters = [n for n in nodes if n.role is Role.MASTER]
    healthy = sum(1 for n in masters if n.healthy)
    quorum = len(masters) // 2 + 1
    if healthy < quorum:
        return (
            f"only {healthy} of {len(masters)} masters are healthy; replacing one needs "
            f"{quorum} healthy to keep etcd's quorum"
        )
    return ""
