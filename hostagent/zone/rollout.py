"""Rolling a cluster to a new spec: which action comes next. Pure.

The zone calls plan() on every pass with what it wants (Target), what runs (RolloutNode)
and whether etcd is healthy; it does the actions and calls again. Nothing is remembered
between calls, so a pass under a new zone leader picks the rollout up where it stands.

- Masters first, one at a time, in place (same name and address, etcd disk kept): the next
  only once every master is Ready again at its spec and etcd is healthy.
- Then workers with surge, as a Kubernetes Deployment rolls pods: a new worker (new name)
  is added while there are fewer than count + max_surge workers, and an old one removed
  while at least count - max_unavailable workers stay Ready.
- A node that is not Ready `ready_timeout_s` after it was (re)created stops the rollout:
  nothing further is touched and the reason says which node. PUTting the old spec back is a
  new Target, rolled the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hostagent.model import Role
from hostagent.zone.model import ClusterSpec, PoolSpec

DEFAULT_READY_TIMEOUT_S = 600.0  # Cluster API's MachineHealthCheck nodeStartupTimeout
_MINOR = re.compile(r"^1\.(\d+)\.\d+$")


@dataclass(frozen=True)
class Shape:
    """What a node runs: everything a rollout re-creates it for."""

    kubernetes_version: str
    image: str
    vcpus: int
    memory_mib: int
    disk_gib: int


@dataclass(frozen=True)
class Target:
    """The cluster's desired spec as the rollout sees it."""

    masters: Shape
    workers: Shape
    worker_count: int
    max_surge: int = 1
    max_unavailable: int = 0
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_surge < 0 or self.max_unavailable < 0:
            raise ValueError("max_surge and max_unavailable must not be negative")
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: no worker could move")

    def shape(self, role: Role) -> Shape:
        return self.masters if role is Role.MASTER else self.workers


def shape_of(spec: ClusterSpec, pool: PoolSpec) -> Shape:
    return Shape(spec.kubernetes_version, spec.image, pool.vcpus, pool.memory_mib, pool.disk_gib)


def target_of(
    spec: ClusterSpec,
    max_surge: int = 1,
    max_unavailable: int = 0,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> Target:
    """The Target of a cluster's spec (what `nodes` run is each node's Shape the same way)."""
    masters, workers = shape_of(spec, spec.masters), shape_of(spec, spec.workers)
    return Target(masters, workers, spec.workers.count, max_surge, max_unavailable, ready_timeout_s)


@dataclass(frozen=True)
class RolloutNode:
    """A node of the cluster as it runs. since: when it was last (re)created, or when it
    stopped being Ready; failed: its host gave up on it (phase Failed); removing: a worker
    being removed, which still counts against max_surge until it is gone."""

    name: str
    role: Role
    shape: Shape
    ready: bool
    since: float
    failed: bool = False
    removing: bool = False


@dataclass(frozen=True)
class Recreate:
    """Re-create this master in place with the target spec."""

    node: str


@dataclass(frozen=True)
class AddWorker:
    node: str


@dataclass(frozen=True)
class RemoveWorker:
    node: str


Action = Recreate | AddWorker | RemoveWorker


@dataclass(frozen=True)
class Plan:
    """actions: to do now (none: wait). waiting: why nothing is done now; stopped: why the
    rollout gave up (set only then); done: every node runs the target and is Ready."""

    actions: tuple[Action, ...]
    progress: str
    done: bool = False
    waiting: str = ""
    stopped: str = ""


def plan(target: Target, nodes: Sequence[RolloutNode], etcd_healthy: bool, now: float) -> Plan:
    progress = progress_text(target, nodes)
    staying = [n for n in nodes if not n.removing]
    for node in sorted(staying, key=lambda n: (n.role is not Role.MASTER, _order(n.name))):
        if why := _stuck(node, target, now):
            return Plan((), progress, stopped=why)
    masters = [n for n in nodes if n.role is Role.MASTER]
    if waiting := _masters_busy(masters, etcd_healthy):
        return Plan((), progress, waiting=waiting)
    outdated = sorted((m for m in masters if m.shape != target.masters), key=_by_name)
    if outdated:
        return Plan((Recreate(outdated[0].name),), progress)
    workers = [n for n in nodes if n.role is Role.WORKER]
    actions = _worker_actions(target, workers)
    if actions:
        return Plan(actions, progress)
    if _settled(target, workers):
        return Plan((), progress, done=True)
    if any(w.removing for w in workers):
        return Plan((), progress, waiting="waiting for old workers to be removed")
    return Plan((), progress, waiting="waiting for new workers to become Ready")


def progress_text(target: Target, nodes: Iterable[RolloutNode]) -> str:
    """e.g. "3/5 nodes at 1.31.2": nodes Ready at the target spec, of those wanted."""
    found = list(nodes)
    wanted = sum(1 for n in found if n.role is Role.MASTER and not n.removing)
    wanted += target.worker_count
    at = sum(1 for n in found if n.ready and not n.removing and n.shape == target.shape(n.role))
    return f"{min(at, wanted)}/{wanted} nodes at {target.workers.kubernetes_version}"


def version_change_problem(current: str, wanted: str, running: Iterable[str]) -> str | None:
    """Why a cluster may not go from Kubernetes `current` to `wanted` (the 422's reason), or
    None. running: the versions its nodes run now. A minor goes up by one at most, above
    the oldest minor any node still runs; it never goes down, except back to a minor a
    node still runs (rolling back an unfinished rollout)."""
    old, new = _minor(current), _minor(wanted)
    minors = {_minor(v) for v in running}
    lowest = min(minors, default=old)
    if new < old and new not in minors:
        return (
            f"kubernetes_version cannot go down from {current} to {wanted}: Kubernetes does "
            "not support downgrades once every node runs the newer minor"
        )
    if new > lowest + 1:
        still = f" (a node still runs 1.{lowest})" if lowest < old else ""
        return (
            f"kubernetes_version can go up one minor at a time: from 1.{lowest} to "
            f"1.{lowest + 1}, not to {wanted}{still}"
        )
    return None


def _minor(version: str) -> int:
    match = _MINOR.fullmatch(version)
    if match is None:
        raise ValueError(f"kubernetes_version {version!r} must look like 1.31.2")
    return int(match.group(1))


def _stuck(node: RolloutNode, target: Target, now: float) -> str:
    if node.failed:
        return f"{node.role.value} {node.name} failed; the rollout stops until it is fixed"
    waited = now - node.since
    if not node.ready and waited > target.ready_timeout_s:
        return (
            f"{node.role.value} {node.name} is not Ready {waited:.0f}s after it was created "
            f"(timeout {target.ready_timeout_s:.0f}s); the rollout stops, nothing further "
            "is touched"
        )
    return ""


def _masters_busy(masters: Sequence[RolloutNode], etcd_healthy: bool) -> str:
    waiting = sorted((m.name for m in masters if not m.ready), key=_order)
    if waiting:
        return f"waiting for master {waiting[0]} to become Ready"
    if not etcd_healthy:
        return "waiting for etcd to be healthy"
    return ""


def _worker_actions(target: Target, workers: Sequence[RolloutNode]) -> tuple[Action, ...]:
    staying = [w for w in workers if not w.removing]
    new = [w for w in staying if w.shape == target.workers]
    old = sorted((w for w in staying if w.shape != target.workers), key=_old_first)
    ready = sum(1 for w in staying if w.ready)
    actions: list[Action] = []
    surge_room = target.worker_count + target.max_surge - len(workers)
    room = min(surge_room, target.worker_count - len(new))
    names = _new_names(workers, max(0, room))
    actions.extend(AddWorker(name) for name in names)
    floor = target.worker_count - target.max_unavailable
    for worker in old:
        if not worker.ready:
            actions.append(RemoveWorker(worker.name))
        elif ready - 1 >= floor:
            actions.append(RemoveWorker(worker.name))
            ready -= 1
    surplus = len(new) - target.worker_count
    if surplus > 0 and not old:
        extra = sorted(new, key=_old_first)[:surplus]
        actions.extend(RemoveWorker(w.name) for w in extra)
    return tuple(actions)


def _settled(target: Target, workers: Sequence[RolloutNode]) -> bool:
    return len(workers) == target.worker_count and all(
        w.ready and w.shape == target.workers and not w.removing for w in workers
    )


def _new_names(workers: Sequence[RolloutNode], count: int) -> list[str]:
    highest = max((_order(w.name)[1] for w in workers), default=0)
    return [f"w{highest + i}" for i in range(1, count + 1)]


def _old_first(node: RolloutNode) -> tuple[bool, tuple[str, int]]:
    """Not-Ready nodes go first, then in name order."""
    return (node.ready, _order(node.name))


def _by_name(node: RolloutNode) -> tuple[str, int]:
    return _order(node.name)


def _order(name: str) -> tuple[str, int]:
    """m2 before m10: the name's letters, then its number."""
    match = re.fullmatch(r"(\D*)(\d*)", name)
    if match is None or not match.group(2):
        return (name, 0)
    return (match.group(1), int(match.group(2)))
