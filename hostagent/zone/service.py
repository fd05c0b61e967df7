"""ZoneService: what the zone's API does, between the HTTP layer and the store.

Every decision (a host's report, a cluster's allocation and placement, a scale, a delete)
is validated completely and written to the store in one transaction before anything acts
on it; the Deliverer (driver.py) then makes the agents match. A rejected request changes
nothing. Writes are awaited (the store commits in its writer thread), so what a decision
assumed about other requests' state is re-checked in its transaction (zone/store.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from common.names import check_name
from hostagent.capacity import Resources
from hostagent.config import check_token_url
from hostagent.errors import (
    Conflict,
    Forbidden,
    Invalid,
    MalformedRequest,
    NotFound,
    OutOfCapacity,
    Unavailable,
    validation_problems,
)
from hostagent.model import Role
from hostagent.store import now as stamp
from hostagent.zone import alloc, desired, observe
from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.desired import HostWork, host_work
from hostagent.zone.hostimages import holds
from hostagent.zone.model import ClusterSpec, HostReport, HostState
from hostagent.zone.placement import HostOffer, NodeRequest, PlacementError, place
from hostagent.zone.rollout import Shape, shape_of, version_change_problem
from hostagent.zone.status import cluster_view, host_state, host_view
from hostagent.zone.store import (
    ClusterEvent,
    ClusterRecord,
    Gateway,
    HostRecord,
    NodeRecord,
    Stale,
    ZoneStore,
)
from pki.backend import Backend
from pki.certset import PROFILE_BY_NAME, profiles_for
from pki.errors import PkiError

log = logging.getLogger(__name__)

DECISION_ATTEMPTS = 3  # a placement another write made stale is decided again, this often


def parse_body(model: type[Any], body: bytes, what: str) -> Any:
    """A request body as model; MalformedRequest (400) for bad JSON, Invalid (422) else."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(error["type"] in ("json_invalid", "model_type") for error in exc.errors()):
            raise MalformedRequest(f"{what} must be a JSON object") from exc
        raise Invalid(f"invalid {what}: {validation_problems(exc)}") from exc


class ZoneService:
    def __init__(
        self,
        store: ZoneStore,
        config: ZoneServerConfig,
        pki: Backend,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.pki = pki
        self.clock = clock
        self.refused: dict[str, str] = {}  # "cluster/node" -> why its host refused it
        self.on_change: Callable[[Iterable[str]], None] = lambda hosts: None
        self.on_rollout: Callable[[str], None] = lambda cluster: None  # the Roller's kick
        self._lock = asyncio.Lock()  # one allocation at a time

    # --- hosts -----------------------------------------------------------------------

    async def report(self, host: str, report: HostReport) -> bool:
        """Store a host's report; True when it registered for the first time. Deliveries
        the report contradicts (a node the agent no longer has, another spec) are
        forgotten, so the host's delivery task sends them again."""
        valid_name("host", host)
        before = self.store.host(host)
        was_ready = before is not None and self._state(before) is HostState.READY
        created = await self.store.put_host(host, report, self.clock())
        reported = {f"{n.cluster}/{n.name}": n.spec_hash for n in report.nodes}
        stale = [
            key
            for (kind, key), digest in self.store.deliveries(host).items()
            if kind == "node" and reported.get(key) != digest
        ]
        for key in stale:
            await self.store.set_delivery(host, "node", key, None)
        images_lost = await self._images_lost(host, report)
        # An agent that lost a node may have lost its state and its peer lists with it:
        # send the peers of those clusters again too.
        lost = {key.partition("/")[0] for key in stale}
        for kind, key in list(self.store.deliveries(host)):
            if kind == "peers" and key in lost:
                await self.store.set_delivery(host, "peers", key, None)
        if created or not was_ready or stale or images_lost:
            if not was_ready and not created:
                log.info("host %s is reporting again", host)
            self.on_change([host])
        return created

    async def _images_lost(self, host: str, report: HostReport) -> list[str]:
        """Forget the image deliveries a report contradicts (the agent no longer holds the
        image at that digest: collected, or its state lost); the images forgotten. An agent
        that reports no images contradicts nothing."""
        if report.images is None:
            return []
        held = {(i.name, i.digest) for i in report.images}
        lost = [
            name
            for (kind, name), digest in self.store.deliveries(host).items()
            if kind == "image" and (name, digest) not in held
        ]
        for name in lost:
            await self.store.set_delivery(host, "image", name, None)
        return lost

    def hosts_view(self) -> list[dict[str, Any]]:
        timeout = self.config.hosts.heartbeat_timeout_s
        certificates = self.store.certificates()
        return [
            host_view(h, self.clock(), timeout, certificates.get(h.id)) for h in self.store.hosts()
        ]

    async def remove_host(self, host: str) -> None:
        """Forget a host (decommissioned, or dead for good). Refused while it holds a node
        the zone still wants (checked in the removal's own transaction); the nodes it held
        that were being removed are forgotten, so a deletion waiting for a dead host
        completes."""
        valid_name("host", host)
        if self.store.host(host) is None:
            raise NotFound(f"host {host} is not registered")
        removal = await self.store.remove_host(host)
        if removal.live:
            names = ", ".join(f"{n.cluster}/{n.name}" for n in removal.live)
            raise Conflict(
                f"host {host} still runs {names}; delete or scale those down first (a node "
                "is never moved silently)"
            )
        log.info("host %s removed from the zone", host)
        for node in removal.forgotten:
            self.refused.pop(f"{node.cluster}/{node.name}", None)
        for cluster in sorted({n.cluster for n in removal.forgotten}):
            await self._after_node_gone(cluster)

    def _state(self, record: HostRecord) -> HostState:
        return host_state(record, self.clock(), self.config.hosts.heartbeat_timeout_s)

    def _offers(self, image: str) -> list[HostOffer]:
        """Every Ready host with an underlay, offering what is left after its reported
        allocation and the zone's nodes it has not reported yet, and whether it holds
        image (at the catalogue's digest when the catalogue has it)."""
        catalogued = self.store.image(image)
        placed: dict[str, list[NodeRecord]] = {}
        for node in self.store.nodes():
            placed.setdefault(node.host, []).append(node)
        clusters = {c.name: c for c in self.store.clusters()}
        offers = []
        for host in self.store.hosts():
            report = host.report
            if self._state(host) is not HostState.READY or report.underlay_address is None:
                continue
            known = {(n.cluster, n.name) for n in report.nodes}
            pending = [n for n in placed.get(host.id, []) if (n.cluster, n.name) not in known]
            used = Resources(
                report.allocated.vcpus, report.allocated.memory_mib, report.allocated.disk_gib
            )
            for node in pending:
                used = used + _cost(clusters[node.cluster], node.role, report)
            free = (
                Resources(
                    report.allocatable.vcpus,
                    report.allocatable.memory_mib,
                    report.allocatable.disk_gib,
                )
                - used
            )
            offers.append(
                HostOffer(
                    host.id,
                    report.failure_domain,
                    free,
                    report.overhead.base_mib,
                    report.overhead.per_gib_mib,
                    has_image=holds(report, image, catalogued),
                )
            )
        return offers

    # --- clusters --------------------------------------------------------------------

    async def put_cluster(self, name: str, spec: ClusterSpec) -> tuple[dict[str, Any], bool]:
        valid_name("cluster", name)
        async with self._lock:
            for _ in range(DECISION_ATTEMPTS):
                try:
                    created = await self._put(name, spec)
                    break
                except Stale as exc:
                    log.info("cluster %s: %s while it was placed; placing again", name, exc)
            else:
                raise Unavailable(
                    f"cluster {name}: hosts kept leaving, or another zone kept taking the "
                    "same ranges, while it was placed; try again"
                )
        return self.cluster(name), created

    async def _put(self, name: str, spec: ClusterSpec) -> bool:
        current = self.store.cluster(name)
        if current is None:
            await self._create(name, spec)
            return True
        await self._update(current, spec)
        return False

    async def _create(self, name: str, spec: ClusterSpec) -> None:
        self._plan(name, spec)  # an unplaceable cluster is refused before it gets CAs
        try:
            await asyncio.to_thread(self.pki.ensure_cluster, name)
        except PkiError as exc:
            raise Unavailable(f"cannot make the CAs of cluster {name}: {exc}") from exc
        # Hosts may have left or stopped reporting while the CAs were made: place again on
        # the hosts there are now. The write re-checks that they are still there (Stale:
        # put_cluster decides again).
        record, nodes, gateways = self._plan(name, spec)
        await self.store.create_cluster(record, nodes, gateways)
        placed = ", ".join(f"{n.name}@{n.host}" for n in nodes)
        await self._event(name, "created", f"vni {record.vni}, {record.node_subnet}: {placed}")
        log.info(
            "cluster %s: vni %d, nodes %s, on %s",
            name,
            record.vni,
            record.node_subnet,
            ", ".join(f"{n.name}@{n.host}" for n in nodes),
        )
        self.on_change({n.host for n in nodes})

    def _plan(
        self, name: str, spec: ClusterSpec
    ) -> tuple[ClusterRecord, list[NodeRecord], list[Gateway]]:
        """A new cluster's allocation and placement on the current hosts (nothing written)."""
        record = self._allocate(name, spec)
        requests = [
            _request(n, Role.MASTER, spec)
            for n in alloc.node_names(Role.MASTER, spec.masters.count)
        ] + [
            _request(n, Role.WORKER, spec)
            for n in alloc.node_names(Role.WORKER, spec.workers.count)
        ]
        assignments = self._place(name, spec.image, requests, {})
        nodes, gateways = self._materialise(record, spec, requests, assignments, [], [])
        return record, nodes, gateways

    def _allocate(self, name: str, spec: ClusterSpec) -> ClusterRecord:
        net = self.config.network
        clusters = self.store.clusters()
        vnis = {c.vni for c in clusters}
        vnis |= {n.vni for h in self.store.hosts() for n in h.report.networks}

        def taken(attribute: str) -> list[ipaddress.IPv4Network]:
            return [ipaddress.IPv4Network(getattr(c, attribute)) for c in clusters]

        node_subnet = alloc.next_subnet(
            ipaddress.IPv4Network(net.node_pool), 24, taken("node_subnet"), "node_pool"
        )
        return ClusterRecord(
            name=name,
            spec=spec,
            vni=alloc.next_vni(vnis, net.vni_min, net.vni_max),
            node_subnet=node_subnet,
            pod_cidr=alloc.next_subnet(
                ipaddress.IPv4Network(net.pod_pool), 20, taken("pod_cidr"), "pod_pool"
            ),
            service_cidr=alloc.next_subnet(
                ipaddress.IPv4Network(net.service_pool), 24, taken("service_cidr"), "service_pool"
            ),
            created_at=stamp(),
            vip=alloc.vip_address(node_subnet),
        )

    def _place(
        self,
        cluster: str,
        image: str,
        requests: list[NodeRequest],
        placed: dict[str, tuple[Role, str]],
    ) -> dict[str, str]:
        offers = self._offers(image)
        if requests and not offers:
            raise OutOfCapacity(
                f"cluster {cluster}: no Ready host with an underlay address is registered "
                "with the zone (GET /v1/hosts)"
            )
        try:
            placement = place(requests, offers, placed)
        except PlacementError as exc:
            raise OutOfCapacity(f"cluster {cluster} cannot be placed: {exc}") from exc
        for warning in placement.warnings:
            log.warning("cluster %s: %s", cluster, warning)
        return placement.assignments

    def _materialise(
        self,
        cluster: ClusterRecord,
        spec: ClusterSpec,
        requests: list[NodeRequest],
        assignments: dict[str, str],
        existing: list[NodeRecord],
        gateways: list[Gateway],
    ) -> tuple[list[NodeRecord], list[Gateway]]:
        """Node records with addresses, at spec's shape of their role, and a gateway for
        each host new to the cluster."""
        addresses = {n.address for n in existing}
        gateway_of = {g.host: g.address for g in gateways}
        nodes: list[NodeRecord] = []
        order = sorted(
            requests, key=lambda r: (r.role is not Role.MASTER, alloc.node_index(r.name))
        )
        for request in order:
            address = alloc.node_address(cluster.node_subnet, addresses | set(gateway_of.values()))
            addresses.add(address)
            host = assignments[request.name]
            pool = spec.masters if request.role is Role.MASTER else spec.workers
            shape = shape_of(spec, pool)
            nodes.append(
                NodeRecord(
                    cluster.name, request.name, request.role, host, address, stamp(), shape=shape
                )
            )
        new: list[Gateway] = []
        for host in sorted({n.host for n in nodes} - set(gateway_of)):
            address = alloc.gateway_address(
                cluster.node_subnet, set(gateway_of.values()), addresses
            )
            gateway_of[host] = address
            new.append(Gateway(cluster.name, host, address))
        return nodes, new

    async def _update(self, current: ClusterRecord, spec: ClusterSpec) -> None:
        name = current.name
        if current.deleting:
            raise Conflict(f"cluster {name} is being deleted; wait until it is gone")
        if spec.fixed_part() != current.spec.fixed_part():
            raise Conflict(
                f"cluster {name} exists with another spec; only workers.count, "
                "kubernetes_version, image, the node sizes, rollout and drain_hook may "
                "change (delete and re-create the cluster to change anything else)"
            )
        nodes = self.store.nodes(name)
        live = [n for n in nodes if not n.deleting]
        self._check_rollout(current, spec, live)
        changed = replace(current, spec=spec)
        if observe.rolling(changed, live):
            if spec != current.spec:  # the same PUT again changes nothing
                await self._start_rollout(current, spec, live)
            return
        workers = sorted(
            (n for n in live if n.role is Role.WORKER), key=lambda n: alloc.node_index(n.name)
        )
        want = spec.workers.count
        if want == len(workers) and spec == current.spec:
            return
        add: list[NodeRecord] = []
        gateways: list[Gateway] = []
        remove = [n.name for n in workers[want:]]
        if want > len(workers):
            used = {alloc.node_index(n.name) for n in nodes if n.role is Role.WORKER}
            free = (i for i in range(1, alloc.MAX_INDEX) if i not in used)
            names = [f"w{next(free)}" for _ in range(want - len(workers))]
            requests = [_request(n, Role.WORKER, spec) for n in names]
            placed = {n.name: (n.role, n.host) for n in live}
            assignments = self._place(name, spec.image, requests, placed)
            add, gateways = self._materialise(
                current, spec, requests, assignments, nodes, self.store.gateways(name)
            )
        await self.store.scale(name, spec, add, gateways, remove)
        added = ", ".join(f"{n.name}@{n.host}" for n in add) or "none"
        change = f"workers {len(workers)} -> {want} (added {added}, removing "
        change += f"{', '.join(remove) or 'none'})"
        if want != len(workers):  # not for a change of how it rolls or drains
            await self._event(name, "scaled", change)
        log.info("cluster %s: %s", name, change)
        self.on_change({n.host for n in [*live, *add]})

    def _check_rollout(
        self, current: ClusterRecord, spec: ClusterSpec, live: list[NodeRecord]
    ) -> None:
        """422 for a change no rollout may make: a minor version skipped or going down, or
        a master's disk shrinking (masters are re-created in place, and disks only grow)."""
        running = [desired.node_shape(current, n).kubernetes_version for n in live]
        problem = version_change_problem(
            current.spec.kubernetes_version, spec.kubernetes_version, running
        )
        if problem:
            raise Invalid(f"cluster {current.name}: {problem}")
        disks = [desired.node_shape(current, n).disk_gib for n in live if n.role is Role.MASTER]
        if spec.masters.disk_gib < max(disks, default=0):
            raise Invalid(
                f"cluster {current.name}: masters.disk_gib cannot shrink (from "
                f"{max(disks)} to {spec.masters.disk_gib}): masters are re-created in place "
                "and their disks only grow"
            )

    async def _start_rollout(
        self, current: ClusterRecord, spec: ClusterSpec, live: list[NodeRecord]
    ) -> None:
        """Store the new spec; the leader's Roller does the rest. Nodes recorded before
        rollouts (no shape of their own) are pinned to the old spec first."""
        for node in live:
            if node.shape is None:
                pinned = replace(node, shape=desired.node_shape(current, node))
                await self.store.replace_node(pinned)
        await self.store.scale(current.name, spec, [], [], [])
        log.info(
            "cluster %s: rolling to kubernetes %s, image %s",
            current.name,
            spec.kubernetes_version,
            spec.image,
        )
        self.on_change({n.host for n in live})
        self.on_rollout(current.name)

    # --- for the Roller (the leader's rollouts and remediations) ---------------------

    def observed(self, record: ClusterRecord) -> list[observe.Observed]:
        nodes = self.store.nodes(record.name)
        hosts = {h: r for h in {n.host for n in nodes} if (r := self.store.host(h)) is not None}
        return observe.observe(
            record,
            nodes,
            self.store.gateways(record.name),
            hosts,
            self.clock(),
            self.config.hosts.heartbeat_timeout_s,
            self.config.network.mtu,
        )

    async def add_workers(self, cluster: str, names: list[str]) -> None:
        """Place new workers at the cluster's spec (a rollout's surge, a replacement)."""
        await self.replace_workers(cluster, names, [])

    async def remove_nodes(self, cluster: str, names: list[str]) -> None:
        await self.replace_workers(cluster, [], names)

    def check_room(self, cluster: str, name: str, instead_of: str) -> None:
        """OutOfCapacity (nothing written) when worker `name` cannot be placed in place of
        `instead_of`: checked before a replacement calls the drain hook or spends budget."""
        record = self.store.cluster(cluster)
        if record is None:
            raise NotFound(f"cluster {cluster} does not exist")
        live = [n for n in self.store.nodes(cluster) if not n.deleting]
        placed = {n.name: (n.role, n.host) for n in live if n.name != instead_of}
        self._place(cluster, record.spec.image, [_request(name, Role.WORKER, record.spec)], placed)

    async def replace_workers(self, cluster: str, add: list[str], remove: list[str]) -> None:
        """In one write: new workers placed, and the workers `remove` marked for removal."""
        async with self._lock:
            for _ in range(DECISION_ATTEMPTS):
                record = self.store.cluster(cluster)
                if record is None or record.deleting:
                    return
                nodes = self.store.nodes(cluster)
                live = [n for n in nodes if not n.deleting]
                requests = [_request(n, Role.WORKER, record.spec) for n in add]
                placed = {n.name: (n.role, n.host) for n in live if n.name not in remove}
                assignments = (
                    self._place(cluster, record.spec.image, requests, placed) if requests else {}
                )
                new, gateways = self._materialise(
                    record, record.spec, requests, assignments, nodes, self.store.gateways(cluster)
                )
                try:
                    await self.store.scale(cluster, record.spec, new, gateways, remove)
                except Stale as exc:
                    log.info("cluster %s: %s while workers were placed; again", cluster, exc)
                    continue
                self.on_change({n.host for n in [*live, *new]})
                return
            raise Unavailable(f"cluster {cluster}: hosts kept changing while workers were placed")

    async def recreate(self, cluster: str, node: NodeRecord, shape: Shape | None) -> None:
        """Re-create a node in place: at shape (a rollout), or at its own shape with a new
        generation (a remediation); its incarnation starts now."""
        if shape is None:
            renewed = replace(node, generation=node.generation + 1, created_at=stamp())
        else:
            renewed = replace(node, shape=shape, created_at=stamp())
        await self.store.replace_node(renewed)
        self.on_change({n.host for n in self.store.nodes(cluster)})

    def cluster(self, name: str) -> dict[str, Any]:
        record = self.store.cluster(valid_name("cluster", name))
        if record is None:
            raise NotFound(f"cluster {name} does not exist")
        return self._view(record)

    def clusters(self) -> list[dict[str, Any]]:
        return [self._view(record) for record in self.store.clusters()]

    def _view(self, record: ClusterRecord) -> dict[str, Any]:
        """The cluster with its nodes, reading only the hosts they are on (listing every
        cluster costs the zone's nodes, not its clusters times its hosts)."""
        timeout = self.config.hosts.heartbeat_timeout_s
        nodes = self.store.nodes(record.name)
        hosts = {h: r for h in {n.host for n in nodes} if (r := self.store.host(h)) is not None}
        rollout = None
        observed = [] if record.deleting else self.observed(record)
        if observed and observe.rollout_on(record, observed):
            rollout = observe.rollout_plan(record, observed, self.clock())
        return cluster_view(
            record,
            nodes,
            hosts,
            self.clock(),
            timeout,
            self.refused,
            rollout=rollout,
            events=self.store.events(record.name),
            catalogue={i.name: i for i in self.store.images()},
        )

    async def delete_cluster(self, name: str) -> dict[str, Any]:
        record = self.store.cluster(valid_name("cluster", name))
        if record is None:
            raise NotFound(f"cluster {name} does not exist")
        if not record.deleting:
            await self.store.mark_cluster_deleting(name)
            hosts = sorted({n.host for n in self.store.nodes(name)})
            await self._event(name, "deleted", f"deleting from {', '.join(hosts) or 'no host'}")
            log.info("cluster %s: deleting", name)
        self.on_change({n.host for n in self.store.nodes(name)})
        return self.cluster(name)

    async def _event(self, cluster: str, kind: str, message: str) -> None:
        """An event of the whole cluster (created, scaled, deleted)."""
        await self.store.add_event(cluster, ClusterEvent(self.clock(), kind, "", None, message))

    # --- for the Deliverer -----------------------------------------------------------

    def work(self, host: str) -> HostWork:
        """What host should hold, read from its own clusters and their hosts only: a pass
        costs what the host serves, not what the zone holds (one round of passes over
        every host would otherwise cost hosts squared)."""
        nodes = self.store.nodes_near(host)
        names = sorted({n.cluster for n in nodes})
        clusters = {name: c for name in names if (c := self.store.cluster(name)) is not None}
        gateways = [g for name in names for g in self.store.gateways(name)]
        peers = {n.host for n in nodes}
        hosts = {h: r for h in sorted(peers) if (r := self.store.host(h)) is not None}
        return host_work(host, clusters, nodes, gateways, hosts, self.config.network.mtu)

    def api_of(self, host: str) -> tuple[str, str | None] | None:
        """The agent's URL and token (None: the agent takes the zone's client certificate
        instead); None when unknown, or when an older zone took a plain
        http URL off loopback (the token is never sent over it; the agent's next report
        is refused until it names https)."""
        record = self.store.host(host)
        if record is None:
            return None
        try:
            url = check_token_url(record.report.api_url, "api_url")
        except ValueError:
            return None
        return url, record.report.api_token

    def hosts_at(self, address: str) -> set[str]:
        """The hosts whose reported api_url has address (an IP or a DNS name) as its host."""
        return {
            record.id
            for record in self.store.hosts()
            if urlsplit(record.report.api_url).hostname == address
        }

    def hosts_with_work(self) -> set[str]:
        hosts = {n.host for n in self.store.nodes()}
        return hosts | {h.id for h in self.store.hosts()}

    async def node_gone(self, host: str, key: str) -> None:
        """The host has removed the node: forget it; a deleting cluster whose last node
        went is removed with its CAs, and its VNI is free once no host reports it."""
        cluster, _, name = key.partition("/")
        await self.store.remove_node(cluster, name)
        self.refused.pop(key, None)
        await self._after_node_gone(cluster)

    async def _after_node_gone(self, cluster: str) -> None:
        others = self.store.nodes(cluster)
        if others:
            self.on_change({n.host for n in others})
            return
        await self._finish_deletion(cluster)

    async def finish_deletions(self) -> None:
        """Complete the deletions a restart interrupted between revoking and forgetting."""
        for record in self.store.clusters():
            await self._finish_deletion(record.name)

    async def _finish_deletion(self, cluster: str) -> None:
        """Revoke a deleting cluster's CAs once it has no node left, then forget it.

        The record goes only after the revoke, and both happen under the allocation lock:
        a cluster of the same name cannot be created (and get CAs) until the old one's are
        gone, across a restart too (the record, still deleting, makes it wait: 409)."""
        async with self._lock:
            record = self.store.cluster(cluster)
            if record is None or not record.deleting or self.store.nodes(cluster):
                return
            try:
                await asyncio.to_thread(self.pki.revoke_cluster, cluster)
            except PkiError as exc:
                log.warning("cluster %s: its CAs could not be removed: %s", cluster, exc)
            await self.store.remove_cluster(cluster)
            log.info("cluster %s: deleted from every host", cluster)

    # --- PKI for agents --------------------------------------------------------------

    def check_pki(self, host: str, cluster: str, cert: str | None = None) -> None:
        """A host may use a cluster's CAs only while it runs a node of the cluster, and
        sign only the certificates its nodes' roles have."""
        valid_name("cluster", cluster)
        roles = {
            n.role.value for n in self.store.nodes(cluster) if n.host == host and not n.deleting
        }
        if not roles:
            raise Forbidden(f"host {host} runs no node of cluster {cluster}")
        if cert is None:
            return
        if cert not in PROFILE_BY_NAME:
            raise Invalid(f"{cert!r} is not a certificate name of pki.certset")
        allowed = {p.name for role in roles for p in profiles_for(role)}
        if cert not in allowed:
            raise Forbidden(
                f"host {host} runs no node of cluster {cluster} whose role has {cert!r}"
            )


def valid_name(kind: str, value: str) -> str:
    try:
        return check_name(kind, value)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc


def _request(name: str, role: Role, spec: ClusterSpec) -> NodeRequest:
    pool = spec.masters if role is Role.MASTER else spec.workers
    return NodeRequest(name, role, pool.vcpus, pool.memory_mib, pool.disk_gib)


def _cost(cluster: ClusterRecord, role: Role, report: HostReport) -> Resources:
    pool = cluster.spec.masters if role is Role.MASTER else cluster.spec.workers
    overhead = report.overhead.base_mib + report.overhead.per_gib_mib * math.ceil(
        pool.memory_mib / 1024
    )
    return Resources(pool.vcpus, pool.memory_mib + overhead, pool.disk_gib)
