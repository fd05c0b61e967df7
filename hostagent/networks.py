"""What the cluster networks of this host should be: from the node records, the
underlay settings and the peers. Pure, apart from the peer source it is given.

Peers come from a PeerSource: the static lists of the agent's configuration
([[network.clusters]], StaticPeers) and the lists the zone delivers through
`PUT /v1/clusters/{cluster}/peers` (StoredPeers, kept in the store). The daemon uses
their union (MergedPeers).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hostagent.config import NetworkConfig
from hostagent.errors import Invalid, MalformedRequest, NotFound, validation_problems
from hostagent.store import NodeRecord, Store
from network.model import ClusterNetworkWanted, Peer, Underlay, _check_peers
from network.names import tap_name


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


MAX_PEERS = 1024
MAX_MACS = 4096
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class PeerEntry(BaseModel):
    """One other host serving the cluster, as the zone sends it."""

    model_config = ConfigDict(extra="forbid")
    address: Annotated[str, Field(max_length=15, description="the host's underlay IPv4")]
    macs: list[Annotated[str, Field(max_length=17)]] = Field(
        default_factory=list, max_length=MAX_MACS, description="the MACs of its nodes"
    )


class PeerList(BaseModel):
    """Body and answer of `/v1/clusters/{cluster}/peers`."""

    model_config = ConfigDict(extra="forbid")
    peers: list[PeerEntry] = Field(max_length=MAX_PEERS)

    @classmethod
    def of(cls, peers: Iterable[Peer]) -> PeerList:
        return cls(peers=[PeerEntry(address=p.address, macs=sorted(p.macs)) for p in peers])


def parse_peers(cluster: str, body: bytes) -> list[Peer]:
    """A PUT body as peers. MalformedRequest when it is no JSON object; Invalid when a value
    is wrong: no unicast IPv4, a bad MAC, an address twice, a MAC under two peers."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedRequest('the body must be a JSON object: {"peers": [...]}')
    try:
        listed = PeerList.model_validate(data)
        peers = [Peer(entry.address, frozenset(entry.macs)) for entry in listed.peers]
        for peer in peers:
            address = ipaddress.IPv4Address(peer.address)
            if address.is_multicast or address.is_unspecified or address == _BROADCAST:
                raise ValueError(f"peer address {peer.address} is not a unicast address")
        _check_peers(cluster, peers)
    except ValidationError as exc:
        raise Invalid(validation_problems(exc, plain=True)) from exc
    except ValueError as exc:  # network.model's checks
        raise Invalid(str(exc)) from exc
    return peers


class StoredPeers:
    """The peer lists the zone delivered, kept in the store so they survive a restart.
    on_change(cluster) runs after a committed change, to rewire the cluster's FDB."""

    def __init__(self, store: Store, on_change: Callable[[str], None]) -> None:
        self.store = store
        self.on_change = on_change

    async def put(self, cluster: str, peers: list[Peer]) -> list[Peer]:
        """Replace the cluster's list; the same list again changes nothing."""
        current = self.store.peers(cluster)
        if current is None or set(current) != set(peers):
            await self.store.set_peers(cluster, peers)
            self.on_change(cluster)
        return self.get(cluster)

    def get(self, cluster: str) -> list[Peer]:
        peers = self.store.peers(cluster)
        if peers is None:
            raise NotFound(f"cluster {cluster} has no peer list on this host")
        return peers

    async def delete(self, cluster: str) -> None:
        """Idempotent: forgetting a list that is not there is no error."""
        if await self.store.delete_peers(cluster):
            self.on_change(cluster)

    def peers(self, cluster: str) -> frozenset[Peer]:
        return frozenset(self.store.peers(cluster) or ())


class MergedPeers:
    """The union of several sources (the daemon's: the zone's stored lists, then the
    static configuration). Per address the MACs are merged; a MAC that two sources place
    at different addresses stays with the first source naming it, as the zone's list is
    newer than a configuration file."""

    def __init__(self, *sources: PeerSource) -> None:
        self.sources = sources

    def peers(self, cluster: str) -> frozenset[Peer]:
        macs: dict[str, set[str]] = {}
        owner: dict[str, str] = {}
        for source in self.sources:
            for peer in source.peers(cluster):
                mine = macs.setdefault(peer.address, set())
                mine.update(
                    m for m in peer.macs if owner.setdefault(m, peer.address) == peer.address
                )
        return frozenset(Peer(address, frozenset(found)) for address, found in macs.items())


def underlay(config: NetworkConfig) -> Underlay | None:
    if config.underlay_address is None:
        return None
    return Underlay(config.underlay_address, config.underlay_mtu, config.vxlan_port)


def wanted_networks(
    records: Iterable[NodeRecord], peers: PeerSource, with_underlay: bool
) -> list[ClusterNetworkWanted]:
    """One network per cluster that still has a node on this host, with its nodes' taps."""
    wanted: dict[int, ClusterNetworkWanted] = {}
    taps: dict[int, set[str]] = {}
    for record in records:
        net, cluster = record.spec.network, record.key.cluster
        taps.setdefault(net.vni, set()).add(tap_name(cluster, record.key.name))
        if net.vni not in wanted:
            wanted[net.vni] = ClusterNetworkWanted(
                cluster=cluster,
                vni=net.vni,
                address=str(net.gateway_interface),
                mtu=net.mtu,
                peers=peers.peers(cluster) if with_underlay else frozenset(),
            )
    return sorted(
        (replace(network, taps=frozenset(taps[vni])) for vni, network in wanted.items()),
        key=lambda network: network.vni,
    )
