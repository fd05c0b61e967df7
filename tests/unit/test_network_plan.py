"""network.names and network.plan: pure functions, no kernel."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest

from network.names import (
    IFNAMSIZ,
    MAX_VNI,
    bridge_name,
    mac_address,
    owner_alias,
    parse_owner_alias,
    tap_name,
)
from network.plan import (
    Action,
    BridgeSeen,
    BridgeWanted,
    CreateBridge,
    DeleteBridge,
    ForeignDeviceError,
    NetworkError,
    RemoveAddress,
    SetAddress,
    SetMtu,
    SetUp,
    plan,
)

LONG = "c" + "-x" * 30 + "9"  # 62 characters...
LONGEST = LONG + "z"  # ...and 63, the longest DNS-1123 label


def simulate(seen: list[BridgeSeen], actions: list[Action]) -> list[BridgeSeen]:
    """What the kernel would hold after apply(actions): a model of netlink.apply, not a fake."""
    by_name = {bridge.name: bridge for bridge in seen}
    for action in actions:
        match action:
            case CreateBridge(name=name, alias=alias, mtu=mtu):
                assert name not in by_name, f"{name} created twice"
                by_name[name] = BridgeSeen(name, alias, (), mtu, up=False)
            case DeleteBridge(name=name):
                del by_name[name]
            case SetAddress(name=name, address=address):
                old = by_name[name]
                by_name[name] = dataclasses.replace(old, addresses=(*old.addresses, address))
            case RemoveAddress(name=name, address=address):
                old = by_name[name]
                kept = tuple(a for a in old.addresses if a != address)
                by_name[name] = dataclasses.replace(old, addresses=kept)
            case SetMtu(name=name, mtu=mtu):
                by_name[name] = dataclasses.replace(by_name[name], mtu=mtu)
            case SetUp(name=name):
                by_name[name] = dataclasses.replace(by_name[name], up=True)
    return list(by_name.values())


def wanted(cluster: str = "alpha", vni: int = 42, address: str = "10.42.0.1/24") -> BridgeWanted:
    return BridgeWanted.for_cluster(cluster, vni, address, mtu=1450)


def seen_of(want: BridgeWanted, **changes: object) -> BridgeSeen:
    good = BridgeSeen(want.name, want.alias, (want.address,), want.mtu, up=True)
    return dataclasses.replace(good, **changes)  # type: ignore[arg-type]


def foreign(name: str, alias: str | None = None) -> BridgeSeen:
    return BridgeSeen(name, alias, ("192.168.1.1/24",), 1500, up=True)


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("vni", [1, 42, MAX_VNI])
def test_bridge_name_fits_ifnamsiz(vni: int) -> None:
    assert bridge_name(vni) == f"habr{vni}"
    assert len(bridge_name(vni)) <= IFNAMSIZ


@pytest.mark.parametrize("vni", [0, -1, MAX_VNI + 1])
def test_bridge_name_rejects_vni_out_of_range(vni: int) -> None:
    with pytest.raises(ValueError, match="vni"):
        bridge_name(vni)


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


@pytest.mark.parametrize(("cluster", "vni"), [("alpha", 1), (LONGEST, MAX_VNI), ("0", 7)])
def test_owner_alias_round_trips(cluster: str, vni: int) -> None:
    assert owner_alias(cluster, vni) == f"hostagent cluster={cluster} vni={vni}"
    assert parse_owner_alias(owner_alias(cluster, vni)) == (cluster, vni)


@pytest.mark.parametrize(
    "alias",
    [
        "",
        "libvirt bridge",
        "hostagent cluster=alpha",
        "hostagent cluster=Alpha vni=3",
        "hostagent cluster=alpha vni=0",
        f"hostagent cluster=alpha vni={MAX_VNI + 1}",
        "hostagent cluster=alpha vni=3 extra",
        "hostagent cluster=-alpha vni=3",
        f"hostagent cluster={LONGEST}x vni=3",
    ],
)
def test_parse_owner_alias_rejects_foreign(alias: str) -> None:
    assert parse_owner_alias(alias) is None


def test_owner_alias_rejects_bad_cluster() -> None:
    with pytest.raises(ValueError, match="DNS-1123"):
        owner_alias("has space", 1)


# --- plan --------------------------------------------------------------------------------


def test_wanted_rejects_address_without_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        BridgeWanted.for_cluster("alpha", 42, "10.42.0.1")


def test_creates_missing_bridge() -> None:
    want = wanted()
    assert plan([want], []) == [
        CreateBridge("habr42", "hostagent cluster=alpha vni=42", 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        SetUp("habr42"),
    ]


def test_fixes_address_mtu_and_state_of_ours() -> None:
    want = wanted()
    drifted = seen_of(want, addresses=("10.42.0.1/16", "10.9.9.9/24"), mtu=1500, up=False)
    assert plan([want], [drifted]) == [
        RemoveAddress("habr42", "10.42.0.1/16"),
        RemoveAddress("habr42", "10.9.9.9/24"),
        SetAddress("habr42", "10.42.0.1/24"),
        SetMtu("habr42", 1450),
        SetUp("habr42"),
    ]


def test_in_sync_plans_nothing() -> None:
    want = wanted()
    assert plan([want], [seen_of(want)]) == []


def test_deletes_only_stale_bridges_of_ours() -> None:
    keep, gone = wanted("alpha", 42), wanted("beta", 43, "10.43.0.1/24")
    seen = [
        seen_of(keep),
        seen_of(gone),
        foreign("virbr0"),
        foreign("docker0", alias="docker bridge"),
        foreign("habr99", alias="hostagent, hand made"),
    ]
    assert plan([keep], seen) == [DeleteBridge("habr43")]


def test_recreates_bridge_of_ours_left_by_another_cluster() -> None:
    # The zone gave vni 42 to a new cluster: the old cluster's bridge (and its ports) must go.
    old = seen_of(wanted("old", 42))
    new = wanted("new", 42)
    assert plan([new], [old]) == [
        DeleteBridge("habr42"),
        CreateBridge("habr42", "hostagent cluster=new vni=42", 1450),
        SetAddress("habr42", "10.42.0.1/24"),
        SetUp("habr42"),
    ]


@pytest.mark.parametrize("alias", [None, "", "my bridge", "hostagent cluster=Bad vni=1"])
def test_foreign_bridge_with_wanted_name_raises(alias: str | None) -> None:
    want = wanted()
    with pytest.raises(ForeignDeviceError, match=r"habr42.*not created by hostagent.*ip link del"):
        plan([want], [foreign("habr42", alias)])


def test_foreign_non_bridge_with_wanted_name_raises() -> None:
    with pytest.raises(ForeignDeviceError, match="device habr42"):
        plan([wanted()], [], link_names={"lo", "habr42"})


def test_conflict_plans_nothing_even_for_other_bridges() -> None:
    stale = seen_of(wanted("beta", 43, "10.43.0.1/24"))
    with pytest.raises(ForeignDeviceError):
        plan([wanted()], [stale], link_names={"habr42", "habr43"})


def test_two_clusters_wanting_one_bridge_raise() -> None:
    with pytest.raises(NetworkError, match="both want bridge habr42"):
        plan([wanted("alpha", 42), wanted("beta", 42)], [])


@pytest.mark.parametrize(
    "seen",
    [
        [],
        [seen_of(wanted(), addresses=(), mtu=9000, up=False)],
        [seen_of(wanted("old", 42)), seen_of(wanted("beta", 43, "10.43.0.1/24"))],
        [foreign("virbr0"), seen_of(wanted(), addresses=("10.42.0.1/24", "10.42.0.2/24"))],
    ],
)
def test_plan_after_apply_is_empty(seen: list[BridgeSeen]) -> None:
    want = [wanted(), wanted("gamma", MAX_VNI, "10.200.0.1/16"), wanted(LONGEST, 7, "10.7.0.1/24")]
    after = simulate(seen, plan(want, seen))
    assert plan(want, after) == []
    assert [b for b in after if b.owner is None] == [b for b in seen if b.owner is None]


def test_plan_for_nothing_wanted_removes_all_of_ours() -> None:
    seen = [seen_of(wanted()), foreign("virbr0")]
    assert simulate(seen, plan([], seen)) == [foreign("virbr0")]
