"""What the cluster networks of this host should be: from the node records, the
underlay settings and the peers. Pure, apart from the peer source it is given.

Peers come from a PeerSource: in standalone mode the static lists of the agent's
configuration ([[network.clusters]]); with a zone (later), from the zone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from hostagent.config import NetworkConfig
from hostagent.store import NodeRecord
from network.model import ClusterNetworkWanted, Peer, Underlay


class PeerSource(Protocol):
    def peers(self, cluster: str) -> frozenset[Peer]: ...


class StaticPeers:
    """Peers from the configuration: every host of a cluster may list all hosts,
    itself included (its own underlay address is skipped)."""

    def __init__(self, config: NetworkConfig) -> None:
        self._peers = {
            entry.cluster: frozenset(Peer(p.address, frozenset(p.macs)) for p in entry.peers)
            for entry in config.clusters
        }

    def peers(self, cluster: str) -> frozenset[Peer]:
        return self._peers.get(cluster, frozenset())


def underlay(config: NetworkConfig) -> Underlay | None:
    if config.underlay_address is None:
        return None
    return Underlay(config.underlay_address, config.underlay_mtu, config.vxlan_port)


def wanted_networks(
    records: Iterable[NodeRecord], peers: PeerSource, with_underlay: bool
) -> list[ClusterNetworkWanted]:
    """One network per cluster that still has a node on this host."""
    wanted: dict[int, ClusterNetworkWanted] = {}
    for record in records:
        net, cluster = record.spec.network, record.key.cluster
        if net.vni not in wanted:
            wanted[net.vni] = ClusterNetworkWanted(
                cluster=cluster,
                vni=net.vni,
                address=str(net.gateway_interface),
                mtu=net.mtu,
                peers=peers.peers(cluster) if with_underlay else frozenset(),
            )
    return sorted(wanted.values(), key=lambda network: network.vni)
