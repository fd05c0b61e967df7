"""The host's nftables table for its cluster bridges: pure, a function of the wanted clusters.

Routing alone (`iif habr<vni> prohibit`, forwarding off) stops what a guest sends *through*
the host, in IPv4. It does not stop local delivery: a guest on cluster A's bridge could
reach the host's gateway address on cluster B's bridge, or any other address of the host,
and IPv6 has no prohibit rule at all. One table per agent, `table inet hostagent_<host id>`,
closes both, for IPv4 and IPv6 (family inet):

- input: what arrives on a cluster bridge may reach that bridge's own gateway address, on
  the phone-home port, as an ICMP echo, or as the reply to a connection the host made;
  everything else from the bridge to the host is dropped (other bridges' gateways, the
  underlay, every IPv6 packet, ND included: the clusters are IPv4);
- forward: nothing is forwarded into or out of a cluster bridge, whatever
  `net.ipv4.ip_forward` or `net.ipv6.conf.all.forwarding` say. A packet both in and out
  of the same bridge passes: that is the bridge's own traffic when br_netfilter hands
  bridged frames to the inet hooks (Docker and Kubernetes hosts load it).

The base chains jump to the per-bridge chains only for `habr*` interfaces, so the host's
other traffic (the underlay's VXLAN packets) costs one comparison. Rules name bridges
this agent serves only: another agent's bridges (sharing the namespace) pass through.

The table is compared as nft lists it (`nft list table inet <name>`): `definition` is
exactly that listing, and `plan_table` replaces the table when the listing differs (drift by
hand included) and deletes it when no cluster is left. Every word of it is checked before
it gets there (host id, IPv4 addresses, names made from VNIs, port numbers): no string
reaches nft unvalidated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from network.model import ClusterNetworkWanted, interface
from network.names import bridge_wildcard, check_host

FAMILY = "inet"
TABLE_PREFIX = "hostagent_"
BRIDGES = bridge_wildcard()  # habr*: what jumps to the per-bridge chains
_INPUT_HOOK = "type filter hook input priority filter; policy accept;"
_FORWARD_HOOK = "type filter hook forward priority filter; policy accept;"
_FORWARD_JUMPS = (
    f'iifname "{BRIDGES}" jump bridge_forward',
    f'oifname "{BRIDGES}" jump bridge_forward',
)


def table_name(host: str) -> str:
    """This host's agent's table, e.g. hostagent_h1 (host ids are valid nft names as
    they are, and distinct ids give distinct tables)."""
    return TABLE_PREFIX + check_host(host)


@dataclass(frozen=True)
class BridgeGuard:
    """One cluster bridge and the gateway address the host holds on it."""

    bridge: str
    gateway: str

    def input_rules(self, tcp_ports: Iterable[int]) -> list[str]:
        own = f'iifname "{self.bridge}" ip daddr {self.gateway}'
        return [
            *(f"{own} tcp dport {port} accept" for port in tcp_ports),
            f"{own} icmp type echo-request accept",
            f"{own} ct state established,related accept",
            f'iifname "{self.bridge}" drop',
        ]

    def forward_rules(self) -> list[str]:
        return [
            f'iifname "{self.bridge}" oifname != "{self.bridge}" drop',
            f'oifname "{self.bridge}" iifname != "{self.bridge}" drop',
        ]


@dataclass(frozen=True)
class TableWanted:
    """host's table: guards for its cluster bridges (ordered by vni), and the TCP ports
    the guests may reach on their own gateway (the phone-home port)."""

    host: str
    bridges: tuple[BridgeGuard, ...]
    tcp_ports: tuple[int, ...]

    @property
    def name(self) -> str:
        return table_name(self.host)

    def definition(self) -> str:
        """The table as `nft list table inet <name>` prints it, and as nft -f reads it."""
        guards = self.bridges
        chains = [
            _chain("input", [_INPUT_HOOK, f'iifname "{BRIDGES}" jump bridge_input']),
            _chain("forward", [_FORWARD_HOOK, *_FORWARD_JUMPS]),
            _chain("bridge_input", [r for g in guards for r in g.input_rules(self.tcp_ports)]),
            _chain("bridge_forward", [r for g in guards for r in g.forward_rules()]),
        ]
        head = f'table {FAMILY} {self.name} {{\n\tcomment "hostagent host={self.host}"\n'
        return head + "\n".join(chains) + "}\n"


def _chain(name: str, lines: list[str]) -> str:
    body = "".join(f"\t\t{line}\n" for line in lines)
    return f"\tchain {name} {{\n{body}\t}}\n"


def table_wanted(
    clusters: Iterable[ClusterNetworkWanted], *, host: str, tcp_ports: Iterable[int]
) -> TableWanted | None:
    """The table for these clusters; None when there are none (no table at all)."""
    ordered = sorted(clusters, key=lambda cluster: cluster.vni)
    if not ordered:
        check_host(host)
        return None
    guards = tuple(
        BridgeGuard(cluster.bridge, str(interface(cluster.address).ip)) for cluster in ordered
    )
    ports = tuple(sorted(set(tcp_ports)))
    for port in ports:
        if not 1 <= port <= 65_535:
            raise ValueError(f"TCP port {port} is outside 1..65535")
    return TableWanted(host, guards, ports)


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplaceTable:
    """Make the table exactly wanted, in one nft transaction (create, delete, create)."""

    wanted: TableWanted

    def script(self) -> str:
        name = f"{FAMILY} {self.wanted.name}"
        return f"table {name}\ndelete table {name}\n{self.wanted.definition()}"

    def __str__(self) -> str:
        bridges = ", ".join(guard.bridge for guard in self.wanted.bridges)
        return f"replace nftables table {FAMILY} {self.wanted.name} ({bridges})"


@dataclass(frozen=True)
class DeleteTable:
    name: str

    def script(self) -> str:
        return f"delete table {FAMILY} {self.name}\n"

    def __str__(self) -> str:
        return f"delete nftables table {FAMILY} {self.name}"


TableAction = ReplaceTable | DeleteTable


def same_listing(a: str, b: str) -> bool:
    """Whether two listings say the same, whatever their indentation and blank lines."""
    return _lines(a) == _lines(b)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def plan_table(host: str, wanted: TableWanted | None, seen: str | None) -> list[TableAction]:
    """What makes host's table (seen: its listing, None when absent) match wanted."""
    if wanted is None:
        return [] if seen is None else [DeleteTable(table_name(host))]
    if seen is not None and same_listing(seen, wanted.definition()):
        return []
    return [ReplaceTable(wanted)]
