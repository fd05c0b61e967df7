"""Kernel messages (as pyroute2 decodes them) -> HostSeen: parsing only, no requests.

netlink.py makes the four dumps (links, IPv4 addresses, AF_BRIDGE FDB, IPv4 rules) and
hands the messages here; each message is read through .get() and [] only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from network.model import (
    ISOLATION_PRIORITY,
    AddressSeen,
    BridgeSeen,
    FdbEntry,
    HostSeen,
    TapSeen,
    VxlanSeen,
)
from network.names import Owner, parse_owner_alias

IFF_UP = 0x1
NTF_SELF = 0x02  # an entry of the device itself, not of the bridge it is a port of
AF_INET = 2
FR_ACT_PROHIBIT = 8  # linux/fib_rules.h: 6 is blackhole, 7 unreachable, 8 prohibit (EACCES)
FIB_RULE_INVERT = 0x2  # `ip rule add not ...`
# Selectors besides iif: a rule with any of them matches less than ours does.
_RULE_SELECTORS = (
    "src",
    "dst",
    "oifname",
    "fwmark",
    "fwmask",
    "uid_range",
    "ip_proto",
    "sport_range",
    "dport_range",
    "l3mdev",
    "tun_id",
)


@dataclass(frozen=True)
class LinkRef:
    """What applying needs to know about a device: its index, kind and owner."""

    name: str
    index: int
    kind: str | None
    alias: str | None

    @property
    def owner(self) -> Owner | None:
        return parse_owner_alias(self.alias) if self.alias else None


def link_refs(links: Iterable[Any]) -> dict[str, LinkRef]:
    return {ref.name: ref for ref in map(_ref, links)}


def _ref(link: Any) -> LinkRef:
    alias = link.get("ifalias")
    return LinkRef(
        name=str(link.get("ifname")),
        index=int(link["index"]),
        kind=link.get(("linkinfo", "kind")),
        alias=str(alias) if alias else None,
    )


def host_seen(
    links: Iterable[Any], addresses: Iterable[Any], fdb: Iterable[Any], rules: Iterable[Any] = ()
) -> HostSeen:
    links = list(links)
    names = {int(link["index"]): str(link.get("ifname")) for link in links}
    ipv4 = _ipv4_by_index(addresses)
    entries = _fdb_by_index(fdb)
    by_kind: dict[str | None, list[Any]] = {}
    for link in links:
        by_kind.setdefault(link.get(("linkinfo", "kind")), []).append(link)
    others = [link for kind, group in by_kind.items() if kind not in _OURS for link in group]
    bridges = by_kind.get("bridge", [])
    return HostSeen(
        bridges=tuple(_bridge(link, ipv4.get(link["index"], ())) for link in bridges),
        vxlans=tuple(_vxlan(link, names, entries) for link in by_kind.get("vxlan", [])),
        other_links=frozenset(str(link.get("ifname")) for link in others),
        addresses=tuple(_addresses(links, ipv4)),
        taps=tuple(_tap(link, names) for link in by_kind.get("tun", [])),
        isolation_rules=isolation_rules(rules),
    )


def isolation_rules(rules: Iterable[Any]) -> frozenset[str]:
    """The iif names of the IPv4 rules `iif <name> pref ISOLATION_PRIORITY prohibit` that
    select on nothing else (a narrower rule would let the rest through)."""
    return frozenset(
        str(rule.get("iifname"))
        for rule in rules
        if rule["family"] == AF_INET
        and rule["action"] == FR_ACT_PROHIBIT
        and rule.get("priority") == ISOLATION_PRIORITY
        and rule.get("iifname")
        and not (rule["src_len"] or rule["dst_len"] or rule["tos"])
        and not rule["flags"] & FIB_RULE_INVERT
        and all(rule.get(key) is None for key in _RULE_SELECTORS)
    )


_OURS = ("bridge", "vxlan")


def _ipv4_by_index(messages: Iterable[Any]) -> dict[int, tuple[str, ...]]:
    by_index: dict[int, list[str]] = {}
    for msg in messages:
        by_index.setdefault(msg["index"], []).append(f"{msg.get('address')}/{msg['prefixlen']}")
    return {index: tuple(sorted(found)) for index, found in by_index.items()}


def _fdb_by_index(messages: Iterable[Any]) -> dict[int, frozenset[FdbEntry]]:
    """Unicast-destination entries of the devices themselves; the bridge's own entries for
    its ports (NTF_MASTER, no destination) are not ours to manage."""
    by_index: dict[int, set[FdbEntry]] = {}
    for msg in messages:
        dst, mac = msg.get("dst"), msg.get("lladdr")
        if dst and mac and msg["flags"] & NTF_SELF:
            by_index.setdefault(msg["ifindex"], set()).add(FdbEntry(str(mac).lower(), str(dst)))
    return {index: frozenset(found) for index, found in by_index.items()}


def _addresses(links: Iterable[Any], ipv4: Mapping[int, tuple[str, ...]]) -> Iterable[AddressSeen]:
    for link in links:
        for address in ipv4.get(link["index"], ()):
            yield AddressSeen(address.split("/")[0], str(link.get("ifname")), int(link.get("mtu")))


def _bridge(link: Any, addresses: tuple[str, ...]) -> BridgeSeen:
    ref = _ref(link)
    inet = link.get(("af_spec", "AF_INET"))
    return BridgeSeen(
        name=ref.name,
        alias=ref.alias,
        addresses=addresses,
        mtu=int(link.get("mtu")),
        up=bool(link["flags"] & IFF_UP),
        forwarding=bool(inet["forwarding"]) if inet is not None else False,
    )


def _tap(link: Any, names: Mapping[int, str]) -> TapSeen:
    master = link.get("master")
    return TapSeen(name=str(link.get("ifname")), master=names.get(master) if master else None)


def _vxlan(
    link: Any, names: Mapping[int, str], entries: Mapping[int, frozenset[FdbEntry]]
) -> VxlanSeen:
    ref = _ref(link)
    data = link.get(("linkinfo", "data"))
    local = data.get("vxlan_local")
    master = link.get("master")
    return VxlanSeen(
        name=ref.name,
        alias=ref.alias,
        vni=int(data.get("vxlan_id")),
        port=int(data.get("vxlan_port")),
        local=str(local) if local else None,
        learning=bool(data.get("vxlan_learning")),
        mtu=int(link.get("mtu")),
        up=bool(link["flags"] & IFF_UP),
        master=names.get(master) if master else None,
        fdb=entries.get(ref.index, frozenset()),
    )
