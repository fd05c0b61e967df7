"""Allocations that must be unique in a zone: VNIs, node subnets, pod and service ranges,
and the addresses inside a cluster's node subnet. Pure: callers pass what is taken."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from ipaddress import IPv4Address, IPv4Network

from hostagent.errors import OutOfCapacity
from hostagent.model import Role

FIRST_NODE_OFFSET = 10  # node addresses count up from .10 of the node subnet
VIP_OFFSET = 5  # the cluster's VIP: below the nodes, far from the gateways (from .254 down)
NODE_SUBNET_PREFIX = 24
MAX_INDEX = 10_000  # node names run m1.., w1.. up to this


def next_vni(taken: Collection[int], low: int, high: int) -> int:
    """The lowest VNI in low..high that is not taken."""
    candidate = low
    for vni in sorted(v for v in taken if low <= v <= high):
        if vni > candidate:
            break
        candidate = vni + 1
    if candidate > high:
        raise OutOfCapacity(f"every VNI in {low}..{high} is taken; widen [network] vni_min/max")
    return candidate


def next_subnet(pool: IPv4Network, prefix: int, taken: Iterable[IPv4Network], what: str) -> str:
    """The first /prefix of pool that overlaps nothing taken."""
    used = sorted(net for net in taken if net.overlaps(pool))
    for subnet in pool.subnets(new_prefix=prefix):
        if not any(subnet.overlaps(net) for net in used):
            return str(subnet)
    raise OutOfCapacity(f"no free /{prefix} left in {what} {pool}; widen it in [network]")


def node_names(role: Role, count: int) -> list[str]:
    prefix = "m" if role is Role.MASTER else "w"
    return [f"{prefix}{i}" for i in range(1, count + 1)]


def node_index(name: str) -> int:
    return int(name[1:])


def node_address(subnet: str, taken: Collection[str]) -> str:
    """The lowest address from .10 up that no node of the cluster holds."""
    network = IPv4Network(subnet)
    first = int(network.network_address) + FIRST_NODE_OFFSET
    for value in range(first, int(network.broadcast_address)):
        address = str(IPv4Address(value))
        if address not in taken:
            return address
    raise OutOfCapacity(f"node subnet {subnet} has no free address left")


def vip_address(subnet: str) -> str:
    """The cluster's virtual IP: the fixed .5 of its node subnet, which no node (from .10
    up) and no gateway (from .254 down to .11) is ever given."""
    return str(IPv4Network(subnet).network_address + VIP_OFFSET)


def gateway_address(subnet: str, taken: Collection[str], nodes: Collection[str]) -> str:
    """A host's own address on the cluster network: counting down from .254, clear of nodes."""
    network = IPv4Network(subnet)
    last = int(network.broadcast_address) - 1
    for value in range(last, int(network.network_address) + FIRST_NODE_OFFSET, -1):
        address = str(IPv4Address(value))
        if address not in taken and address not in nodes:
            return address
    raise OutOfCapacity(f"node subnet {subnet} has no free gateway address left")


def with_prefix(address: str, subnet: str) -> str:
    return f"{address}/{ipaddress.IPv4Network(subnet).prefixlen}"
