"""network.names and network.plan: pure functions, no kernel."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import pytest

from network.model import ISOLATION_PRIORITY, AddressSeen, BridgeWanted, FdbEntry, Peer, TapSeen
from network.names import (
    IFNAMSIZ,
    MAX_VNI,
    Owner,
    bridge_name,
    is_bridge_name,
    is_tap_name,
    mac_address,
    owner_alias,
    parse_owner_alias,
    tap_name,
    vxlan_name,
)
from network.observe import isolation_rules
from network.plan import (
    Action,
    AddIsolationRule,
    AppendFdb,
    BridgeSeen,
    ClusterNetworkWanted,
    CreateBridge,
    CreateVxlan,
    DeleteBridge,
    DeleteFdb,
    DeleteIsolationRule,
    DeleteVxlan,
    DisableForwarding,
    ForeignDeviceError,
    HostNetworkWanted,
    HostSeen,
    NetworkError,
    RemoveAddress,
    SetAddress,
    SetMaster,
    SetMtu,
    SetUp,
    Underlay,
    VxlanSeen,
    plan,
)

LONG = "c" + "-x" * 30 + "9"  # 62 characters...
LONGEST = LONG + "z"  # ...and 63, the longest DNS-1123 label
HOST = "h1"  # the agent whose plans these are
OTHER = "lab-2.example"  # another agent in the same network namespace
LOCAL = "192.0.2.1"
UNDERLAY = Underlay(LOCAL)
ETH0 = AddressSeen(LOCAL, "eth0", 1500)
ZERO = "00:00:00:00:00:00"
RULE42 = frozenset({"habr42"})  # the isolation rule of alpha's bridge


def simulate(seen: HostSeen, actions: list[Action]) -> HostSeen:
    """What the kernel would hold after apply(actions): a model of netlink.apply, not a fake.

    It asserts what the kernel (or netlink.apply's ownership check) would refuse.
    """
    bridges = {bridge.name: bridge for bridge in seen.bridges}
    vxlans = {vxlan.name: vxlan for vxlan in seen.vxlans}
    taps = {tap.name: tap for tap in seen.taps}
    rules = set(seen.isolation_rules)

    def bridge(name: str) -> BridgeSeen:
        assert ours(bridges[name]), f"{name} is not ours"
        return bridges[name]

    def vxlan(name: str) -> VxlanSeen:
        assert ours(vxlans[name]), f"{name} is not ours"
        return vxlans[name]

    def change(name: str, **changes: object) -> None:
        if name in bridges:
            bridges[name] = dataclasses.replace(bridge(name), **changes)  # type: ignore[arg-type]
        else:
            vxlans[name] = dataclasses.replace(vxlan(name), **changes)  # type: ignore[arg-type]

    def free(name: str) -> None:
        assert name not in {*bridges, *vxlans, *seen.other_links}, f"{name} exists"

    for action in actions:
        match action:
            case CreateBridge(name=name, alias=alias, mtu=mtu):
                free(name)
                bridges[name] = BridgeSeen(name, alias, (), mtu, up=False, forwarding=True)
            case DeleteBridge(name=name):
                del bridges[bridge(name).name]
                for port in [v for v in vxlans.values() if v.master == name]:
                    vxlans[port.name] = dataclasses.replace(port, master=None)
                for tap in [t for t in taps.values() if t.master == name]:
                    taps[tap.name] = TapSeen(tap.name, None)
            case SetAddress(name=name, address=address):
                change(name, addresses=(*bridge(name).addresses, address))
            case RemoveAddress(name=name, address=address):
                change(name, addresses=tuple(a for a in bridge(name).addresses if a != address))
            case SetMtu(name=name, mtu=mtu):
                change(name, mtu=mtu)
            case DisableForwarding(name=name):
                change(bridge(name).name, forwarding=False)
            case AddIsolationRule(name=name):
                assert bridge(name).name not in rules, f"rule for {name} exists"
                rules.add(name)
            case DeleteIsolationRule(name=name):
                assert name in rules, f"no rule for {name}"
                assert name not in bridges or bridge(name), "a live bridge of another's"
                assert name not in {*vxlans, *seen.other_links}, f"{name} is another device"
                rules.remove(name)
            case SetUp(name=name):
                change(name, up=True)
            case CreateVxlan(name=name, alias=alias, vni=vni, local=local, port=port):
                free(name)
                assert (vni, port) not in {(v.vni, v.port) for v in vxlans.values()}, "EEXIST"
                master = bridge(action.bridge).name
                vxlans[name] = VxlanSeen(
                    name, alias, vni, port, local, False, action.mtu, True, master
                )
            case DeleteVxlan(name=name):
                del vxlans[vxlan(name).name]
            case SetMaster(name=name, bridge=master) if name in taps:
                assert is_tap_name(name), f"{name} is not a node's tap"
                taps[name] = TapSeen(name, bridge(master).name)
            case SetMaster(name=name, bridge=master):
                change(vxlan(name).name, master=bridge(master).name)
            case AppendFdb(name=name, mac=mac, dst=dst):
                change(name, fdb=vxlan(name).fdb | {FdbEntry(mac, dst)})
            case DeleteFdb(name=name, mac=mac, dst=dst):
                assert FdbEntry(mac, dst) in vxlan(name).fdb, f"{mac} dst {dst} not on {name}"
                change(name, fdb=vxlan(name).fdb - {FdbEntry(mac, dst)})
    return dataclasses.replace(
        seen,
        bridges=tuple(bridges.values()),
        vxlans=tuple(vxlans.values()),
        taps=tuple(taps.values()),
        isolation_rules=frozenset(rules),
    )


def ours(device: BridgeSeen | VxlanSeen) -> bool:
    return device.owner is not None and device.owner.host == HOST


def wanted(
    cluster: str = "alpha",
    vni: int = 42,
    address: str = "10.42.0.1/24",
    peers: tuple[Peer, ...] = (),
    mtu: int = 1450,
    taps: tuple[str, ...] = (),
) -> ClusterNetworkWanted:
    return ClusterNetworkWanted(cluster, vni, address, mtu, frozenset(peers), frozenset(taps))


def host(
    *clusters: ClusterNetworkWanted, underlay: Underlay | None = None, name: str = HOST
) -> HostNetworkWanted:
    return HostNetworkWanted(clusters, underlay, host=name)


def seen_of(want: ClusterNetworkWanted, owner: str = HOST, **changes: object) -> BridgeSeen:
    good = BridgeSeen(want.bridge, want.alias(owner), (want.address,), want.mtu, up=True)
    return dataclasses.replace(good, **changes)  # type: ignore[arg-type]


def vxlan_of(want: ClusterNetworkWanted, owner: str = HOST, **changes: object) -> VxlanSeen:
    good = VxlanSeen(
        want.vxlan,
        want.alias(owner),
        want.vni,
        4789,
        LOCAL,
        False,
        1450,
        True,
        want.bridge,
        want.fdb(LOCAL),
    )
    return dataclasses.replace(good, **changes)  # type: ignore[arg-type]


def guarded(*seen: BridgeSeen) -> frozenset[str]:
    """The isolation rules a kernel holds with these bridges: hostagents' bridges have one."""
    return frozenset(bridge.name for bridge in seen if bridge.owner is not None)


def bridges(*seen: BridgeSeen, others: tuple[str, ...] = ()) -> HostSeen:
    return HostSeen(bridges=seen, other_links=frozenset(others), isolation_rules=guarded(*seen))


def foreign(name: str, alias: str | None = None) -> BridgeSeen:
    return BridgeSeen(name, alias, ("192.168.1.1/24",), 1500, up=True)


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("vni", [1, 42, MAX_VNI])
def test_bridge_name_fits_ifnamsiz(vni: int) -> None:
    assert bridge_name(vni) == f"habr{vni}"
    assert len(bridge_name(vni)) <= IFNAMSIZ


@pytest.mark.parametrize("vni", [1, 42, MAX_VNI])
def test_vxlan_name_fits_ifnamsiz_and_differs_from_bridge(vni: int) -> None:
    assert vxlan_name(vni) == f"havx{vni}"
    assert len(vxlan_name(vni)) <= IFNAMSIZ
    assert vxlan_name(vni) != bridge_name(vni)


@pytest.mark.parametrize("vni", [0, -1, MAX_VNI + 1])
@pytest.mark.parametrize("name", [bridge_name, vxlan_name])
def test_names_reject_vni_out_of_range(vni: int, name: object) -> None:
    with pytest.raises(ValueError, match="vni"):
        name(vni)  # type: ignore[operator]


def test_tap_name_is_short_stable_and_distinct() -> None:
    name = tap_name(LONGEST, LONGEST)
    assert re.fullmatch(r"hat[0-9a-f]{11}", name)
    assert len(name) <= IFNAMSIZ
    assert tap_name(LONGEST, LONGEST) == name
    # "cluster/node" is hashed as one string: the split point matters.
    assert tap_name("a-b", "c") != tap_name("a", "b-c")
    assert tap_name(LONG, "n1") != tap_name(LONG, "n2")


def test_tap_name_is_pinned() -> None:
    # Pinned so a refactor cannot silently rename the taps of running VMs.
    assert tap_name("alpha", "m1") == "hat" + hashlib.sha256(b"alpha/m1").hexdigest()[:11]


@pytest.mark.parametrize(("cluster", "node"), [("alpha", "m1"), (LONGEST, LONGEST), ("a", "0")])
def test_mac_is_locally_administered_unicast(cluster: str, node: str) -> None:
    mac = mac_address(cluster, node)
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    first = int(mac.split(":")[0], 16)
    assert first & 0b10, "locally administered bit must be set"
    assert not first & 0b01, "multicast bit must be clear"
    assert mac_address(cluster, node) == mac


def test_macs_differ_between_nodes() -> None:
    macs = {mac_address("alpha", f"w{i}") for i in range(200)}
    assert len(macs) == 200


@pytest.mark.parametrize(
    ("host_id", "cluster", "vni"),
    [("h1", "alpha", 1), ("H" * 64, LONGEST, MAX_VNI), ("lab-2.example_x", "0", 7), ("-", "a", 2)],
)
def test_owner_alias_round_trips(host_id: str, cluster: str, vni: int) -> None:
    alias = owner_alias(host_id, cluster, vni)
    assert alias == f"hostagent host={host_id} cluster={cluster} vni={vni}"
    assert parse_owner_alias(alias) == Owner(host_id, cluster, vni)


@pytest.mark.parametrize(
    "alias",
    [
        "",
        "libvirt bridge",
        "hostagent cluster=alpha vni=3",  # an agent before host ids: not ours to touch
        "hostagent host=h1 cluster=alpha",
        "hostagent host= cluster=alpha vni=3",
        "hostagent host=h/1 cluster=alpha vni=3",
        f"hostagent host={'h' * 65} cluster=alpha vni=3",
        "hostagent host=h1 cluster=Alpha vni=3",
        "hostagent host=h1 cluster=alpha vni=0",
        f"hostagent host=h1 cluster=alpha vni={MAX_VNI + 1}",
        "hostagent host=h1 cluster=alpha vni=3 extra",
        "hostagent host=h1 cluster=-alpha vni=3",
        f"hostagent host=h1 cluster={LONGEST}x vni=3",
        "hostagent cluster=alpha host=h1 vni=3",
    ],
)
def test_parse_owner_alias_rejects_foreign(alias: str) -> None:
    assert parse_owner_alias(alias) is None


def test_owner_alias_rejects_bad_cluster() -> None:
    with pytest.raises(ValueError, match="DNS-1123"):
        owner_alias("h1", "has space", 1)


@pytest.mark.parametrize("host_id", ["", "h 1", "h1/x", "h" * 65, "hé"])
def test_owner_alias_and_host_network_reject_bad_host(host_id: str) -> None:
    with pytest.raises(ValueError, match=r"host id .* must be 1\.\.64 characters"):
        owner_alias(host_id, "alpha", 1)
    with pytest.raises(ValueError, match="host id"):
        HostNetworkWanted((), host=host_id)


# --- plan: bridges (a host serving its clusters alone: no underlay) -----------------------


def test_creates_missing_bridge() -> None:
    assert plan(host(wanted()), HostSeen()) == [
        CreateBridge("habr42", "hostagent host=h1 cluster=alpha vni=42", 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        DisableForwarding("habr42"),
        AddIsolationRule("habr42"),
        SetUp("habr42"),
    ]


def test_fixes_address_mtu_forwarding_and_state_of_ours() -> None:
    want = wanted()
    drifted = seen_of(
        want, addresses=("10.42.0.1/16", "10.9.9.9/24"), mtu=1500, up=False, forwarding=True
    )
    assert plan(host(want), bridges(drifted)) == [
        RemoveAddress("habr42", "10.42.0.1/16"),
        RemoveAddress("habr42", "10.9.9.9/24"),
        SetAddress("habr42", "10.42.0.1/24"),
        SetMtu("habr42", 1450),
        DisableForwarding("habr42"),
        SetUp("habr42"),
    ]


def test_in_sync_plans_nothing() -> None:
    want = wanted()
    assert plan(host(want), bridges(seen_of(want))) == []


def test_deletes_only_stale_bridges_of_ours() -> None:
    keep, gone = wanted("alpha", 42), wanted("beta", 43, "10.43.0.1/24")
    seen = bridges(
        seen_of(keep),
        seen_of(gone),
        foreign("virbr0"),
        foreign("docker0", alias="docker bridge"),
        foreign("habr99", alias="hostagent, hand made"),
    )
    assert plan(host(keep), seen) == [DeleteBridge("habr43"), DeleteIsolationRule("habr43")]


def test_recreates_bridge_of_ours_left_by_another_cluster() -> None:
    # The zone gave vni 42 to a new cluster: the old cluster's bridge (and its ports) must go.
    old = seen_of(wanted("old", 42))
    assert plan(host(wanted("new", 42)), bridges(old)) == [
        DeleteBridge("habr42"),
        CreateBridge("habr42", "hostagent host=h1 cluster=new vni=42", 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        DisableForwarding("habr42"),
        SetUp("habr42"),
    ]


@pytest.mark.parametrize("alias", [None, "", "my bridge", "hostagent cluster=Bad vni=1"])
def test_foreign_bridge_with_wanted_name_raises(alias: str | None) -> None:
    with pytest.raises(ForeignDeviceError, match=r"habr42.*not created by hostagent.*ip link del"):
        plan(host(wanted()), bridges(foreign("habr42", alias)))


def test_foreign_non_bridge_with_wanted_name_raises() -> None:
    with pytest.raises(ForeignDeviceError, match="device habr42"):
        plan(host(wanted()), bridges(others=("lo", "habr42")))


def test_conflict_plans_nothing_even_for_other_bridges() -> None:
    stale = seen_of(wanted("beta", 43, "10.43.0.1/24"))
    with pytest.raises(ForeignDeviceError):
        plan(host(wanted()), bridges(stale, others=("habr42",)))


def test_two_clusters_wanting_one_vni_raise() -> None:
    with pytest.raises(NetworkError, match="both want bridge habr42"):
        plan(host(wanted("alpha", 42), wanted("beta", 42)), HostSeen())


def test_legacy_bridge_wanted_is_a_cluster_network_without_peers() -> None:
    legacy = BridgeWanted("habr42", "alpha", 42, "10.42.0.1/24", 1400)
    assert HostNetworkWanted.of([legacy], host=HOST).clusters == (wanted(mtu=1400),)
    with pytest.raises(ValueError, match="must be 'habr42'"):
        BridgeWanted("br-alpha", "alpha", 42, "10.42.0.1/24")
    with pytest.raises(ValueError, match="prefix"):
        BridgeWanted.for_cluster("alpha", 42, "10.42.0.1")


def test_without_underlay_peers_are_refused() -> None:
    with pytest.raises(NetworkError, match="has peers but this host has no underlay"):
        plan(host(wanted(peers=(Peer("192.0.2.2"),))), HostSeen())


def test_without_underlay_vxlan_devices_of_ours_go() -> None:
    want = wanted()
    seen = HostSeen(bridges=(seen_of(want),), vxlans=(vxlan_of(want),), isolation_rules=RULE42)
    assert plan(host(want), seen) == [DeleteVxlan("havx42")]


@pytest.mark.parametrize(
    "seen",
    [
        bridges(),
        bridges(seen_of(wanted(), addresses=(), mtu=9000, up=False, forwarding=True)),
        bridges(seen_of(wanted("old", 42)), seen_of(wanted("beta", 43, "10.43.0.1/24"))),
        bridges(foreign("virbr0"), seen_of(wanted(), addresses=("10.42.0.1/24", "10.42.0.2/24"))),
    ],
)
def test_bridges_plan_after_apply_is_empty(seen: HostSeen) -> None:
    want = host(
        wanted(), wanted("gamma", MAX_VNI, "10.200.0.1/16"), wanted(LONGEST, 7, "10.7.0.1/24")
    )
    after = simulate(seen, plan(want, seen))
    assert plan(want, after) == []
    assert [b for b in after.bridges if not ours(b)] == [b for b in seen.bridges if not ours(b)]


def test_plan_for_nothing_wanted_removes_all_of_ours() -> None:
    seen = bridges(seen_of(wanted()), foreign("virbr0"))
    assert simulate(seen, plan(host(), seen)).bridges == (foreign("virbr0"),)


# --- plan: VXLAN across hosts --------------------------------------------------------------

PEER2 = Peer("192.0.2.2", frozenset({"52:54:00:00:00:02"}))
PEER3 = Peer("192.0.2.3")
PEER4 = Peer("192.0.2.4", frozenset({"52:54:00:00:00:04", "52:54:00:00:00:44"}))


def on_host(*seen_bridges: BridgeSeen, vxlans: tuple[VxlanSeen, ...] = ()) -> HostSeen:
    return HostSeen(
        bridges=seen_bridges,
        vxlans=vxlans,
        other_links=frozenset({"lo", "eth0"}),
        addresses=(ETH0,),
        isolation_rules=guarded(*seen_bridges),
    )


def wired(*clusters: ClusterNetworkWanted) -> HostSeen:
    """A host on which every cluster is in place, as netlink would report it."""
    return on_host(*map(seen_of, clusters), vxlans=tuple(map(vxlan_of, clusters)))


def test_creates_bridge_vxlan_and_fdb_for_a_new_cluster() -> None:
    want = wanted(peers=(PEER2, PEER3))
    assert plan(host(want, underlay=UNDERLAY), on_host()) == [
        CreateBridge("habr42", "hostagent host=h1 cluster=alpha vni=42", 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        DisableForwarding("habr42"),
        AddIsolationRule("habr42"),
        SetUp("habr42"),
        CreateVxlan(
            "havx42", "hostagent host=h1 cluster=alpha vni=42", 42, LOCAL, 4789, 1450, "habr42"
        ),
        AppendFdb("havx42", ZERO, "192.0.2.2"),
        AppendFdb("havx42", ZERO, "192.0.2.3"),
        AppendFdb("havx42", "52:54:00:00:00:02", "192.0.2.2"),
    ]


def test_wired_host_plans_nothing() -> None:
    clusters = wanted(peers=(PEER2, PEER3)), wanted("beta", 43, "10.43.0.1/24", (PEER4,))
    assert plan(host(*clusters, underlay=UNDERLAY), wired(*clusters)) == []


def test_port_is_configurable() -> None:
    [*_, create] = plan(host(wanted(), underlay=Underlay(LOCAL, port=8472)), on_host())
    assert create == CreateVxlan("havx42", wanted().alias(HOST), 42, LOCAL, 8472, 1450, "habr42")


def test_own_underlay_address_among_peers_is_skipped() -> None:
    # Every host of a zone may be given the same list of peers.
    want = wanted(peers=(Peer(LOCAL, frozenset({"52:54:00:00:00:01"})), PEER3))
    fdb = [a for a in plan(host(want, underlay=UNDERLAY), on_host()) if isinstance(a, AppendFdb)]
    assert fdb == [AppendFdb("havx42", ZERO, "192.0.2.3")]


# MTU accounting: underlay - 50 on the VXLAN device and the bridge.


def test_device_mtu_follows_the_underlay_device() -> None:
    jumbo = dataclasses.replace(on_host(), addresses=(AddressSeen(LOCAL, "eth0", 9000),))
    actions = plan(host(wanted(), underlay=UNDERLAY), jumbo)
    assert actions[0] == CreateBridge("habr42", wanted().alias(HOST), 8950)
    assert isinstance(actions[-1], CreateVxlan) and actions[-1].mtu == 8950


def test_explicit_underlay_mtu_wins_over_the_device() -> None:
    # e.g. a path through a tunnel with a smaller MTU than the NIC's
    actions = plan(host(wanted(mtu=1400), underlay=Underlay(LOCAL, mtu=1450)), on_host())
    assert actions[0] == CreateBridge("habr42", wanted().alias(HOST), 1400)


def test_underlay_mtu_change_resizes_bridge_and_vxlan() -> None:
    want = wanted()
    jumbo = dataclasses.replace(wired(want), addresses=(AddressSeen(LOCAL, "eth0", 9000),))
    assert plan(host(want, underlay=UNDERLAY), jumbo) == [
        SetMtu("habr42", 8950),
        SetMtu("havx42", 8950),
    ]


@pytest.mark.parametrize(
    ("cluster_mtu", "underlay"), [(1451, UNDERLAY), (1401, Underlay(LOCAL, 1450))]
)
def test_cluster_mtu_above_underlay_minus_50_is_refused(
    cluster_mtu: int, underlay: Underlay
) -> None:
    with pytest.raises(NetworkError, match=rf"wants MTU {cluster_mtu}.*lower the cluster MTU"):
        plan(host(wanted(mtu=cluster_mtu), underlay=underlay), wired(wanted()))


def test_explicit_underlay_mtu_above_the_device_is_refused() -> None:
    with pytest.raises(NetworkError, match="above the MTU 1500 of eth0"):
        plan(host(wanted(), underlay=Underlay(LOCAL, mtu=9000)), on_host())


def test_underlay_address_not_on_this_host_is_refused() -> None:
    with pytest.raises(NetworkError, match=r"192.0.2.99 is not on any device"):
        plan(host(wanted(), underlay=Underlay("192.0.2.99")), on_host())


# Peers change by difference: only the changed peer's entries.


def test_new_peer_appends_only_its_entries() -> None:
    before = wanted(peers=(PEER2, PEER3))
    after = wanted(peers=(PEER2, PEER3, PEER4))
    assert plan(host(after, underlay=UNDERLAY), wired(before)) == [
        AppendFdb("havx42", ZERO, "192.0.2.4"),
        AppendFdb("havx42", "52:54:00:00:00:04", "192.0.2.4"),
        AppendFdb("havx42", "52:54:00:00:00:44", "192.0.2.4"),
    ]


def test_departed_peer_deletes_only_its_entries() -> None:
    before = wanted(peers=(PEER2, PEER3, PEER4))
    other = wanted("beta", 43, "10.43.0.1/24", (PEER4,))
    after = wanted(peers=(PEER2, PEER3))
    assert plan(host(after, other, underlay=UNDERLAY), wired(before, other)) == [
        DeleteFdb("havx42", ZERO, "192.0.2.4"),
        DeleteFdb("havx42", "52:54:00:00:00:04", "192.0.2.4"),
        DeleteFdb("havx42", "52:54:00:00:00:44", "192.0.2.4"),
    ]


def test_node_moving_between_peers_moves_its_mac_entry_only() -> None:
    mac = "52:54:00:00:00:02"
    before = wanted(peers=(PEER2, PEER3))
    after = wanted(peers=(Peer("192.0.2.2"), Peer("192.0.2.3", frozenset({mac.upper()}))))
    assert plan(host(after, underlay=UNDERLAY), wired(before)) == [
        DeleteFdb("havx42", mac, "192.0.2.2"),
        AppendFdb("havx42", mac, "192.0.2.3"),
    ]


def test_stray_fdb_entries_on_our_device_are_removed() -> None:
    want = wanted(peers=(PEER3,))
    stray = FdbEntry("52:54:00:99:99:99", "198.51.100.7")
    seen = on_host(seen_of(want), vxlans=(vxlan_of(want, fdb=want.fdb(LOCAL) | {stray}),))
    assert plan(host(want, underlay=UNDERLAY), seen) == [DeleteFdb("havx42", stray.mac, stray.dst)]


# Drift, replacement and removal of VXLAN devices.


def test_fixes_vxlan_mtu_master_and_state() -> None:
    want = wanted(peers=(PEER3,))
    drifted = vxlan_of(want, mtu=1500, master=None, up=False)
    assert plan(host(want, underlay=UNDERLAY), on_host(seen_of(want), vxlans=(drifted,))) == [
        SetMtu("havx42", 1450),
        SetMaster("havx42", "habr42"),
        SetUp("havx42"),
    ]


def test_lost_bridge_is_recreated_and_vxlan_put_back_in() -> None:
    want = wanted(peers=(PEER3,))
    orphan = vxlan_of(want, master=None)
    assert plan(host(want, underlay=UNDERLAY), on_host(vxlans=(orphan,))) == [
        CreateBridge("habr42", want.alias(HOST), 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        DisableForwarding("habr42"),
        AddIsolationRule("habr42"),
        SetUp("habr42"),
        SetMaster("havx42", "habr42"),
    ]


@pytest.mark.parametrize(
    "change",
    [{"port": 8472}, {"local": "192.0.2.77"}, {"local": None}, {"learning": True}, {"vni": 7}],
)
def test_vxlan_differing_in_a_creation_attribute_is_replaced(change: dict[str, Any]) -> None:
    want = wanted(peers=(PEER3,))
    seen = on_host(seen_of(want), vxlans=(vxlan_of(want, **change),))
    assert plan(host(want, underlay=UNDERLAY), seen) == [
        DeleteVxlan("havx42"),
        CreateVxlan("havx42", want.alias(HOST), 42, LOCAL, 4789, 1450, "habr42"),
        AppendFdb("havx42", ZERO, "192.0.2.3"),
    ]


def test_cluster_no_longer_served_loses_both_devices() -> None:
    keep, gone = wanted(peers=(PEER3,)), wanted("beta", 43, "10.43.0.1/24", (PEER4,))
    assert plan(host(keep, underlay=UNDERLAY), wired(keep, gone)) == [
        DeleteVxlan("havx43"),
        DeleteBridge("habr43"),
        DeleteIsolationRule("habr43"),
    ]


# Devices that are not ours.


def foreign_vxlan(name: str, vni: int, port: int = 4789, alias: str | None = None) -> VxlanSeen:
    return VxlanSeen(name, alias, vni, port, None, True, 1450, True, None)


def test_foreign_vxlan_devices_are_left_alone() -> None:
    want = wanted(peers=(PEER3,))
    flannel = foreign_vxlan("flannel.1", 1, 8472)
    seen = on_host(seen_of(want), vxlans=(vxlan_of(want), flannel))
    assert plan(host(want, underlay=UNDERLAY), seen) == []


@pytest.mark.parametrize("alias", [None, "hostagent, hand made"])
def test_foreign_vxlan_with_wanted_name_raises(alias: str | None) -> None:
    seen = on_host(vxlans=(foreign_vxlan("havx42", 42, alias=alias),))
    with pytest.raises(ForeignDeviceError, match=r"vxlan havx42 with alias .*not created"):
        plan(host(wanted(), underlay=UNDERLAY), seen)


def test_foreign_non_vxlan_with_wanted_name_raises() -> None:
    seen = dataclasses.replace(on_host(), other_links=frozenset({"havx42"}))
    with pytest.raises(ForeignDeviceError, match="device havx42 exists"):
        plan(host(wanted(), underlay=UNDERLAY), seen)


def test_foreign_vxlan_holding_our_vni_and_port_raises() -> None:
    seen = on_host(vxlans=(foreign_vxlan("vxlan-42", 42),))
    with pytest.raises(
        ForeignDeviceError, match=r"vxlan-42 .*already uses vni 42 on UDP port 4789"
    ):
        plan(host(wanted(), underlay=UNDERLAY), seen)
    # The same vni on another port is no conflict for the kernel, nor for us.
    other_port = on_host(vxlans=(foreign_vxlan("vxlan-42", 42, 8472),))
    assert plan(host(wanted(), underlay=UNDERLAY), other_port)


# Idempotence: apply the plan to a model of the kernel, then plan again.

CLUSTERS = (
    wanted(peers=(PEER2, PEER3)),
    wanted("gamma", MAX_VNI, "10.200.0.1/16", (PEER4, Peer(LOCAL))),
    wanted(LONGEST, 7, "10.7.0.1/24", mtu=1400),
)


@pytest.mark.parametrize(
    "seen",
    [
        on_host(),
        wired(*CLUSTERS),
        wired(wanted(peers=(PEER4,)), wanted("beta", 43, "10.43.0.1/24", (PEER2,))),
        wired(wanted("old", 42, peers=(PEER2,))),
        on_host(
            seen_of(CLUSTERS[0], mtu=9000, forwarding=True, up=False),
            foreign("virbr0"),
            vxlans=(
                vxlan_of(CLUSTERS[0], mtu=1500, master=None, up=False),
                vxlan_of(CLUSTERS[1], port=8472),
                foreign_vxlan("flannel.1", 1, 8472),
            ),
        ),
    ],
)
@pytest.mark.parametrize("underlay", [UNDERLAY, Underlay(LOCAL, mtu=1500, port=4790)])
def test_plan_after_apply_is_empty(seen: HostSeen, underlay: Underlay) -> None:
    want = host(*CLUSTERS, underlay=underlay)
    after = simulate(seen, plan(want, seen))
    assert plan(want, after) == []
    assert [d for d in after.vxlans if not ours(d)] == [d for d in seen.vxlans if not ours(d)]
    assert [d for d in after.bridges if not ours(d)] == [d for d in seen.bridges if not ours(d)]


def test_plan_after_apply_without_underlay_is_empty() -> None:
    seen = wired(*CLUSTERS)
    want = host(*(dataclasses.replace(c, peers=frozenset()) for c in CLUSTERS))
    after = simulate(seen, plan(want, seen))
    assert after.vxlans == ()
    assert plan(want, after) == []


# --- plan: two agents in one network namespace ----------------------------------------------
# A demo agent beside a test agent, or lab hosts as namespaces sharing one: each alias names
# its host, and a plan never touches the other host's devices.

MINE = wanted(peers=(PEER3,))
THEIRS = wanted("beta", 43, "10.43.0.1/24", (PEER4,))


def side_by_side() -> HostSeen:
    return on_host(
        seen_of(MINE),
        seen_of(THEIRS, OTHER),
        vxlans=(vxlan_of(MINE), vxlan_of(THEIRS, OTHER)),
    )


def test_two_hosts_each_plan_leaves_the_others_devices_alone() -> None:
    seen = side_by_side()
    assert plan(host(MINE, underlay=UNDERLAY), seen) == []
    assert plan(host(THEIRS, underlay=UNDERLAY, name=OTHER), seen) == []
    # Each agent serving nothing any more takes only its own devices.
    gone = [DeleteVxlan("havx42"), DeleteBridge("habr42"), DeleteIsolationRule("habr42")]
    assert plan(host(underlay=UNDERLAY), seen) == gone
    assert plan(host(underlay=UNDERLAY, name=OTHER), seen) == [
        DeleteVxlan("havx43"),
        DeleteBridge("habr43"),
        DeleteIsolationRule("habr43"),
    ]
    assert plan(host(), seen) == gone


def test_two_hosts_drift_on_the_others_devices_is_not_repaired() -> None:
    theirs = seen_of(THEIRS, OTHER, mtu=9000, up=False, forwarding=True, addresses=())
    drifted = vxlan_of(THEIRS, OTHER, master=None, up=False, fdb=frozenset())
    seen = on_host(seen_of(MINE), theirs, vxlans=(vxlan_of(MINE), drifted))
    assert plan(host(MINE, underlay=UNDERLAY), seen) == []
    repairs = plan(host(THEIRS, underlay=UNDERLAY, name=OTHER), seen)  # its own agent's
    assert repairs and {action.name for action in repairs} == {"habr43", "havx43"}


@pytest.mark.parametrize("underlay", [None, UNDERLAY])
def test_bridge_name_held_by_another_host_raises_naming_it(underlay: Underlay | None) -> None:
    seen = on_host(seen_of(THEIRS, OTHER))
    clash = wanted("gamma", 43, "10.43.0.1/24")
    with pytest.raises(
        ForeignDeviceError,
        match=r"bridge habr43 belongs to hostagent host 'lab-2\.example'.*cluster gamma "
        r"\(vni 43\) of host 'h1' needs that name",
    ):
        plan(host(clash, underlay=underlay), seen)


def test_same_cluster_on_another_host_is_still_theirs() -> None:
    # Both agents were given alpha with vni 42: the devices are the first agent's.
    seen = on_host(seen_of(MINE, OTHER), vxlans=(vxlan_of(MINE, OTHER),))
    with pytest.raises(ForeignDeviceError, match=r"habr42 belongs to hostagent host 'lab-2"):
        plan(host(MINE, underlay=UNDERLAY), seen)


def test_vxlan_name_held_by_another_host_raises_naming_it() -> None:
    seen = on_host(vxlans=(vxlan_of(MINE, OTHER, master=None),))
    with pytest.raises(
        ForeignDeviceError, match=r"vxlan havx42 belongs to hostagent host 'lab-2\.example'"
    ):
        plan(host(MINE, underlay=UNDERLAY), seen)


def test_vni_used_by_another_hosts_vxlan_raises_naming_it() -> None:
    odd = VxlanSeen("havx7", THEIRS.alias(OTHER), 42, 4789, LOCAL, False, 1450, True, None)
    with pytest.raises(ForeignDeviceError, match=r"havx7 \(of hostagent host 'lab-2\.example'\)"):
        plan(host(MINE, underlay=UNDERLAY), on_host(vxlans=(odd,)))


LEGACY = "hostagent cluster=alpha vni=42"  # the alias of agents before host ids


def test_device_with_the_alias_before_host_ids_is_foreign() -> None:
    seen = bridges(foreign("habr42", LEGACY))
    assert plan(host(), seen) == []  # never deleted
    adopt = r"ip link set habr42 alias 'hostagent host=h1 cluster=alpha vni=42'"
    with pytest.raises(ForeignDeviceError, match=rf"not created by hostagent.*{adopt}"):
        plan(host(wanted()), seen)


# --- plan: the taps of running VMs -------------------------------------------------------

TAP1, TAP2, TAP3 = sorted(tap_name("alpha", node) for node in ("m1", "w1", "w2"))


def test_taps_out_of_the_bridge_are_put_back() -> None:
    want = wanted(taps=(TAP1, TAP2, TAP3))
    seen = HostSeen(
        bridges=(seen_of(want),),
        isolation_rules=RULE42,
        taps=(TapSeen(TAP3, None), TapSeen(TAP1, "habr42"), TapSeen(TAP2, "virbr0")),
    )
    assert plan(host(want), seen) == [SetMaster(TAP2, "habr42"), SetMaster(TAP3, "habr42")]


def test_missing_taps_are_skipped_and_other_taps_left_alone() -> None:
    # TAP2's VM is not running; vnet0 (libvirt's default name) and TAP3 are not ours to plug.
    want = wanted(taps=(TAP1, TAP2))
    seen = HostSeen(
        bridges=(seen_of(want),),
        isolation_rules=RULE42,
        taps=(TapSeen(TAP1, None), TapSeen(TAP3, None), TapSeen("vnet0", None)),
    )
    assert plan(host(want), seen) == [SetMaster(TAP1, "habr42")]


def test_lost_bridge_is_recreated_with_its_taps_and_vxlan() -> None:
    want = wanted(peers=(PEER3,), taps=(TAP1, TAP2))
    seen = on_host(vxlans=(vxlan_of(want, master=None),))
    seen = dataclasses.replace(seen, taps=(TapSeen(TAP1, None), TapSeen(TAP2, None)))
    assert plan(host(want, underlay=UNDERLAY), seen) == [
        CreateBridge("habr42", want.alias(HOST), 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        DisableForwarding("habr42"),
        AddIsolationRule("habr42"),
        SetUp("habr42"),
        SetMaster(TAP1, "habr42"),
        SetMaster(TAP2, "habr42"),
        SetMaster("havx42", "habr42"),
    ]


def test_replaced_bridge_gets_its_taps_back() -> None:
    # The bridge of ours is deleted and made anew (vni 42 now belongs to alpha): its ports go.
    want = wanted(taps=(TAP1,))
    seen = HostSeen(bridges=(seen_of(wanted("old", 42)),), taps=(TapSeen(TAP1, "habr42"),))
    actions = plan(host(want), seen)
    assert actions[0] == DeleteBridge("habr42")
    assert actions[-1] == SetMaster(TAP1, "habr42")


def test_taps_must_have_tap_names() -> None:
    with pytest.raises(ValueError, match=r"tap 'vnet0' is not a hostagent tap name"):
        wanted(taps=("vnet0",))


@pytest.mark.parametrize("underlay", [None, UNDERLAY])
def test_plan_after_apply_with_taps_is_empty(underlay: Underlay | None) -> None:
    want = host(wanted(peers=(PEER3,) if underlay else (), taps=(TAP1, TAP2)), underlay=underlay)
    seen = on_host(
        seen_of(wanted("old", 42)),
        vxlans=(vxlan_of(MINE, master=None),),
    )
    seen = dataclasses.replace(seen, taps=(TapSeen(TAP1, "habr42"), TapSeen(TAP2, None)))
    after = simulate(seen, plan(want, seen))
    assert {tap.name: tap.master for tap in after.taps} == {TAP1: "habr42", TAP2: "habr42"}
    assert plan(want, after) == []


# --- plan: isolation rules (`ip rule add iif habr<vni> pref 900 prohibit`) ---------------


@pytest.mark.parametrize("vni", [1, 42, MAX_VNI])
def test_bridge_names_are_recognised(vni: int) -> None:
    assert is_bridge_name(bridge_name(vni))


@pytest.mark.parametrize(
    "name", ["habr0", "habr042", f"habr{MAX_VNI + 1}", "habr", "habr4x", "havx42", "virbr0"]
)
def test_other_names_are_not_bridge_names(name: str) -> None:
    assert not is_bridge_name(name)


def test_rule_is_added_to_a_bridge_of_ours_without_one() -> None:
    want = wanted()
    seen = dataclasses.replace(bridges(seen_of(want)), isolation_rules=frozenset())
    assert plan(host(want), seen) == [AddIsolationRule("habr42")]
    assert plan(host(want), simulate(seen, [AddIsolationRule("habr42")])) == []


def test_rule_comes_before_a_new_bridge_is_up() -> None:
    actions = plan(host(wanted()), HostSeen())
    assert actions.index(AddIsolationRule("habr42")) < actions.index(SetUp("habr42"))


def test_rule_is_kept_while_the_cluster_is_wanted() -> None:
    want = wanted()
    assert plan(host(want), bridges(seen_of(want))) == []
    # The bridge deleted behind the agent's back: the kernel keeps the rule (detached).
    lost = HostSeen(isolation_rules=RULE42)
    assert AddIsolationRule("habr42") not in plan(host(want), lost)
    assert DeleteIsolationRule("habr42") not in plan(host(want), lost)


def test_rule_goes_after_its_bridge() -> None:
    actions = plan(host(), bridges(seen_of(wanted())))
    assert actions == [DeleteBridge("habr42"), DeleteIsolationRule("habr42")]


def test_rule_left_behind_by_a_bridge_of_ours_is_removed() -> None:
    # The agent stopped between deleting the bridge and its rule; no device holds the name.
    seen = HostSeen(isolation_rules=frozenset({"habr43"}))
    assert plan(host(wanted()), seen)[0] == DeleteIsolationRule("habr43")
    assert plan(host(), seen) == [DeleteIsolationRule("habr43")]


@pytest.mark.parametrize(
    "seen",
    [
        # iif names hostagent never gives a bridge
        HostSeen(isolation_rules=frozenset({"virbr0", "eth0", "habr042", "havx42", "habr0"})),
        # bridges named like ours with someone else's alias, or another host's agent's
        bridges(foreign("habr43"), foreign("habr44", "hostagent, hand made"), foreign("habr45")),
        bridges(seen_of(THEIRS, OTHER)),
        bridges(foreign("habr46", LEGACY)),
        # a device that is not a bridge holds the name
        dataclasses.replace(bridges(others=("habr47",)), isolation_rules=frozenset({"habr47"})),
        on_host(vxlans=(foreign_vxlan("habr48", 48),)),
    ],
)
def test_rules_not_ours_are_never_deleted(seen: HostSeen) -> None:
    rules = seen.isolation_rules | {b.name for b in seen.bridges} | {v.name for v in seen.vxlans}
    seen = dataclasses.replace(seen, isolation_rules=rules)
    for want in (host(), host(wanted()), host(wanted(), underlay=UNDERLAY)):
        if want.underlay is not None:
            seen = dataclasses.replace(seen, addresses=(ETH0,))
        assert not [a for a in plan(want, seen) if isinstance(a, DeleteIsolationRule)]


def test_rules_of_two_agents_in_one_namespace_are_each_their_own() -> None:
    seen = side_by_side()
    assert seen.isolation_rules == {"habr42", "habr43"}
    assert plan(host(MINE, underlay=UNDERLAY), seen) == []
    removed = plan(host(underlay=UNDERLAY), seen)
    assert [a for a in removed if isinstance(a, DeleteIsolationRule)] == [
        DeleteIsolationRule("habr42")
    ]


@pytest.mark.parametrize(
    "rules",
    [frozenset(), RULE42, frozenset({"habr42", "habr43", "habr7", "virbr0"})],
)
def test_plan_after_apply_with_rules_is_empty(rules: frozenset[str]) -> None:
    seen = dataclasses.replace(wired(*CLUSTERS), isolation_rules=rules)
    want = host(CLUSTERS[0], underlay=UNDERLAY)
    after = simulate(seen, plan(want, seen))
    assert after.isolation_rules == {"habr42", "virbr0"} & (rules | {"habr42"})
    assert plan(want, after) == []


# What observe counts as an isolation rule: pyroute2's decoded RTM_NEWRULE, read with
# [] and .get() (plain dicts here).


def rule(**changes: object) -> dict[str, object]:
    ours = {
        "family": 2,
        "action": 8,  # FR_ACT_PROHIBIT
        "priority": ISOLATION_PRIORITY,
        "iifname": "habr42",
        "src_len": 0,
        "dst_len": 0,
        "tos": 0,
        "flags": 0,
        "table": 0,
    }
    return {**ours, **changes}


def test_observe_reads_isolation_rules() -> None:
    assert isolation_rules([rule(), rule(iifname="habr7")]) == {"habr42", "habr7"}


@pytest.mark.parametrize(
    "other",
    [
        {"priority": ISOLATION_PRIORITY + 1},
        {"priority": None},  # the local table's rule at 0 has no FRA_PRIORITY
        {"action": 6},  # blackhole
        {"action": 1, "table": 254},  # lookup main
        {"family": 10},  # IPv6
        {"iifname": None},
        {"src_len": 8, "src": "10.0.0.0"},
        {"dst_len": 24, "dst": "10.42.0.0"},
        {"tos": 16},
        {"flags": 0x2},  # not iif habr42
        {"fwmark": 1},
        {"oifname": "eth0"},
        {"ip_proto": 6},
    ],
)
def test_observe_ignores_rules_that_are_not_isolation_rules(other: dict[str, object]) -> None:
    assert isolation_rules([rule(**other)]) == frozenset()
