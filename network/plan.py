"""Pure diff: the cluster bridges this host should have vs. the bridges it has -> actions.

Ownership is read from the device alias (names.owner_alias), never from the name alone:
a device without our alias is someone else's, and no action is ever planned for it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from network.names import IFNAMSIZ, bridge_name, owner_alias, parse_owner_alias


class NetworkError(Exception):
    """A network change cannot be made; the message names the device and what to do."""


class ForeignDeviceError(NetworkError):
    """A name hostagent needs is held by a device hostagent did not create."""


def _interface(address: str) -> ipaddress.IPv4Interface:
    if "/" not in address:
        raise ValueError(f"address {address!r} needs a prefix length, e.g. 10.42.0.1/24")
    return ipaddress.IPv4Interface(address)


@dataclass(frozen=True)
class BridgeWanted:
    """A cluster's bridge as it should be: the gateway address (with prefix) and MTU."""

    name: str
    cluster: str
    vni: int
    address: str
    mtu: int = 1450

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= IFNAMSIZ:
            raise ValueError(f"bridge name {self.name!r} must have 1..{IFNAMSIZ} characters")
        _interface(self.address)
        owner_alias(self.cluster, self.vni)  # validates cluster and vni

    @classmethod
    def for_cluster(cls, cluster: str, vni: int, address: str, mtu: int = 1450) -> BridgeWanted:
        return cls(bridge_name(vni), cluster, vni, address, mtu)

    @property
    def alias(self) -> str:
        return owner_alias(self.cluster, self.vni)

    @property
    def owner(self) -> tuple[str, int]:
        return self.cluster, self.vni


@dataclass(frozen=True)
class BridgeSeen:
    """A bridge as the kernel reports it; addresses are IPv4 'a.b.c.d/prefix'."""

    name: str
    alias: str | None
    addresses: tuple[str, ...]
    mtu: int
    up: bool

    @property
    def owner(self) -> tuple[str, int] | None:
        return parse_owner_alias(self.alias) if self.alias else None


@dataclass(frozen=True)
class CreateBridge:
    name: str
    alias: str
    mtu: int

    def __str__(self) -> str:
        return f"create bridge {self.name} ({self.alias}, mtu {self.mtu})"


@dataclass(frozen=True)
class SetAddress:
    name: str
    address: str

    def __str__(self) -> str:
        return f"add address {self.address} to {self.name}"


@dataclass(frozen=True)
class RemoveAddress:
    name: str
    address: str

    def __str__(self) -> str:
        return f"remove address {self.address} from {self.name}"


@dataclass(frozen=True)
class SetMtu:
    name: str
    mtu: int

    def __str__(self) -> str:
        return f"set mtu {self.mtu} on {self.name}"


@dataclass(frozen=True)
class SetUp:
    name: str

    def __str__(self) -> str:
        return f"set {self.name} up"


@dataclass(frozen=True)
class DeleteBridge:
    name: str

    def __str__(self) -> str:
        return f"delete bridge {self.name}"


Action = CreateBridge | SetAddress | RemoveAddress | SetMtu | SetUp | DeleteBridge


def plan(
    wanted: Sequence[BridgeWanted],
    seen: Sequence[BridgeSeen],
    *,
    link_names: Collection[str] = (),
) -> list[Action]:
    """Actions that turn seen into wanted: stale bridges of ours go first, then each wanted one.

    link_names: every interface name on the host, so that a wanted name held by a device that
    is not a bridge is caught here, before anything changes. Raises NetworkError (and its
    ForeignDeviceError) without planning anything.
    """
    by_name = _index_wanted(wanted)
    seen_by_name = {bridge.name: bridge for bridge in seen}
    for bridge in wanted:
        _check_free(bridge, seen_by_name.get(bridge.name), link_names)
    actions: list[Action] = [
        DeleteBridge(bridge.name) for bridge in seen if _is_stale(bridge, by_name)
    ]
    for bridge in wanted:
        actions += _converge(bridge, seen_by_name.get(bridge.name))
    return actions


def _index_wanted(wanted: Sequence[BridgeWanted]) -> dict[str, BridgeWanted]:
    by_name: dict[str, BridgeWanted] = {}
    for bridge in wanted:
        other = by_name.setdefault(bridge.name, bridge)
        if other is not bridge:
            raise NetworkError(
                f"clusters {other.cluster} and {bridge.cluster} both want bridge {bridge.name} "
                "(same vni?); fix the vni assignment"
            )
    return by_name


def _check_free(wanted: BridgeWanted, seen: BridgeSeen | None, link_names: Collection[str]) -> None:
    if seen is None and wanted.name not in link_names:
        return
    if seen is not None and seen.owner is not None:
        return
    what = f"bridge {wanted.name} with alias {seen.alias!r}" if seen else f"device {wanted.name}"
    raise ForeignDeviceError(
        f"{what} exists but was not created by hostagent; cluster {wanted.cluster} "
        f"(vni {wanted.vni}) needs that name. Delete or rename the device "
        f"(`ip link del {wanted.name}`) once nothing uses it; hostagent never touches it."
    )


def _is_stale(seen: BridgeSeen, wanted: Mapping[str, BridgeWanted]) -> bool:
    """Ours, and no wanted bridge of the same name has the same owner."""
    if seen.owner is None:
        return False
    match = wanted.get(seen.name)
    return match is None or match.owner != seen.owner


def _converge(wanted: BridgeWanted, seen: BridgeSeen | None) -> list[Action]:
    actions: list[Action] = []
    if seen is None or seen.owner != wanted.owner:
        # A stale bridge of ours under this name was deleted above: start from a fresh one.
        actions.append(CreateBridge(wanted.name, wanted.alias, wanted.mtu))
        seen = BridgeSeen(wanted.name, wanted.alias, (), wanted.mtu, up=False)
    target = _interface(wanted.address)
    actions += [
        RemoveAddress(seen.name, address)
        for address in seen.addresses
        if _interface(address) != target
    ]
    if target not in {_interface(address) for address in seen.addresses}:
        actions.append(SetAddress(seen.name, str(target)))
    if seen.mtu != wanted.mtu:
        actions.append(SetMtu(seen.name, wanted.mtu))
    if not seen.up:
        actions.append(SetUp(seen.name))
    return actions
