"""Pure diff: the cluster networks this host should have vs. what the kernel has -> actions.

Ownership is read from the device alias (names.owner_alias), never from the name alone: a
device without our alias, or with the alias of another host's agent, is someone else's,
and no action is ever planned for it. Stale devices of ours go first (VXLAN devices, then
bridges, then their isolation rules), then each wanted cluster is converged: its bridge
(with its isolation rule), the taps of its running VMs that are not in it, its VXLAN
device, then its FDB entries by difference, so a peer coming or going touches only that
peer's entries.

Rules carry no alias: an isolation rule (iif habr<vni>, our priority, prohibit) is ours
to delete only when that bridge is ours or no device holds its name any more.
"""

from __future__ import annotations

from collections.abc import Iterable

from network.actions import (
    Action,
    AddIsolationRule,
    AppendFdb,
    CreateBridge,
    CreateVxlan,
    DeleteBridge,
    DeleteFdb,
    DeleteIsolationRule,
    DeleteVxlan,
    DisableForwarding,
    RemoveAddress,
    SetAddress,
    SetMaster,
    SetMtu,
    SetUp,
)
from network.model import (
    VXLAN_OVERHEAD,
    BridgeSeen,
    BridgeWanted,
    ClusterNetworkWanted,
    FdbEntry,
    ForeignDeviceError,
    HostNetworkWanted,
    HostSeen,
    NetworkError,
    Peer,
    TapSeen,
    Underlay,
    VxlanSeen,
    interface,
)
from network.names import is_bridge_name

__all__ = [
    "Action",
    "AddIsolationRule",
    "AppendFdb",
    "BridgeSeen",
    "BridgeWanted",
    "ClusterNetworkWanted",
    "CreateBridge",
    "CreateVxlan",
    "DeleteBridge",
    "DeleteFdb",
    "DeleteIsolationRule",
    "DeleteVxlan",
    "DisableForwarding",
    "ForeignDeviceError",
    "HostNetworkWanted",
    "HostSeen",
    "NetworkError",
    "Peer",
    "RemoveAddress",
    "SetAddress",
    "SetMaster",
    "SetMtu",
    "SetUp",
    "TapSeen",
    "Underlay",
    "VxlanSeen",
    "plan",
]


def plan(wanted: HostNetworkWanted, seen: HostSeen) -> list[Action]:
    """Actions that turn seen into wanted. Raises NetworkError (or ForeignDeviceError)
    before planning anything when the wanted state cannot be had."""
    clusters = _index_wanted(wanted.clusters)
    host, underlay = wanted.host, wanted.underlay
    device_mtu = _device_mtu(wanted, seen)
    bridges = {bridge.name: bridge for bridge in seen.bridges}
    vxlans = {vxlan.name: vxlan for vxlan in seen.vxlans}
    for cluster in clusters:
        _check_cluster(cluster, underlay, device_mtu)
        _check_free(cluster, host, cluster.bridge, bridges.get(cluster.bridge), seen)
        if underlay is not None:
            _check_free(cluster, host, cluster.vxlan, vxlans.get(cluster.vxlan), seen)
            _check_vni_free(cluster, host, underlay, seen.vxlans)
    stale_vxlans = [v.name for v in seen.vxlans if _is_stale_vxlan(v, clusters, host, underlay)]
    stale_bridges = [b.name for b in seen.bridges if _is_stale_bridge(b, clusters, host)]
    actions: list[Action] = [DeleteVxlan(name) for name in stale_vxlans]
    actions += [DeleteBridge(name) for name in stale_bridges]
    actions += [
        DeleteIsolationRule(name)
        for name in sorted(seen.isolation_rules)
        if _is_stale_rule(name, clusters, host, seen)
    ]
    for cluster in clusters:
        bridge = None if cluster.bridge in stale_bridges else bridges.get(cluster.bridge)
        guarded = cluster.bridge in seen.isolation_rules
        actions += _converge_bridge(cluster, host, bridge, device_mtu, guarded)
        actions += _plug_taps(cluster, seen.taps, bridge is None)
        if underlay is None or device_mtu is None:
            continue
        vxlan = None if cluster.vxlan in stale_vxlans else vxlans.get(cluster.vxlan)
        actions += _converge_vxlan(cluster, host, vxlan, underlay, device_mtu, bridge is None)
    return actions


def _index_wanted(wanted: Iterable[ClusterNetworkWanted]) -> list[ClusterNetworkWanted]:
    by_vni: dict[int, ClusterNetworkWanted] = {}
    for cluster in wanted:
        other = by_vni.setdefault(cluster.vni, cluster)
        if other is not cluster:
            raise NetworkError(
                f"clusters {other.cluster} and {cluster.cluster} both want bridge "
                f"{cluster.bridge} (same vni {cluster.vni}); fix the vni assignment"
            )
    return sorted(by_vni.values(), key=lambda cluster: cluster.vni)


def _device_mtu(wanted: HostNetworkWanted, seen: HostSeen) -> int | None:
    """The MTU of every VXLAN device and bridge: the underlay's minus VXLAN's overhead."""
    underlay = wanted.underlay
    if underlay is None:
        return None
    holder = seen.holder(underlay.address)
    if holder is None:
        raise NetworkError(
            f"underlay address {underlay.address} is not on any device of this host; "
            "assign it (or fix the configured underlay address) before wiring cluster networks"
        )
    if underlay.mtu is not None and underlay.mtu > holder.mtu:
        raise NetworkError(
            f"underlay MTU {underlay.mtu} is above the MTU {holder.mtu} of {holder.device}, "
            f"which holds {underlay.address}; lower the configured MTU or raise the device's"
        )
    return (underlay.mtu or holder.mtu) - VXLAN_OVERHEAD


def _check_cluster(
    cluster: ClusterNetworkWanted, underlay: Underlay | None, device_mtu: int | None
) -> None:
    if underlay is None and cluster.peers:
        raise NetworkError(
            f"cluster {cluster.cluster} has peers but this host has no underlay address; "
            "configure the underlay or serve the cluster from this host alone"
        )
    if device_mtu is not None and cluster.mtu > device_mtu:
        raise NetworkError(
            f"cluster {cluster.cluster} (vni {cluster.vni}) wants MTU {cluster.mtu}, but the "
            f"underlay leaves {device_mtu} after VXLAN's {VXLAN_OVERHEAD} bytes; lower the "
            f"cluster MTU to {device_mtu} or less, or raise the underlay MTU"
        )


def _is_ours(device: BridgeSeen | VxlanSeen, host: str) -> bool:
    return device.owner is not None and device.owner.host == host


def _check_free(
    cluster: ClusterNetworkWanted,
    host: str,
    name: str,
    ours: BridgeSeen | VxlanSeen | None,
    seen: HostSeen,
) -> None:
    if ours is None:
        devices: list[BridgeSeen | VxlanSeen] = [*seen.bridges, *seen.vxlans]
        taken = any(name == device.name for device in devices)
        if not taken and name not in seen.other_links:
            return
    elif _is_ours(ours, host):
        return
    needs = f"cluster {cluster.cluster} (vni {cluster.vni}) of host {host!r} needs that name"
    if ours is not None and ours.owner is not None:
        raise ForeignDeviceError(
            f"{_kind(ours)} {name} belongs to hostagent host {ours.owner.host!r} (alias "
            f"{ours.alias!r}); {needs}. Agents sharing a network namespace need distinct "
            "vnis: give the cluster another vni, or run the agents in separate namespaces; "
            "hostagent never touches another host's devices."
        )
    what = f"{_kind(ours)} {name} with alias {ours.alias!r}" if ours else f"device {name}"
    raise ForeignDeviceError(
        f"{what} exists but was not created by hostagent; {needs}. Delete or rename the "
        f"device (`ip link del {name}`) once nothing uses it; hostagent never touches it."
        + _legacy_hint(ours, cluster, host)
    )


def _legacy_hint(
    ours: BridgeSeen | VxlanSeen | None, cluster: ClusterNetworkWanted, host: str
) -> str:
    """Agents before host ids wrote `hostagent cluster=<c> vni=<v>`: such a device may well
    be this host's own, in use by running VMs; marking it keeps them connected."""
    if ours is None or not (ours.alias or "").startswith("hostagent cluster="):
        return ""
    return (
        " It carries the alias of a hostagent without host ids: if it is this host's, adopt "
        f"it instead: `ip link set {ours.name} alias '{cluster.alias(host)}'`."
    )


def _kind(device: BridgeSeen | VxlanSeen) -> str:
    return "bridge" if isinstance(device, BridgeSeen) else "vxlan"


def _check_vni_free(
    cluster: ClusterNetworkWanted, host: str, underlay: Underlay, seen: Iterable[VxlanSeen]
) -> None:
    """The kernel allows one VXLAN device per (vni, port): another's blocks ours."""
    for vxlan in seen:
        if _is_ours(vxlan, host) or (vxlan.vni, vxlan.port) != (cluster.vni, underlay.port):
            continue
        whose = (
            f"of hostagent host {vxlan.owner.host!r}" if vxlan.owner else "not created by hostagent"
        )
        raise ForeignDeviceError(
            f"vxlan {vxlan.name} ({whose}) already uses vni {vxlan.vni} on UDP port "
            f"{vxlan.port}, which cluster {cluster.cluster} needs; remove it or give the "
            "cluster another vni"
        )


def _is_stale_bridge(seen: BridgeSeen, wanted: Iterable[ClusterNetworkWanted], host: str) -> bool:
    """Ours, and no wanted cluster has a bridge of that name and owner."""
    if not _is_ours(seen, host):
        return False
    return not any((c.bridge, c.owner(host)) == (seen.name, seen.owner) for c in wanted)


def _is_stale_vxlan(
    seen: VxlanSeen, wanted: Iterable[ClusterNetworkWanted], host: str, underlay: Underlay | None
) -> bool:
    """Ours, and not the device a wanted cluster needs: vni, port, local and learning are
    fixed at creation, so a device that differs in one of them is deleted and made anew."""
    if not _is_ours(seen, host):
        return False
    if underlay is None:
        return True
    found = (seen.name, seen.owner, seen.vni, seen.port, seen.local, seen.learning)
    return not any(
        found == (c.vxlan, c.owner(host), c.vni, underlay.port, underlay.address, False)
        for c in wanted
    )


def _is_stale_rule(
    name: str, wanted: Iterable[ClusterNetworkWanted], host: str, seen: HostSeen
) -> bool:
    """An isolation rule no wanted cluster needs, on a bridge of ours or on a name no device
    holds (a detached rule guards nothing: it is what deleting a bridge of ours leaves
    behind when the agent stops in between). A rule naming anyone else's device stays."""
    if not is_bridge_name(name) or any(cluster.bridge == name for cluster in wanted):
        return False
    bridge = next((bridge for bridge in seen.bridges if bridge.name == name), None)
    if bridge is not None:
        return _is_ours(bridge, host)
    return name not in seen.other_links and all(vxlan.name != name for vxlan in seen.vxlans)


def _converge_bridge(
    wanted: ClusterNetworkWanted,
    host: str,
    seen: BridgeSeen | None,
    device_mtu: int | None,
    guarded: bool,
) -> list[Action]:
    """guarded: the bridge's isolation rule is there (it outlives the bridge: rules name
    their iif, so a bridge made anew is guarded by the rule its predecessor had)."""
    mtu = wanted.mtu if device_mtu is None else device_mtu
    actions: list[Action] = []
    if seen is None:
        alias = wanted.alias(host)
        actions.append(CreateBridge(wanted.bridge, alias, mtu))
        # A new bridge inherits conf/default/forwarding, which ip_forward=1 has set to 1.
        seen = BridgeSeen(wanted.bridge, alias, (), mtu, up=False, forwarding=True)
    target = interface(wanted.address)
    actions += [
        RemoveAddress(seen.name, address)
        for address in seen.addresses
        if interface(address) != target
    ]
    if target not in {interface(address) for address in seen.addresses}:
        actions.append(SetAddress(seen.name, str(target)))
    if seen.mtu != mtu:
        actions.append(SetMtu(seen.name, mtu))
    if seen.forwarding:
        actions.append(DisableForwarding(seen.name))
    if not guarded:
        actions.append(AddIsolationRule(seen.name))
    if not seen.up:
        actions.append(SetUp(seen.name))
    return actions


def _plug_taps(
    wanted: ClusterNetworkWanted, seen: Iterable[TapSeen], bridge_is_new: bool
) -> list[Action]:
    """The cluster's taps that exist (their VM runs) but are not in its bridge: libvirt
    plugs a tap in once, when the VM starts, and a bridge made anew starts without ports."""
    return [
        SetMaster(tap.name, wanted.bridge)
        for tap in sorted(seen, key=lambda tap: tap.name)
        if tap.name in wanted.taps and (bridge_is_new or tap.master != wanted.bridge)
    ]


def _converge_vxlan(
    wanted: ClusterNetworkWanted,
    host: str,
    seen: VxlanSeen | None,
    underlay: Underlay,
    mtu: int,
    bridge_is_new: bool,
) -> list[Action]:
    name = wanted.vxlan
    actions: list[Action] = []
    have: frozenset[FdbEntry] = frozenset()
    if seen is None:
        local, port, alias = underlay.address, underlay.port, wanted.alias(host)
        actions.append(CreateVxlan(name, alias, wanted.vni, local, port, mtu, wanted.bridge))
    else:
        have = seen.fdb
        if seen.mtu != mtu:
            actions.append(SetMtu(name, mtu))
        # A deleted bridge releases its ports: a new one starts without our VXLAN device.
        if bridge_is_new or seen.master != wanted.bridge:
            actions.append(SetMaster(name, wanted.bridge))
        if not seen.up:
            actions.append(SetUp(name))
    return actions + _fdb_changes(name, have, wanted.fdb(underlay.address))


def _fdb_changes(name: str, have: frozenset[FdbEntry], want: frozenset[FdbEntry]) -> list[Action]:
    """Removals first, so a MAC that moved to another peer never has two destinations."""
    actions: list[Action] = [DeleteFdb(name, e.mac, e.dst) for e in sorted(have - want)]
    return actions + [AppendFdb(name, e.mac, e.dst) for e in sorted(want - have)]
