"""Kernel-facing names for a cluster's devices: pure, stable functions of cluster, node and vni.

Linux limits interface names to IFNAMSIZ - 1 = 15 bytes, so names derived from user strings
are hashed, and the bridge and VXLAN device are named after the VNI, which the zone keeps
unique per cluster.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from common.names import check_name

IFNAMSIZ = 15
MAX_VNI = 16_777_215  # 24-bit VXLAN network identifier

_BRIDGE_PREFIX = "habr"
_VXLAN_PREFIX = "havx"
_TAP_PREFIX = "hat"
_TAP_HASH_CHARS = IFNAMSIZ - len(_TAP_PREFIX) - 1  # 11: one byte of headroom under the limit
# 52:54:00 is the prefix QEMU uses; 0x52 has the locally-administered bit set and the
# multicast bit clear, so every address below is a valid unicast NIC address.
_MAC_PREFIX = "52:54:00"
_HOST = r"[A-Za-z0-9._-]{1,64}"
_CLUSTER = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"  # common.names.DNS1123_LABEL, unanchored
_ALIAS = re.compile(rf"hostagent host=({_HOST}) cluster=({_CLUSTER}) vni=([0-9]{{1,8}})")
_TAP = re.compile(rf"{_TAP_PREFIX}[0-9a-f]{{{_TAP_HASH_CHARS}}}")
_BRIDGE = re.compile(rf"{_BRIDGE_PREFIX}([1-9][0-9]{{0,7}})")


class Owner(NamedTuple):
    """Who made a device, as its alias says: the agent of host, for cluster's vni."""

    host: str
    cluster: str
    vni: int


def check_host(host: str) -> str:
    """The agent's host id, as it goes into aliases: 1..64 of [A-Za-z0-9._-]."""
    if not re.fullmatch(_HOST, host):
        raise ValueError(f"host id {host[:80]!r} must be 1..64 characters of [A-Za-z0-9._-]")
    return host


def _check_vni(vni: int) -> int:
    if not 1 <= vni <= MAX_VNI:
        raise ValueError(f"vni {vni} is outside 1..{MAX_VNI}")
    return vni


def _digest(cluster: str, node: str) -> bytes:
    return hashlib.sha256(f"{cluster}/{node}".encode()).digest()


def bridge_name(vni: int) -> str:
    """The cluster's bridge on this host, e.g. habr42 (at most 12 characters)."""
    return f"{_BRIDGE_PREFIX}{_check_vni(vni)}"


def bridge_wildcard() -> str:
    """Every name bridge_name gives, as nft (and iptables) spell a prefix match: habr*."""
    return f"{_BRIDGE_PREFIX}*"


def is_bridge_name(name: str) -> bool:
    """Whether name has the form bridge_name gives (for rules, which carry no alias)."""
    match = _BRIDGE.fullmatch(name)
    return match is not None and int(match.group(1)) <= MAX_VNI


def vxlan_name(vni: int) -> str:
    """The cluster's VXLAN device on this host, e.g. havx42 (at most 12 characters)."""
    return f"{_VXLAN_PREFIX}{_check_vni(vni)}"


def tap_name(cluster: str, node: str) -> str:
    """The node VM's tap device: 'hat' + 11 hex digits of sha256("cluster/node")."""
    return _TAP_PREFIX + _digest(cluster, node).hex()[:_TAP_HASH_CHARS]


def is_tap_name(name: str) -> bool:
    """Whether name has the form tap_name gives (taps carry no alias: the name is all)."""
    return _TAP.fullmatch(name) is not None


def mac_address(cluster: str, node: str) -> str:
    """The node VM's NIC address: 52:54:00 plus 3 bytes of sha256("cluster/node").

    24 random bits: two nodes of one cluster (one L2 segment) collide with probability
    about n*n / 2**25, i.e. 0.03% for 100 nodes. Callers that need certainty check peers.
    """
    tail = _digest(cluster, node)[:3]
    return ":".join([_MAC_PREFIX, *(f"{byte:02x}" for byte in tail)])


def owner_alias(host: str, cluster: str, vni: int) -> str:
    """The IFLA_IFALIAS that marks a device as created by host's agent for this cluster."""
    check_host(host)
    check_name("cluster", cluster)
    return f"hostagent host={host} cluster={cluster} vni={_check_vni(vni)}"


def parse_owner_alias(alias: str) -> Owner | None:
    """The Owner when alias was written by owner_alias, else None (a device not ours to
    manage; the alias of agents before host ids, without host=, included)."""
    match = _ALIAS.fullmatch(alias)
    if match is None:
        return None
    vni = int(match.group(3))
    if not 1 <= vni <= MAX_VNI:
        return None
    return Owner(match.group(1), match.group(2), vni)
