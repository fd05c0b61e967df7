"""The host's cluster networks as they should be (…Wanted) and as the kernel has them (…Seen).

Plain, validated values and no kernel access: plan.py diffs the two, netlink.py fills the Seen
side in. A cluster network on this host is a bridge (the VMs' taps and the gateway address)
plus, once the host has an underlay, a VXLAN device in that bridge with static FDB entries
toward the other hosts that serve the cluster (Neutron's l2population, without multicast).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.names import check_name
from network.names import (
    IFNAMSIZ,
    Owner,
    bridge_name,
    check_host,
    is_tap_name,
    owner_alias,
    parse_owner_alias,
    vxlan_name,
)

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + the inner Ethernet header 14
DEFAULT_PORT = 4789  # IANA; the kernel's own default (8472) is Linux-only
ZERO_MAC = "00:00:00:00:00:00"  # the FDB "flood" entry: broadcast and unknown unicast
# `ip rule ... pref` of the isolation rule (`iif habr<vni> pref 900 prohibit`, see
# docs/network.md): after 0, where the local table is looked up, so the host's own
# addresses stay reachable from the bridge; ahead of main (32766), default (32767) and the
# catch-all rules VPN tools add (Tailscale's 5210..5270, wg-quick's just below 32766),
# which would route what arrives; clear of 1000, where the VRF driver puts its l3mdev rule.
ISOLATION_PRIORITY = 900
MIN_MTU = 576
MAX_MTU = 65_535
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class NetworkError(Exception):
    """A network change cannot be made; the message names the device and what to do."""


class ForeignDeviceError(NetworkError):
    """A name or VNI hostagent needs is held by a device this host's agent did not create
    (someone else's, or another hostagent's sharing the network namespace)."""


def interface(address: str) -> ipaddress.IPv4Interface:
    """An IPv4 address with prefix length, e.g. 10.42.0.1/24."""
    if "/" not in address:
        raise ValueError(f"address {address!r} needs a prefix length, e.g. 10.42.0.1/24")
    return ipaddress.IPv4Interface(address)


def ipv4(address: str, what: str) -> str:
    """The canonical form of an IPv4 address without prefix; ValueError naming what it is."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        raise ValueError(f"{what} {address[:80]!r} is not an IPv4 address") from None


def unicast_mac(mac: str) -> str:
    """A node's MAC in lower case; the all-zeros and multicast addresses are refused."""
    canonical = mac.lower()
    if not _MAC.fullmatch(canonical) or canonical == ZERO_MAC or int(canonical[:2], 16) & 1:
        raise ValueError(f"{mac[:40]!r} is not a unicast MAC address like 52:54:00:12:34:56")
    return canonical


def _check_mtu(mtu: int, what: str) -> None:
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"{what} {mtu} is outside {MIN_MTU}..{MAX_MTU}")


# --- wanted ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Underlay:
    """This host's end of the underlay: the address VXLAN packets leave from, MTU and port.

    mtu None means the MTU of the device holding address, read at every reconcile.
    """

    address: str
    mtu: int | None = None
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", ipv4(self.address, "underlay address"))
        low = MIN_MTU + VXLAN_OVERHEAD
        if self.mtu is not None and not low <= self.mtu <= MAX_MTU:
            raise ValueError(
                f"underlay MTU {self.mtu} is outside {low}..{MAX_MTU} "
                f"(VXLAN takes {VXLAN_OVERHEAD} bytes, a cluster needs at least {MIN_MTU})"
            )
        if not 1 <= self.port <= 65_535:
            raise ValueError(f"VXLAN port {self.port} is outside 1..65535")


@dataclass(frozen=True, order=True)
class FdbEntry:
    """A static forwarding entry on a VXLAN device: frames for mac go to the host at dst."""

    mac: str
    dst: str

    def __str__(self) -> str:
        return f"{self.mac} dst {self.dst}"


@dataclass(frozen=True)
class Peer:
    """Another host serving the cluster: its underlay address and its nodes' MACs, if known."""

    address: str
    macs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", ipv4(self.address, "peer address"))
        object.__setattr__(self, "macs", frozenset(unicast_mac(mac) for mac in self.macs))

    def fdb(self) -> frozenset[FdbEntry]:
        """The flood entry toward this peer, plus one entry per known node MAC."""
        macs = {ZERO_MAC, *self.macs}
        return frozenset(FdbEntry(mac, self.address) for mac in macs)


@dataclass(frozen=True)
class ClusterNetworkWanted:
    """One cluster's network on this host.

    address: this host's gateway on the cluster network, with prefix (goes on the bridge).
    mtu: the cluster network's MTU (the VMs' NICs); at most the underlay's MTU - 50.
    peers: the other hosts serving the cluster. A peer at this host's own underlay address
    is skipped, so every host of a zone can be handed the same list.
    taps: the taps (names.tap_name) of the cluster's nodes on this host. libvirt makes them
    and plugs them in when a VM starts; the plan puts back those that exist but are not in
    the bridge (a bridge deleted and made anew starts without ports).
    """

    cluster: str
    vni: int
    address: str
    mtu: int = 1450
    peers: frozenset[Peer] = field(default_factory=frozenset)
    taps: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        interface(self.address)
        check_name("cluster", self.cluster)
        bridge_name(self.vni)  # validates vni
        _check_mtu(self.mtu, f"cluster {self.cluster} MTU")
        object.__setattr__(self, "peers", frozenset(self.peers))
        _check_peers(self.cluster, self.peers)
        object.__setattr__(self, "taps", frozenset(self.taps))
        for tap in sorted(self.taps):
            if not is_tap_name(tap):
                raise ValueError(
                    f"cluster {self.cluster}: tap {tap[:40]!r} is not a hostagent tap name "
                    "(names.tap_name: hat + 11 hex digits)"
                )

    @property
    def bridge(self) -> str:
        return bridge_name(self.vni)

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.vni)

    def owner(self, host: str) -> Owner:
        """Who the cluster's devices belong to when host's agent makes them."""
        return Owner(host, self.cluster, self.vni)

    def alias(self, host: str) -> str:
        """The alias host's agent gives the cluster's devices."""
        return owner_alias(host, self.cluster, self.vni)

    def fdb(self, local: str) -> frozenset[FdbEntry]:
        """Every FDB entry the cluster's VXLAN device needs on the host at local."""
        return frozenset(
            entry for peer in self.peers if peer.address != local for entry in peer.fdb()
        )


def _check_peers(cluster: str, peers: Iterable[Peer]) -> None:
    addresses: set[str] = set()
    owners: dict[str, str] = {}
    for peer in peers:
        if peer.address in addresses:
            raise ValueError(f"cluster {cluster}: peer {peer.address} is listed twice")
        addresses.add(peer.address)
        for mac in peer.macs:
            other = owners.setdefault(mac, peer.address)
            if other != peer.address:
                raise ValueError(
                    f"cluster {cluster}: node MAC {mac} is claimed by peers {other} and "
                    f"{peer.address}; a MAC lives on one host"
                )


@dataclass(frozen=True)
class BridgeWanted:
    """Deprecated spelling of a cluster network without peers (the bridge-only agent's call).

    Kept so existing callers keep working; plan and reconcile take it as
    ClusterNetworkWanted(cluster, vni, address, mtu). New code uses ClusterNetworkWanted.
    """

    name: str
    cluster: str
    vni: int
    address: str
    mtu: int = 1450

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= IFNAMSIZ:
            raise ValueError(f"bridge name {self.name!r} must have 1..{IFNAMSIZ} characters")
        if self.name != bridge_name(self.vni):
            raise ValueError(f"bridge name {self.name!r} must be {bridge_name(self.vni)!r}")
        self.network  # noqa: B018  (validates address, cluster, vni and mtu)

    @classmethod
    def for_cluster(cls, cluster: str, vni: int, address: str, mtu: int = 1450) -> BridgeWanted:
        return cls(bridge_name(vni), cluster, vni, address, mtu)

    @property
    def network(self) -> ClusterNetworkWanted:
        return ClusterNetworkWanted(self.cluster, self.vni, self.address, self.mtu)


@dataclass(frozen=True)
class HostNetworkWanted:
    """Everything this host's cluster networks should be.

    underlay None: the host serves its clusters alone (a one-host lab), so there are bridges
    but no VXLAN devices, bridges get the cluster MTU, and no cluster may have peers.
    host: this agent's host id. It goes into every device's alias, and devices whose alias
    names another host are that host's agent's (two agents may share a namespace, as in a
    lab): never changed, never deleted.
    """

    clusters: tuple[ClusterNetworkWanted, ...] = ()
    underlay: Underlay | None = None
    host: str = field(kw_only=True)

    def __post_init__(self) -> None:
        check_host(self.host)
        object.__setattr__(self, "clusters", tuple(self.clusters))

    @classmethod
    def of(
        cls,
        clusters: Iterable[ClusterNetworkWanted | BridgeWanted],
        underlay: Underlay | None = None,
        *,
        host: str,
    ) -> HostNetworkWanted:
        networks = tuple(c.network if isinstance(c, BridgeWanted) else c for c in clusters)
        return cls(networks, underlay, host=host)


# --- seen --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeSeen:
    """A bridge as the kernel reports it; addresses are IPv4 'a.b.c.d/prefix'.

    forwarding: the bridge's IPv4 forwarding switch (net.ipv4.conf.<name>.forwarding).
    """

    name: str
    alias: str | None
    addresses: tuple[str, ...]
    mtu: int
    up: bool
    forwarding: bool = False

    @property
    def owner(self) -> Owner | None:
        return parse_owner_alias(self.alias) if self.alias else None


@dataclass(frozen=True)
class VxlanSeen:
    """A VXLAN device as the kernel reports it, with the unicast FDB entries it holds."""

    name: str
    alias: str | None
    vni: int
    port: int
    local: str | None
    learning: bool
    mtu: int
    up: bool
    master: str | None
    fdb: frozenset[FdbEntry] = frozenset()

    @property
    def owner(self) -> Owner | None:
        return parse_owner_alias(self.alias) if self.alias else None


@dataclass(frozen=True)
class TapSeen:
    """A tun/tap device (libvirt's, for a VM's NIC) and the bridge it is a port of."""

    name: str
    master: str | None


@dataclass(frozen=True)
class AddressSeen:
    """An IPv4 address on this host and the device (with its MTU) that holds it."""

    address: str
    device: str
    mtu: int


@dataclass(frozen=True)
class HostSeen:
    """The host's network devices as the kernel reports them, ours and everyone else's.

    other_links: the names of every link that is neither a bridge nor a VXLAN device.
    taps: every tun/tap device (these are among other_links too).
    isolation_rules: the iif names of the IPv4 rules `iif <name> pref ISOLATION_PRIORITY
    prohibit` that match on nothing else, whoever added them (rules carry no alias).
    """

    bridges: tuple[BridgeSeen, ...] = ()
    vxlans: tuple[VxlanSeen, ...] = ()
    other_links: frozenset[str] = frozenset()
    addresses: tuple[AddressSeen, ...] = ()
    taps: tuple[TapSeen, ...] = ()
    isolation_rules: frozenset[str] = frozenset()

    def holder(self, address: str) -> AddressSeen | None:
        return next((seen for seen in self.addresses if seen.address == address), None)
