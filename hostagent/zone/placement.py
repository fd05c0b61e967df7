"""Which host each new node of a cluster goes to. Pure: a function of the nodes asked for,
the hosts' offers and the cluster's nodes already running (no I/O, no clock, no randomness).

Masters first, then workers, each role in name order (m2 before m10); each node takes the
best host it fits on, by its role's preference:

- a master: the failure domain with the fewest masters of this cluster, then the host with
  the fewest masters of this cluster, then as a worker;
- a worker: the host with the fewest nodes of this cluster, then the most memory free after
  the node, then the host id.

Between hosts equal by these counts, one that already holds the cluster's image comes first
(it boots the node without a download), then the memory and the host id decide.

Masters share a failure domain or a host only when nothing else has room, and
Placement.warnings says so. A node that fits nowhere fails the whole call: PlacementError,
nothing assigned.

Each (role, node shape) keeps a heap of the hosts that shape fits on. Within a call a host's
key only ever gets worse (more nodes and masters, less free), so an entry is re-keyed when it
reaches the top instead of on every assignment, and a host a shape no longer fits on leaves
that heap for good: O((H + N) log H) for N nodes of a few shapes over H hosts.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hostagent.capacity import Resources
from hostagent.errors import OutOfCapacity
from hostagent.model import Role

__all__ = ["HostOffer", "NodeRequest", "Placement", "PlacementError", "place"]

_LISTED = 3  # up to this many hosts or domains are named one by one in messages


@dataclass(frozen=True)
class HostOffer:
    id: str
    failure_domain: str
    # What the host can still take: allocatable (vCPU over-commit ratio applied by the host)
    # minus everything already on it or assigned to it.
    free: Resources
    # QEMU overhead the host adds per VM: base + per_gib * ceil(memory_mib / 1024).
    overhead_base_mib: int = 192
    overhead_per_gib_mib: int = 16
    has_image: bool = False  # the cluster's image is Ready on the host


@dataclass(frozen=True)
class NodeRequest:
    name: str
    role: Role
    vcpus: int
    memory_mib: int
    disk_gib: int


@dataclass(frozen=True)
class Placement:
    assignments: dict[str, str]  # new node name -> host id
    warnings: tuple[str, ...]  # soft rules that could not be kept, for a person


class PlacementError(OutOfCapacity):
    """Some node fits on no host, so none was assigned; str() says which, what was short
    and where. `nodes` names the nodes that found no host."""

    def __init__(self, message: str, nodes: tuple[str, ...]) -> None:
        super().__init__(message)
        self.nodes = nodes


def place(
    nodes: Sequence[NodeRequest],
    hosts: Sequence[HostOffer],
    placed: Mapping[str, tuple[Role, str]] = {},
) -> Placement:
    """Assign every node in `nodes` a host, or raise PlacementError and assign none.

    `placed` is the cluster's nodes already running (name -> (role, host id)): they stay
    where they are and count for spreading. A placed node on a host that is not offered
    counts for nothing (its failure domain is unknown). ValueError on malformed input.
    """
    _validate(nodes, hosts, placed)
    planner = _Planner(hosts, placed)
    for node in sorted(nodes, key=_order):
        planner.assign(node)
    if planner.failures:
        raise planner.error(len(nodes))
    return Placement(dict(planner.assignments), tuple(planner.warnings))


# --- input ---------------------------------------------------------------------------------


def _validate(
    nodes: Sequence[NodeRequest], hosts: Sequence[HostOffer], placed: Mapping[str, object]
) -> None:
    if dup := _duplicates(h.id for h in hosts):
        raise ValueError(f"duplicate host id(s): {', '.join(dup)}")
    if dup := _duplicates(n.name for n in nodes):
        raise ValueError(f"duplicate node name(s): {', '.join(dup)}")
    if again := sorted(n.name for n in nodes if n.name in placed):
        raise ValueError(f"node(s) already placed: {', '.join(again)}")
    for n in nodes:
        if n.vcpus < 1 or n.memory_mib < 1 or n.disk_gib < 0:
            raise ValueError(
                f"node {n.name}: vcpus and memory_mib must be positive, disk_gib not negative"
            )
    for h in hosts:
        if h.overhead_base_mib < 0 or h.overhead_per_gib_mib < 0:
            raise ValueError(f"host {h.id}: QEMU overhead must not be negative")


def _duplicates(values: Iterable[str]) -> list[str]:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def _order(node: NodeRequest) -> tuple[int, tuple[str, ...], str]:
    """Masters first, then names in natural order (w2 before w10), the raw name last."""
    parts = re.split(r"(\d+)", node.name)
    natural = tuple(p.zfill(20) if i % 2 else p for i, p in enumerate(parts))
    return (0 if node.role == Role.MASTER else 1, natural, node.name)


# --- the plan ------------------------------------------------------------------------------

_Shape = tuple[Role, int, int, int]  # role, vcpus, memory_mib, disk_gib
# (masters in the host's failure domain, masters on the host, nodes on the host, 0 when
#  the host has the image, minus the memory free after the node, host id); the first two are
#  0 for workers. Smallest is best.
_Key = tuple[int, int, int, int, int, str]
_Amount = Callable[["_Host"], float]  # a resource's amount on a host


@dataclass(slots=True)
class _Host:
    offer: HostOffer
    vcpus: float  # still free in this call
    memory_mib: int
    disk_gib: int
    nodes: int = 0  # of this cluster
    masters: list[str] = field(default_factory=list)  # of this cluster

    def memory_cost(self, memory_mib: int) -> int:
        gib = -(-memory_mib // 1024)
        return memory_mib + self.offer.overhead_base_mib + self.offer.overhead_per_gib_mib * gib

    def fits(self, node: NodeRequest) -> bool:
        return (
            node.vcpus <= self.vcpus
            and node.disk_gib <= self.disk_gib
            and self.memory_cost(node.memory_mib) <= self.memory_mib
        )

    def fits_offer(self, node: NodeRequest) -> bool:
        """Whether the node fits what the host offered before this call assigned anything."""
        free = self.offer.free
        return (
            node.vcpus <= free.vcpus
            and node.disk_gib <= free.disk_gib
            and self.memory_cost(node.memory_mib) <= free.memory_mib
        )


class _Planner:
    def __init__(self, hosts: Sequence[HostOffer], placed: Mapping[str, tuple[Role, str]]):
        self.hosts = {
            h.id: _Host(h, h.free.vcpus, h.free.memory_mib, h.free.disk_gib)
            for h in sorted(hosts, key=lambda h: h.id)
        }
        self.domain_masters: dict[str, list[str]] = {}
        for name, (role, host_id) in sorted(placed.items()):
            if host := self.hosts.get(host_id):
                self._count(name, role, host)
        self.heaps: dict[_Shape, list[_Key]] = {}
        self.assignments: dict[str, str] = {}
        self.warnings: list[str] = []
        self.failures: list[tuple[NodeRequest, str]] = []
        self._reasons: dict[tuple[_Shape, int], str] = {}  # (shape, assignments made) -> why

    def _count(self, name: str, role: Role, host: _Host) -> None:
        host.nodes += 1
        if role == Role.MASTER:
            host.masters.append(name)
            self.domain_masters.setdefault(host.offer.failure_domain, []).append(name)

    def key(self, host: _Host, node: NodeRequest) -> _Key:
        left = host.memory_mib - host.memory_cost(node.memory_mib)  # free after the node
        fetch = 0 if host.offer.has_image else 1
        if node.role != Role.MASTER:
            return (0, 0, host.nodes, fetch, -left, host.offer.id)
        in_domain = len(self.domain_masters.get(host.offer.failure_domain, ()))
        return (in_domain, len(host.masters), host.nodes, fetch, -left, host.offer.id)

    def assign(self, node: NodeRequest) -> None:
        host = self._best(node)
        if host is None:
            self.failures.append((node, self._reason(node)))
            return
        if node.role == Role.MASTER and (warning := self._shared(node, host)):
            self.warnings.append(warning)
        host.vcpus -= node.vcpus
        host.memory_mib -= host.memory_cost(node.memory_mib)
        host.disk_gib -= node.disk_gib
        self._count(node.name, node.role, host)
        self.assignments[node.name] = host.offer.id

    def _best(self, node: NodeRequest) -> _Host | None:
        shape = (node.role, node.vcpus, node.memory_mib, node.disk_gib)
        heap = self.heaps.get(shape)
        if heap is None:
            heap = [self.key(h, node) for h in self.hosts.values() if h.fits(node)]
            heapq.heapify(heap)
            self.heaps[shape] = heap
        while heap:
            host = self.hosts[heap[0][-1]]
            if not host.fits(node):
                heapq.heappop(heap)  # free only shrinks: it will not fit later either
                continue
            key = self.key(host, node)
            if key == heap[0]:
                return host  # stays in the heap; re-keyed when it next reaches the top
            heapq.heapreplace(heap, key)
        return None

    # --- explaining --------------------------------------------------------------------

    def _shared(self, node: NodeRequest, host: _Host) -> str:
        """The warning when this master shares its failure domain or host, else ""."""
        domain = host.offer.failure_domain
        others = self.domain_masters.get(domain, [])
        if not others:
            return ""
        if host.masters:
            free = [h.offer.id for h in self.hosts.values() if not h.masters]
            why = (
                f"every host offered ({len(self.hosts)}) already runs one"
                if not free
                else f"no host without one has room for it ({_names(free, 'host')})"
            )
            return (
                f"master {node.name} shares host {host.offer.id} (failure domain {domain}) "
                f"with {_masters(host.masters)}: {why}"
            )
        domains = sorted({h.offer.failure_domain for h in self.hosts.values()})
        free = [d for d in domains if d not in self.domain_masters]
        if not free:
            why = f"every failure domain offered already has one ({_names(domains, 'domain')})"
        else:
            why = f"no failure domain without one has room for it ({_names(free, 'domain')})"
        return (
            f"master {node.name} shares failure domain {domain} with {_masters(others)}: "
            f"{why}; it is on host {host.offer.id}, which runs no other master"
        )

    def _reason(self, node: NodeRequest) -> str:
        """Why the node fits no host, summarised; the same for every node of its shape until
        the next assignment changes the hosts."""
        shape = (node.role, node.vcpus, node.memory_mib, node.disk_gib)
        cache = (shape, len(self.assignments))
        if cache not in self._reasons:
            self._reasons[cache] = self._explain(node)
        return self._reasons[cache]

    def _explain(self, node: NodeRequest) -> str:
        hosts = list(self.hosts.values())
        if not hosts:
            return "no host was offered"
        domains = len({h.offer.failure_domain for h in hosts})
        shorts = [
            _short("vcpus", "", hosts, lambda h: node.vcpus, lambda h: h.vcpus),
            _short(
                "memory_mib",
                " MiB",
                hosts,
                lambda h: h.memory_cost(node.memory_mib),
                lambda h: h.memory_mib,
            ),
            _short("disk_gib", " GiB", hosts, lambda h: node.disk_gib, lambda h: h.disk_gib),
        ]
        why = (
            f"no room on any of the {_plural(len(hosts), 'host')} "
            f"({_plural(domains, 'failure domain')}): " + "; ".join(s for s in shorts if s)
        )
        if self.assignments and (before := sum(h.fits_offer(node) for h in hosts)):
            why += (
                f" ({_plural(before, 'host')} had room before the "
                f"{_plural(len(self.assignments), 'node')} placed ahead in this request)"
            )
        return why

    def error(self, total: int) -> PlacementError:
        groups: dict[tuple[_Shape, str], list[NodeRequest]] = {}
        for node, reason in self.failures:
            shape = (node.role, node.vcpus, node.memory_mib, node.disk_gib)
            groups.setdefault((shape, reason), []).append(node)
        lines = [f"cannot place {len(self.failures)} of {_plural(total, 'node')}, none assigned:"]
        for (_, reason), group in groups.items():
            first = group[0]
            size = (
                f"{first.vcpus} vCPU, {first.memory_mib} MiB + QEMU overhead, {first.disk_gib} GiB"
            )
            if len(group) == 1:
                who = f"{first.role} {first.name} ({size})"
            else:
                names = [n.name for n in group]
                listed = names if len(names) <= 6 else [*names[:3], "...", names[-1]]
                who = f"{first.role}s {', '.join(listed)} ({len(group)} nodes, each {size})"
            lines.append(f"{who}: {reason}")
        return PlacementError("\n".join(lines), tuple(n.name for n, _ in self.failures))


def _short(
    resource: str,
    unit: str,
    hosts: Sequence[_Host],
    need: _Amount,
    free: _Amount,
) -> str:
    """One resource's part of a failure message: which hosts have too little of it."""
    short = [(h, need(h), free(h)) for h in hosts if need(h) > free(h)]
    if not short:
        return ""
    needs = sorted({n for _, n, _ in short})
    wanted = _num(needs[0]) if len(needs) == 1 else f"{_num(needs[0])} to {_num(needs[-1])}"
    wanted += unit
    note = " (QEMU overhead included)" if resource == "memory_mib" else ""
    if len(short) <= _LISTED:
        each = ", ".join(f"{h.offer.id} {_num(f)}{unit}" for h, _, f in short)
        return f"{resource}: needs {wanted}{note}, free: {each}"
    largest = min(short, key=lambda s: (-s[2], s[0].offer.id))
    return (
        f"{resource}: {len(short)} hosts have less than {wanted} free{note} "
        f"(largest {_num(largest[2])}{unit} on {largest[0].offer.id})"
    )


def _names(values: Sequence[str], what: str) -> str:
    if len(values) <= _LISTED:
        return ", ".join(values)
    return f"{len(values)} {what}s: {', '.join(values[:_LISTED])}, ..."


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _masters(names: Sequence[str]) -> str:
    return f"master {names[0]}" if len(names) == 1 else f"masters {', '.join(names)}"
