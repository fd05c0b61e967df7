"""ZoneStore in etcd ([store] backend = "etcd"): the keys of zone/keys.py, read from a local
mirror kept by a watch, written by compare-and-swap transactions.

Reads are lookups in the mirror (the protocol's reads are synchronous), and answer
StoreUnavailable (503) while the watch is broken: a zone that cannot follow etcd does not
serve what may be old. The mirror is listed at start, then follows from the next revision;
a broken watch resumes from the last revision it applied, a compacted one lists again.

Every write is one transaction whose compares state what the decision assumed (the keys it
read are unchanged, the keys it creates are absent, the hosts it places on exist); a
writer then waits until the mirror holds its write, so a request reads what it wrote.
When a compare fails, the writer waits until the mirror holds what beat it and either
decides again itself (a host's report, a removal, a delivery) or raises Stale, as the
SQLite store does, for the service to decide again (a new cluster, a scale).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from common import tasks as tasks_
from common.backoff import Backoff
from hostagent.errors import NotLeader, StoreUnavailable
from hostagent.store import now
from hostagent.zone.etcd import (
    Compacted,
    Compare,
    Delete,
    Etcd,
    LeaseKeeper,
    Op,
    Put,
    TxnResult,
    absent,
    present,
    unchanged,
)
from hostagent.zone.keys import (
    Layout,
    certificate_value,
    cluster_value,
    events_value,
    gateway_value,
    host_value,
    image_value,
    node_value,
)
from hostagent.zone.liveness import report_due
from hostagent.zone.mirror import Mirror
from hostagent.zone.model import ClusterSpec, HostReport
from hostagent.zone.store import (
    CatalogueImage,
    ClusterEvent,
    ClusterRecord,
    Gateway,
    HostCertificate,
    HostRecord,
    HostRemoval,
    ImageCheck,
    NodeRecord,
    Stale,
    naming,
)

log = logging.getLogger(__name__)

ATTEMPTS = 10  # a write that lost a race decides again this often before giving up (503)
T = TypeVar("T")


@dataclass(frozen=True)
class _Plan(Generic[T]):
    """A write: its compares and operations, and what it answers once committed (no
    operations: nothing to write)."""

    compares: list[Compare]
    ops: list[Op]
    answer: T


class EtcdZoneStore:
    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        *,
        host_lease_ttl_s: int = 15,
        report_interval_s: float = 60.0,
    ) -> None:
        self.etcd = etcd
        self.keeper = LeaseKeeper(etcd)
        self.host_lease_ttl_s = host_lease_ttl_s
        self.report_interval_s = report_interval_s
        self.layout = Layout(prefix)
        self.mirror = Mirror(self.layout)
        self._live = False
        self._follower: asyncio.Task[None] | None = None
        # While this replica leads: the create revision of its leader key. The leader's
        # writes (`fenced`: deliveries, removals of what agents deleted) compare it in
        # their transaction, so a replica that lost the lead, even one paused past its lease
        # that still believes it leads, cannot write.
        self.fence: int | None = None

    async def start(self) -> None:
        """List the zone's keys (StoreUnavailable when etcd cannot be reached) and follow
        them from there."""
        revision, kvs = await self.etcd.list_prefix(self.layout.prefix)
        self.mirror.load(revision, kvs)
        self._live = True
        self._follower = asyncio.create_task(self._follow(), name="etcd-watch")

    async def close(self) -> None:
        await tasks_.cancel(self._follower)
        self._live = False
        await self.keeper.close()
        await self.etcd.close()

    async def _follow(self) -> None:
        retry = Backoff(0.1, 5.0)
        relist = False
        while True:
            try:
                if relist:
                    revision, kvs = await self.etcd.list_prefix(self.layout.prefix)
                    self.mirror.load(revision, kvs)
                    relist = False
                async for batch in self.etcd.watch(self.layout.prefix, self.mirror.revision + 1):
                    self.mirror.apply(batch)
                    if not self._live:
                        log.info("following etcd again at revision %d", self.mirror.revision)
                    self._live = True
                    retry.reset()
            except Compacted as exc:
                log.info("etcd watch: %s; listing the zone's keys again", exc)
                relist = True
            except StoreUnavailable as exc:
                if self._live:
                    log.warning("lost the watch on etcd, answering 503 until it is back: %s", exc)
                self._live = False
                await asyncio.sleep(retry.next())
            except Exception:  # a record the mirror cannot read: never serve a frozen copy
                log.exception("cannot follow etcd, answering 503 and listing again")
                self._live, relist = False, True
                await asyncio.sleep(retry.next())

    def view(self) -> Mirror:
        """The mirror, while it follows etcd (else StoreUnavailable: 503)."""
        return self._view()

    def _view(self) -> Mirror:
        if not self._live:
            raise StoreUnavailable(
                f"the zone cannot follow its store (etcd {', '.join(self.etcd.endpoints)}); "
                "retry shortly"
            )
        return self.mirror

    # --- writes ----------------------------------------------------------------------

    async def _commit(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        """Apply ops if compares hold, then wait until the mirror holds the outcome: this
        write, or the state that made a compare fail."""
        result = await self.etcd.txn(compares, ops)
        await self._caught_up(result)
        return result

    async def _caught_up(self, result: TxnResult) -> None:
        mirror = self.mirror

        def caught_up() -> bool:
            if result.succeeded:  # a write of nothing has no revision of its own to wait for
                return not result.changed or mirror.revision >= result.revision
            return all(
                mirror.mod(key) == mod or mirror.mod(key) > result.revision
                for key, mod in result.current.items()
            )

        if not await mirror.until(caught_up, self.etcd.request_timeout_s):
            raise StoreUnavailable(
                f"etcd revision {result.revision} did not reach the zone's watch within "
                f"{self.etcd.request_timeout_s} s"
            )

    async def _write(self, plan: Callable[[Mirror], _Plan[T]], *, fenced: bool = False) -> T:
        """Decide on the mirror, write, and decide again while another write won; fenced:
        only while this replica leads (see fenced)."""
        commit = self.fenced if fenced else self._commit
        for _ in range(ATTEMPTS):
            step = plan(self._view())
            if not step.ops or (await commit(step.compares, step.ops)).succeeded:
                return step.answer
        raise StoreUnavailable(f"the zone's state kept changing over {ATTEMPTS} attempts")

    async def fenced(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        """Commit (as _commit) a write the leader makes: while this replica believes it
        leads, the transaction also compares the leader key's create revision with its
        term, so a replica that lost the lead without noticing (paused, partitioned)
        writes nothing and gets NotLeader. A replica that does not lead writes unfenced
        (a heartbeat clearing a host's deliveries, an admin's removal: any replica's).
        Use it (or _write(..., fenced=True)) for every write of the leader's loops."""
        fence = self.fence
        if fence is None:
            return await self._commit(compares, ops)
        self._view()
        leader = Compare(self.layout.leader, "create", "==", fence)
        result = await self.etcd.txn([leader, *compares], ops)
        # The leader key is written once per term: its mod revision is its create revision.
        if not result.succeeded and result.current.get(self.layout.leader, 0) != fence:
            raise NotLeader(
                f"this zone replica no longer leads (its leader key of revision {fence} is "
                "gone): the leader's write was refused"
            )
        await self._caught_up(result)
        return result

    async def put_host(self, host: str, report: HostReport, at: float) -> bool:
        """A heartbeat renews the host's lease; the report is written (with the alive key,
        under a new lease if the old one expired) only when liveness.report_due says so."""
        mirror = self._view()
        entry, lease = mirror.hosts.get(host), mirror.alive.get(host)
        if lease is not None and await self.keeper.renew(lease) <= 0:
            lease = None  # expired: the watch is about to drop the alive key
        if lease is not None and entry is not None:
            stored = entry.data["report"]
            written = entry.data["last_heartbeat"]
            if not report_due(
                stored, report.model_dump(mode="json"), written, at, self.report_interval_s
            ):
                return False
        if lease is None:
            lease = await self.etcd.grant(self.host_lease_ttl_s)
        key, alive = self.layout.host(host), self.layout.alive(host)

        def plan(mirror: Mirror) -> _Plan[bool]:
            entry = mirror.hosts.get(host)
            registered = now() if entry is None else entry.data["registered_at"]
            ops: list[Op] = [Put(key, host_value(report, registered, at))]
            ops.append(Put(alive, str(lease).encode(), lease))
            return _Plan([unchanged(key, mirror.mod(key))], ops, entry is None)

        return await self._write(plan)

    async def remove_host(self, host: str) -> HostRemoval:
        layout = self.layout

        def plan(mirror: Mirror) -> _Plan[HostRemoval]:
            held = sorted(
                (mirror.nodes[c][n] for c, n in mirror.nodes_on.get(host, ())),
                key=lambda n: (n.cluster, n.name),
            )
            live = [n for n in held if not n.deleting and not _deleting(mirror, n.cluster)]
            if live:
                return _Plan([], [], HostRemoval(live, []))
            placed = layout.placed(host)
            compares = [unchanged(placed, mirror.mod(placed))]
            compares += [_same(mirror, layout.node(n.cluster, n.name)) for n in held]
            ops: list[Op] = [Delete(layout.node(n.cluster, n.name)) for n in held]
            ops += [
                Delete(layout.gateway(c, host)) for c in sorted(mirror.gateways_on.get(host, ()))
            ]
            ops += [Delete(layout.deliveries_of(host), prefix=True)]
            ops += [Delete(layout.host_keys(host), prefix=True)]
            return _Plan(compares, ops, HostRemoval([], held))

        return await self._write(plan)

    async def create_cluster(
        self, cluster: ClusterRecord, nodes: Iterable[NodeRecord], gateways: Iterable[Gateway]
    ) -> None:
        """Stale when the name, the VNI or a range was taken meanwhile, or a node's host is
        gone."""
        nodes, gateways = list(nodes), list(gateways)
        layout = self.layout
        hosts = sorted({n.host for n in nodes})
        key = layout.cluster(cluster.name)
        compares = [absent(key), *map(absent, layout.allocations(cluster))]
        compares += [present(layout.host(h)) for h in hosts]
        # No gateway can exist while the cluster key is absent: they go in one transaction.
        ops: list[Op] = [Put(key, cluster_value(cluster))]
        ops += [Put(k, cluster.name.encode()) for k in layout.allocations(cluster)]
        ops += self._placing(nodes, gateways)
        result = await self._commit(compares, ops)
        if not result.succeeded:
            raise Stale(_why(result, layout, cluster.name, hosts))

    async def scale(
        self,
        name: str,
        spec: ClusterSpec,
        add: Iterable[NodeRecord],
        gateways: Iterable[Gateway],
        remove: Iterable[str],
    ) -> None:
        """Stale when the cluster changed, is gone or being deleted, or a new node's host is
        gone or lost the cluster's gateway."""
        add, gateways, remove = list(add), list(gateways), list(remove)
        layout, mirror = self.layout, self._view()
        current = mirror.clusters.get(name)
        if current is None or current.deleting:
            raise Stale(f"cluster {name} is gone or being deleted")
        key = layout.cluster(name)
        hosts = sorted({n.host for n in add})
        new = {g.host for g in gateways}
        compares = [unchanged(key, mirror.mod(key))]
        compares += [absent(layout.node(name, n.name)) for n in add]
        compares += [present(layout.host(h)) for h in hosts]
        compares += [absent(layout.gateway(name, h)) for h in sorted(new)]
        compares += [present(layout.gateway(name, h)) for h in hosts if h not in new]
        ops: list[Op] = [Put(key, cluster_value(replace(current, spec=spec)))]
        ops += self._placing(add, gateways)
        for node in (mirror.nodes.get(name, {}).get(n) for n in remove):
            if node is not None:
                compares.append(_same(mirror, layout.node(name, node.name)))
                ops.append(
                    Put(layout.node(name, node.name), node_value(replace(node, deleting=True)))
                )
        result = await self._commit(compares, ops)
        if not result.succeeded:
            raise Stale(_why(result, layout, name, hosts))

    def _placing(self, nodes: list[NodeRecord], gateways: list[Gateway]) -> list[Op]:
        """Put nodes and gateways, and bump the placed key of each host (remove_host
        compares it)."""
        layout = self.layout
        ops: list[Op] = [Put(layout.node(n.cluster, n.name), node_value(n)) for n in nodes]
        ops += [Put(layout.gateway(g.cluster, g.host), gateway_value(g)) for g in gateways]
        placed: dict[str, list[str]] = {}
        for node in nodes:
            placed.setdefault(node.host, []).append(f"{node.cluster}/{node.name}")
        ops += [Put(layout.placed(h), " ".join(keys).encode()) for h, keys in placed.items()]
        return ops

    async def mark_cluster_deleting(self, name: str) -> None:
        layout = self.layout

        def plan(mirror: Mirror) -> _Plan[None]:
            current = mirror.clusters.get(name)
            if current is None:
                return _Plan([], [], None)
            key = layout.cluster(name)
            compares = [unchanged(key, mirror.mod(key))]
            ops: list[Op] = [Put(key, cluster_value(replace(current, deleting=True)))]
            for node in mirror.nodes_of(name):
                if node.deleting:
                    continue  # already so (and perhaps being removed at this moment)
                node_key = layout.node(name, node.name)
                compares.append(_same(mirror, node_key))
                ops.append(Put(node_key, node_value(replace(node, deleting=True))))
            return _Plan(compares, ops, None)

        await self._write(plan)

    async def remove_node(self, cluster: str, name: str) -> None:
        layout = self.layout

        def plan(mirror: Mirror) -> _Plan[None]:
            node = mirror.nodes.get(cluster, {}).get(name)
            if node is None:
                return _Plan([], [], None)
            others = [n for n in mirror.nodes_of(cluster) if n.host == node.host and n != node]
            compares = [
                _same(mirror, layout.node(cluster, name)),
                _same(mirror, layout.cluster(cluster)),
            ]
            compares += [_same(mirror, layout.node(cluster, n.name)) for n in others]
            ops: list[Op] = [Delete(layout.node(cluster, name))]
            if not others:  # its host's last node of the cluster: the gateway goes too
                ops.append(Delete(layout.gateway(cluster, node.host)))
            return _Plan(compares, ops, None)

        await self._write(plan, fenced=True)  # the leader's, once an agent removed it

    async def remove_cluster(self, name: str) -> None:
        layout = self.layout

        def plan(mirror: Mirror) -> _Plan[None]:
            current = mirror.clusters.get(name)
            if current is None:
                return _Plan([], [], None)
            ops: list[Op] = [
                Delete(layout.nodes_of(name), prefix=True),
                Delete(layout.gateways_of(name), prefix=True),
                Delete(layout.events(name)),
                Delete(layout.cluster(name)),
                *(Delete(key) for key in layout.allocations(current)),
            ]
            return _Plan([_same(mirror, layout.cluster(name))], ops, None)

        await self._write(plan, fenced=True)  # the leader's, once no host holds a node

    async def replace_node(self, node: NodeRecord) -> None:
        """Write a node's record anew (a re-creation in place); Stale when the node is gone
        or being deleted. Leader-only (fenced)."""
        layout = self.layout

        def plan(mirror: Mirror) -> _Plan[None]:
            current = mirror.nodes.get(node.cluster, {}).get(node.name)
            if current is None or current.deleting:
                raise Stale(f"node {node.cluster}/{node.name} is gone or being deleted")
            key = layout.node(node.cluster, node.name)
            written = replace(current, created_at=node.created_at, shape=node.shape)
            written = replace(written, generation=node.generation)
            return _Plan([_same(mirror, key)], [Put(key, node_value(written))], None)

        await self._write(plan, fenced=True)

    def events(self, cluster: str) -> list[ClusterEvent]:
        return list(self._view().events.get(cluster, []))

    async def add_event(self, cluster: str, event: ClusterEvent) -> None:
        """Keep event as the cluster's latest (the oldest goes beyond MAX_EVENTS).
        Leader-only (fenced)."""
        key = self.layout.events(cluster)

        def plan(mirror: Mirror) -> _Plan[None]:
            kept = mirror.events.get(cluster, [])
            value = events_value([*kept, event])
            return _Plan([_same(mirror, key)], [Put(key, value)], None)

        await self._write(plan, fenced=True)

    async def set_delivery(self, host: str, kind: str, key: str, digest: str | None) -> None:
        """Record what an agent acknowledged; fenced (NotLeader when this replica no longer
        leads: nothing is written)."""
        target = self.layout.delivery(host, kind, key)
        op: Op = Delete(target) if digest is None else Put(target, digest.encode())
        await self._write(lambda mirror: _Plan([], [op], None), fenced=True)

    # --- the image catalogue ---------------------------------------------------------

    async def put_image(self, image: CatalogueImage, check: ImageCheck) -> bool:
        """Store image after check (on the copy the write compares with); True when the
        name is new (the same source again changes nothing)."""
        key = self.layout.image(image.name)

        def plan(mirror: Mirror) -> _Plan[bool]:
            current = mirror.images.get(image.name)
            check(current, _naming(mirror, image.name))
            if current is not None and current.source == image.source:
                return _Plan([], [], False)
            return _Plan([_same(mirror, key)], [Put(key, image_value(image))], current is None)

        return await self._write(plan)

    async def delete_image(self, name: str, check: ImageCheck) -> None:
        key = self.layout.image(name)

        def plan(mirror: Mirror) -> _Plan[None]:
            check(mirror.images.get(name), _naming(mirror, name))
            return _Plan([_same(mirror, key)], [Delete(key)], None)

        await self._write(plan)

    def images(self) -> list[CatalogueImage]:
        mirror = self._view()
        return [mirror.images[name] for name in sorted(mirror.images)]

    def image(self, name: str) -> CatalogueImage | None:
        return self._view().images.get(name)

    # --- replicas and the leader ------------------------------------------------------

    async def register(self, replica: str, value: bytes, lease: int) -> None:
        """This replica's key, bound to its lease (GET /v1/zone lists them)."""
        await self._commit([], [Put(self.layout.replica(replica), value, lease)])

    async def campaign(self, replica: str, lease: int) -> int | None:
        """Create the leader key for replica, bound to lease, if there is none; the key's
        revision (the fence of this term) once the mirror holds it, else None."""
        key = self.layout.leader
        result = await self._commit([absent(key)], [Put(key, replica.encode(), lease)])
        return result.revision if result.succeeded else None

    async def record_certificate(self, host: str, generation: int | None, not_after: str) -> None:
        """Record a certificate issued to host: bootstrapped by a host token of generation
        (Stale, nothing written, when that generation or a later one was taken before),
        or renewed (generation None)."""
        key = self.layout.certificate(host)

        def plan(mirror: Mirror) -> _Plan[None]:
            taken = _generation(mirror, host)
            if generation is not None and generation <= taken:
                raise Stale(f"host token generation {generation} of {host} was used")
            value = certificate_value(
                HostCertificate(not_after, taken if generation is None else generation)
            )
            return _Plan([unchanged(key, mirror.mod(key))], [Put(key, value)], None)

        await self._write(plan)

    # --- reads -----------------------------------------------------------------------

    def hosts(self) -> list[HostRecord]:
        mirror = self._view()
        return [r for h in sorted(mirror.hosts) if (r := mirror.host(h)) is not None]

    def host(self, host: str) -> HostRecord | None:
        return self._view().host(host)

    def clusters(self) -> list[ClusterRecord]:
        mirror = self._view()
        return [mirror.clusters[name] for name in sorted(mirror.clusters)]

    def cluster(self, name: str) -> ClusterRecord | None:
        return self._view().clusters.get(name)

    def nodes(self, cluster: str | None = None) -> list[NodeRecord]:
        mirror = self._view()
        if cluster is not None:
            return mirror.nodes_of(cluster)
        return [n for name in sorted(mirror.nodes) for n in mirror.nodes_of(name)]

    def nodes_near(self, host: str) -> list[NodeRecord]:
        mirror = self._view()
        clusters = sorted({c for c, _ in mirror.nodes_on.get(host, ())})
        return [n for name in clusters for n in mirror.nodes_of(name)]

    def gateways(self, cluster: str | None = None) -> list[Gateway]:
        mirror = self._view()
        names = sorted(mirror.gateways) if cluster is None else [cluster]
        return [g for c in names for _, g in sorted(mirror.gateways.get(c, {}).items())]

    def deliveries(self, host: str) -> dict[tuple[str, str], str]:
        return dict(self._view().deliveries.get(host, {}))

    def token_generation(self, host: str) -> int:
        """The generation of the host token that last bootstrapped host (0: none did)."""
        return _generation(self._view(), host)

    def certificates(self) -> dict[str, HostCertificate]:
        return dict(self._view().certificates)


def _same(mirror: Mirror, key: str) -> Compare:
    return unchanged(key, mirror.mod(key))


def _naming(mirror: Mirror, image: str) -> list[str]:
    nodes = [n for name in mirror.nodes for n in mirror.nodes[name].values()]
    return naming(image, mirror.clusters.values(), nodes)


def _generation(mirror: Mirror, host: str) -> int:
    certificate = mirror.certificates.get(host)
    return 0 if certificate is None else certificate.token_generation


def _deleting(mirror: Mirror, cluster: str) -> bool:
    record = mirror.clusters.get(cluster)
    return record is not None and record.deleting


def _why(result: TxnResult, layout: Layout, cluster: str, hosts: list[str]) -> str:
    """What beat a cluster's write, from the compared keys as they are now."""
    gone = [h for h in hosts if result.current.get(layout.host(h)) == 0]
    if gone:
        return f"host {', '.join(gone)} left the zone"
    return f"another zone or request changed cluster {cluster}, its hosts or the free ranges"
