"""The steps a plan is made of: one kernel change each, named as an operator would type it."""

from __future__ import annotations

from dataclasses import dataclass

from network.model import ISOLATION_PRIORITY


@dataclass(frozen=True)
class CreateBridge:
    name: str
    alias: str
    mtu: int

    def __str__(self) -> str:
        return f"create bridge {self.name} ({self.alias}, mtu {self.mtu})"


@dataclass(frozen=True)
class DeleteBridge:
    name: str

    def __str__(self) -> str:
        return f"delete bridge {self.name}"


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
    """On a bridge or a VXLAN device of ours."""

    name: str
    mtu: int

    def __str__(self) -> str:
        return f"set mtu {self.mtu} on {self.name}"


@dataclass(frozen=True)
class DisableForwarding:
    """net.ipv4.conf.<bridge>.forwarding = 0: the host never routes out of a cluster network."""

    name: str

    def __str__(self) -> str:
        return f"disable IPv4 forwarding on {self.name}"


@dataclass(frozen=True)
class AddIsolationRule:
    """`ip rule add iif <bridge> pref 900 prohibit`: the host routes nothing that arrives on
    a cluster bridge (its own addresses excepted), whatever net.ipv4.ip_forward says."""

    name: str

    def __str__(self) -> str:
        return f"add rule iif {self.name} pref {ISOLATION_PRIORITY} prohibit"


@dataclass(frozen=True)
class DeleteIsolationRule:
    """The isolation rule of a bridge of ours that no wanted cluster has (or that is gone)."""

    name: str

    def __str__(self) -> str:
        return f"delete rule iif {self.name} pref {ISOLATION_PRIORITY} prohibit"


@dataclass(frozen=True)
class SetUp:
    """On a bridge or a VXLAN device of ours."""

    name: str

    def __str__(self) -> str:
        return f"set {self.name} up"


@dataclass(frozen=True)
class CreateVxlan:
    """Created up, with learning off, in its bridge, with MTU set: one request."""

    name: str
    alias: str
    vni: int
    local: str
    port: int
    mtu: int
    bridge: str

    def __str__(self) -> str:
        return (
            f"create vxlan {self.name} ({self.alias}, local {self.local}, port {self.port}, "
            f"mtu {self.mtu}, learning off) in {self.bridge}"
        )


@dataclass(frozen=True)
class DeleteVxlan:
    name: str

    def __str__(self) -> str:
        return f"delete vxlan {self.name}"


@dataclass(frozen=True)
class SetMaster:
    """Put a VXLAN device of ours, or a node's tap, into its cluster's bridge."""

    name: str
    bridge: str

    def __str__(self) -> str:
        return f"set {self.name} master {self.bridge}"


@dataclass(frozen=True)
class AppendFdb:
    """`bridge fdb append <mac> dev <name> dst <dst>`: permanent, self."""

    name: str
    mac: str
    dst: str

    def __str__(self) -> str:
        return f"fdb append {self.mac} dev {self.name} dst {self.dst}"


@dataclass(frozen=True)
class DeleteFdb:
    name: str
    mac: str
    dst: str

    def __str__(self) -> str:
        return f"fdb del {self.mac} dev {self.name} dst {self.dst}"


Action = (
    CreateBridge
    | DeleteBridge
    | SetAddress
    | RemoveAddress
    | SetMtu
    | DisableForwarding
    | AddIsolationRule
    | DeleteIsolationRule
    | SetUp
    | CreateVxlan
    | DeleteVxlan
    | SetMaster
    | AppendFdb
    | DeleteFdb
)
