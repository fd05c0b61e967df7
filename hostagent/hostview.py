"""Pure: the JSON of `GET /v1/host` from what the agent knows (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hostagent import __version__, capacity
from hostagent.access import KvmDevice
from network.health import PeerHealth
from network.model import ClusterNetworkWanted


@dataclass(frozen=True)
class HostFacts:
    host_id: str
    physical: capacity.Resources
    allocatable: capacity.Resources
    allocated: capacity.Resources
    domain_type: str | None
    domain_type_reason: str
    kvm: KvmDevice
    libvirt_uri: str
    libvirt_connected: bool
    reconciler: dict[str, int]
    underlay_address: str | None
    vxlan_port: int
    zone: dict[str, Any] | None


def resources(r: capacity.Resources) -> dict[str, float]:
    return {"vcpus": r.vcpus, "memory_mib": r.memory_mib, "disk_gib": r.disk_gib}


def host_view(facts: HostFacts, networks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "host_id": facts.host_id,
        "capacity": resources(facts.physical),
        "allocatable": resources(facts.allocatable),
        "allocated": resources(facts.allocated),
        "domain_type": facts.domain_type,
        "domain_type_reason": facts.domain_type_reason,
        "kvm_device": facts.kvm.as_dict(),
        "version": __version__,
        "libvirt_uri": facts.libvirt_uri,
        "libvirt_connected": facts.libvirt_connected,
        "reconciler": facts.reconciler,
        "underlay": {"address": facts.underlay_address, "vxlan_port": facts.vxlan_port},
        "networks": networks,
        "zone": facts.zone,
    }


def network_view(
    networks: Sequence[ClusterNetworkWanted],
    underlay_address: str | None,
    peer_health: Mapping[str, PeerHealth],
) -> list[dict[str, Any]]:
    """Each cluster network on this host with its peers (this host left out) and their
    last reachability check."""
    info = []
    for network in networks:
        peers = []
        for peer in sorted(network.peers, key=lambda p: p.address):
            if peer.address == underlay_address:
                continue
            health = peer_health.get(peer.address)
            peers.append(
                {
                    "address": peer.address,
                    "macs": sorted(peer.macs),
                    "reachable": health.reachable if health else None,
                    "rtt_ms": health.rtt_ms if health else None,
                    "checked_at": health.checked_at.isoformat() if health else None,
                }
            )
        info.append(
            {
                "cluster": network.cluster,
                "vni": network.vni,
                "bridge": network.bridge,
                "vxlan": network.vxlan if underlay_address is not None else None,
                "address": network.address,
                "mtu": network.mtu,
                "peers": peers,
            }
        )
    return info
