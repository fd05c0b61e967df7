"""What each host should have, derived from the zone's records: the NodeSpecs of its nodes,
the peers of each of its clusters, and what it must remove. Pure."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hostagent.model import ClusterSpec as NodeClusterSpec
from hostagent.model import MasterRef, NetworkSpec, NodeSpec, Role
from hostagent.zone.alloc import node_index, with_prefix
from hostagent.zone.rollout import Shape, shape_of
from hostagent.zone.store import ClusterRecord, Gateway, HostRecord, NodeRecord
from network.names import mac_address

API_PORT = 6443


@dataclass(frozen=True)
class PeerEntry:
    address: str
    macs: tuple[str, ...]

    def body(self) -> dict[str, object]:
        return {"address": self.address, "macs": list(self.macs)}


@dataclass(frozen=True)
class HostWork:
    """Everything one host should hold, keyed the way deliveries are recorded."""

    nodes: dict[str, NodeSpec] = field(default_factory=dict)  # "cluster/node" -> spec
    peers: dict[str, tuple[PeerEntry, ...]] = field(default_factory=dict)  # cluster -> peers
    remove: tuple[str, ...] = ()  # "cluster/node" the host must delete


def node_key(cluster: str, node: str) -> str:
    return f"{cluster}/{node}"


def peers_digest(peers: Iterable[PeerEntry]) -> str:
    data = [peer.body() for peer in peers]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def masters(nodes: Iterable[NodeRecord]) -> list[MasterRef]:
    chosen = [n for n in nodes if n.role is Role.MASTER]
    chosen.sort(key=lambda n: node_index(n.name))
    return [MasterRef(name=n.name, address=n.address) for n in chosen]


def api_endpoint(nodes: Iterable[NodeRecord], vip: str | None = None) -> str | None:
    """The cluster's VIP, port 6443; a cluster made before VIPs keeps its first master's."""
    if vip is not None:
        return f"{vip}:{API_PORT}"
    first = masters(nodes)
    return f"{first[0].address}:{API_PORT}" if first else None


def node_shape(cluster: ClusterRecord, node: NodeRecord) -> Shape:
    """What the node runs (was last sent): its own shape, or for a record from before
    rollouts its cluster's spec."""
    if node.shape is not None:
        return node.shape
    spec = cluster.spec
    return shape_of(spec, spec.masters if node.role is Role.MASTER else spec.workers)


def node_spec(
    cluster: ClusterRecord,
    node: NodeRecord,
    gateway: str,
    all_nodes: Iterable[NodeRecord],
    mtu: int,
) -> NodeSpec:
    spec = cluster.spec
    shape = node_shape(cluster, node)
    nodes = list(all_nodes)
    return NodeSpec(
        role=node.role,
        vcpus=shape.vcpus,
        memory_mib=shape.memory_mib,
        disk_gib=shape.disk_gib,
        image=shape.image,
        kubernetes_version=shape.kubernetes_version,
        generation=node.generation,
        network=NetworkSpec(
            vni=cluster.vni,
            address=with_prefix(node.address, cluster.node_subnet),
            gateway=gateway,
            mtu=mtu,
        ),
        ssh_authorized_keys=list(spec.ssh_authorized_keys),
        cluster=NodeClusterSpec(
            masters=masters(nodes),
            api_endpoint=api_endpoint(nodes, cluster.vip),
            pod_cidr=cluster.pod_cidr,
            service_cidr=cluster.service_cidr,
            etcd_mode=spec.etcd_mode,
            vip=cluster.vip,
        ),
    )


def host_work(
    host: str,
    clusters: Mapping[str, ClusterRecord],
    nodes: Iterable[NodeRecord],
    gateways: Iterable[Gateway],
    hosts: Mapping[str, HostRecord],
    mtu: int,
) -> HostWork:
    """What `host` should run: every live node placed on it, the peers of each cluster
    it serves (the other hosts of the cluster with their nodes' MACs), and the nodes of
    it that are being removed."""
    by_cluster: dict[str, list[NodeRecord]] = {}
    for node in nodes:
        by_cluster.setdefault(node.cluster, []).append(node)
    gateway_of = {(g.cluster, g.host): g.address for g in gateways}
    work = HostWork()
    remove: list[str] = []
    for name, members in sorted(by_cluster.items()):
        cluster = clusters.get(name)
        if cluster is None:
            continue
        live = [n for n in members if not n.deleting and not cluster.deleting]
        for node in members:
            if node.host != host:
                continue
            gateway = gateway_of.get((name, host))
            if node in live and gateway is not None:
                spec = node_spec(cluster, node, gateway, live, mtu)
                work.nodes[node_key(name, node.name)] = spec
            elif node not in live:
                remove.append(node_key(name, node.name))
        if any(n.host == host for n in live):
            work.peers[name] = _peers(name, host, live, hosts)
    return HostWork(work.nodes, work.peers, tuple(remove))


def _peers(
    cluster: str, host: str, live: Iterable[NodeRecord], hosts: Mapping[str, HostRecord]
) -> tuple[PeerEntry, ...]:
    macs: dict[str, list[str]] = {}
    for node in live:
        if node.host != host:
            macs.setdefault(node.host, []).append(mac_address(cluster, node.name))
    peers = []
    for other, found in sorted(macs.items()):
        record = hosts.get(other)
        address = record.report.underlay_address if record else None
        if address is not None:
            peers.append(PeerEntry(address, tuple(sorted(found))))
    return tuple(peers)
