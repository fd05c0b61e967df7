"""Kernel-facing names for a cluster's devices: pure, stable functions of cluster, node and vni.

Linux limits interface names to IFNAMSIZ - 1 = 15 bytes, so names derived from user strings
are hashed, and the bridge and VXLAN device are named after the VNI, which the zone keeps
unique per cluster.
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15
MAX_VNI = 16_777_215  # 24-bit VXLAN network identifier

_BRIDGE_PREFIX = "habr"
_VXLAN_PREFIX = "havx"
_TAP_PREFIX = "hat"
_TAP_HASH_CHARS = IFNAMSIZ - len(_TAP_PREFIX) - 1  # 11: one byte of headroom under the limit
# 52:54:00 is the prefix QEMU uses; 0x52 has the locally-administered bit set and the
# multicast bit clear, so every address below is a valid unicast NIC address.
_MAC_PREFIX = "52:54:00"
_ALIAS = re.compile(r"hostagent cluster=([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?) vni=([0-9]{1,8})")


def _check_vni(vni: int) -> int:
    if not 1 <= vni <= MAX_VNI:
        raise ValueError(f"vni {vni} is outside 1..{MAX_VNI}")
    return vni


def _digest(cluster: str, node: str) -> bytes:
    return hashlib.sha256(f"{cluster}/{node}".encode()).digest()


def bridge_name(vni: int) -> str:
    """The cluster's bridge on this host, e.g. habr42 (at most 12 characters)."""
    return f"{_BRIDGE_PREFIX}{_check_vni(vni)}"


def vxlan_name(vni: int) -> str:
    """The cluster's VXLAN device on this host, e.g. havx42 (at most 12 characters)."""
    return f"{_VXLAN_PREFIX}{_check_vni(vni)}"


def tap_name(cluster: str, node: str) -> str:
    """The node VM's tap device: 'hat' + 11 hex digits of sha256("cluster/node")."""
    return _TAP_PREFIX + _digest(cluster, node).hex()[:_TAP_HASH_CHARS]


def mac_address(cluster: str, node: str) -> str:
    """The node VM's NIC address: 52:54:00 plus 3 bytes of sha256("cluster/node").

    24 random bits: two nodes of one cluster (one L2 segment) collide with probability
    about n*n / 2**25, i.e. 0.03% for 100 nodes. Callers that need certainty check peers.
    """
    tail = _digest(cluster, node)[:3]
    return ":".join([_MAC_PREFIX, *(f"{byte:02x}" for byte in tail)])


def owner_alias(cluster: str, vni: int) -> str:
    """The IFLA_IFALIAS that marks a device as created by hostagent for this cluster."""
    alias = f"hostagent cluster={cluster} vni={_check_vni(vni)}"
    if parse_owner_alias(alias) is None:
        raise ValueError(f"cluster {cluster[:80]!r} is not a DNS-1123 label")
    return alias


def parse_owner_alias(alias: str) -> tuple[str, int] | None:
    """(cluster, vni) when alias was written by owner_alias, else None (a device not ours)."""
    match = _ALIAS.fullmatch(alias)
    if match is None:
        return None
    vni = int(match.group(3))
    if not 1 <= vni <= MAX_VNI:
        return None
    return match.group(1), vni
