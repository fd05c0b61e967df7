"""The etcd store's local copy of the zone's keys, kept by a watch: the records indexed the
way the zone reads them (a host's nodes, a cluster's nodes and gateways, a host's
deliveries), so every read is a lookup and a delivery pass costs what its host serves.

Each watch batch is applied whole (a transaction's keys appear together). Host reports are
validated lazily, once per version of the report, not on every read. ``until`` lets a
writer wait until its own write, or the write that beat it, is in the copy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from hostagent.zone.etcd import Event, KeyValue
from hostagent.zone.keys import (
    Layout,
    certificate_record,
    cluster_record,
    gateway_record,
    host_record,
    image_record,
    node_record,
)
from hostagent.zone.store import (
    CatalogueImage,
    ClusterEvent,
    ClusterRecord,
    Gateway,
    HostCertificate,
    HostRecord,
    NodeRecord,
    events_of,
)


@dataclass
class _Host:
    data: dict[str, Any]
    record: HostRecord | None = None  # validated on first read


@dataclass
class Mirror:
    layout: Layout
    revision: int = 0
    mods: dict[str, int] = field(default_factory=dict)  # every key -> its mod_revision
    hosts: dict[str, _Host] = field(default_factory=dict)
    clusters: dict[str, ClusterRecord] = field(default_factory=dict)
    nodes: dict[str, dict[str, NodeRecord]] = field(default_factory=dict)  # cluster -> name
    nodes_on: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # host -> keys
    gateways: dict[str, dict[str, Gateway]] = field(default_factory=dict)  # cluster -> host
    gateways_on: dict[str, set[str]] = field(default_factory=dict)  # host -> clusters
    deliveries: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)
    certificates: dict[str, HostCertificate] = field(default_factory=dict)  # host ->
    events: dict[str, list[ClusterEvent]] = field(default_factory=dict)  # cluster -> its last
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> registration
    images: dict[str, CatalogueImage] = field(default_factory=dict)  # the catalogue, by name
    leader: tuple[str, int] | None = None  # the leading replica and its key's revision
    alive: dict[str, int] = field(default_factory=dict)  # host -> its live lease
    # Told the hosts whose work a watched change may have changed (the leader's Deliverer
    # kicks them), a host that becomes alive (registers, or reports again) among them.
    on_hosts: Callable[[set[str]], None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def load(self, revision: int, kvs: Iterable[KeyValue]) -> None:
        """Start again from a full listing at revision."""
        indexes: list[dict[Any, Any]] = [self.mods, self.hosts, self.clusters, self.nodes]
        indexes += [self.nodes_on, self.gateways, self.gateways_on, self.deliveries]
        indexes += [self.certificates, self.replicas, self.alive, self.events, self.images]
        for index in indexes:
            index.clear()
        self.leader = None
        for kv in kvs:
            self._put(kv.key, kv.value, kv.mod_revision)
        self.revision = revision
        self._signal()

    def apply(self, events: list[Event]) -> None:
        hosts: set[str] = set()
        clusters: set[str] = set()
        for event in events:
            self._touching(event, hosts, clusters)
            if event.value is None:
                self._delete(event.key)
            else:
                self._put(event.key, event.value, event.revision)
            self.revision = max(self.revision, event.revision)
        hosts |= {n.host for c in clusters for n in self.nodes.get(c, {}).values()}
        if hosts and self.on_hosts is not None:
            self.on_hosts(hosts)
        self._signal()

    def _touching(self, event: Event, hosts: set[str], clusters: set[str]) -> None:
        """Which hosts' work the event may change (the hosts of a cluster are added once
        the batch is applied, so that hosts new to it count too)."""
        match self.layout.parse(event.key):
            case ("hosts", host, "alive") if event.value is not None and host not in self.alive:
                hosts.add(host)
            case ("clusters", name) | ("nodes", name, _) | ("gateways", name, _):
                clusters.add(name)
                hosts.update(n.host for n in self.nodes.get(name, {}).values())
            case ("deliveries", host, _, _) if event.value is None:
                hosts.add(host)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until condition holds on the copy; False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def mod(self, key: str) -> int:
        return self.mods.get(key, 0)

    def host(self, host: str) -> HostRecord | None:
        entry = self.hosts.get(host)
        if entry is None:
            return None
        if entry.record is None:
            entry.record = host_record(host, entry.data)
        return replace(entry.record, alive=host in self.alive)

    def nodes_of(self, cluster: str) -> list[NodeRecord]:
        return [n for _, n in sorted(self.nodes.get(cluster, {}).items())]

    def _put(self, key: str, value: bytes, revision: int) -> None:
        try:
            self._record(key, value, revision)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"etcd key {key} at revision {revision} is unreadable: {exc}") from exc
        self.mods[key] = revision

    def _record(self, key: str, value: bytes, revision: int) -> None:
        match self.layout.parse(key):
            case ("hosts", host, "report"):
                self.hosts[host] = _Host(json.loads(value))
            case ("hosts", host, "alive"):
                self.alive[host] = int(value)
            case ("clusters", name):
                self.clusters[name] = cluster_record(name, value)
            case ("nodes", cluster, name):
                node = node_record(cluster, name, value)
                self._drop_node(cluster, name)
                self.nodes.setdefault(cluster, {})[name] = node
                self.nodes_on.setdefault(node.host, set()).add((cluster, name))
            case ("gateways", cluster, host):
                self.gateways.setdefault(cluster, {})[host] = gateway_record(cluster, host, value)
                self.gateways_on.setdefault(host, set()).add(cluster)
            case ("deliveries", host, kind, name):
                self.deliveries.setdefault(host, {})[(kind, name)] = value.decode()
            case ("certificates", host):
                self.certificates[host] = certificate_record(value)
            case ("events", cluster):
                self.events[cluster] = events_of(value)
            case ("replicas", replica):
                self.replicas[replica] = json.loads(value)
            case ("images", name):
                self.images[name] = image_record(name, value)
            case ("leader",):  # written once per term: its mod revision is its create revision
                self.leader = (value.decode(), revision)

    def _delete(self, key: str) -> None:
        self.mods.pop(key, None)
        match self.layout.parse(key):
            case ("hosts", host, "report"):
                self.hosts.pop(host, None)
            case ("hosts", host, "alive"):
                self.alive.pop(host, None)
            case ("clusters", name):
                self.clusters.pop(name, None)
            case ("nodes", cluster, name):
                self._drop_node(cluster, name)
            case ("gateways", cluster, host):
                _discard(self.gateways, cluster, host)
                _discard(self.gateways_on, host, cluster)
            case ("deliveries", host, kind, name):
                _discard(self.deliveries, host, (kind, name))
            case ("certificates", host):
                self.certificates.pop(host, None)
            case ("events", cluster):
                self.events.pop(cluster, None)
            case ("replicas", replica):
                self.replicas.pop(replica, None)
            case ("images", name):
                self.images.pop(name, None)
            case ("leader",):
                self.leader = None

    def _drop_node(self, cluster: str, name: str) -> None:
        old = self.nodes.get(cluster, {}).get(name)
        if old is not None:
            _discard(self.nodes, cluster, name)
            _discard(self.nodes_on, old.host, (cluster, name))


def _discard(index: dict[Any, Any], outer: Any, inner: Any) -> None:
    """Remove inner from index[outer] (a dict or a set), and outer once empty."""
    members = index.get(outer)
    if members is None:
        return
    if isinstance(members, dict):
        members.pop(inner, None)
    else:
        members.discard(inner)
    if not members:
        del index[outer]
