"""The agent's vocabulary: NodeSpec, Node, phases. Validation of user input lives here, once."""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from common.names import check_dns_name, check_name

KUBERNETES_VERSION = re.compile(r"^1\.\d{1,3}\.\d{1,3}$")
DEFAULT_ETCD_DISK_GIB = 5
API_ENDPOINT = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?:\d{1,5}$")


def check_kubernetes_version(value: str) -> str:
    if not KUBERNETES_VERSION.fullmatch(value):
        raise ValueError(f"kubernetes_version {value[:40]!r} must look like 1.31.2")
    return value


def check_ssh_keys(value: list[str]) -> list[str]:
    if any("\n" in key or "\r" in key for key in value):
        raise ValueError("an SSH key must be a single line")
    return value


class Phase(enum.StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    READY = "Ready"
    DELETING = "Deleting"
    FAILED = "Failed"


class Role(enum.StrEnum):
    MASTER = "master"
    WORKER = "worker"


class EtcdMode(enum.StrEnum):
    """How a master runs etcd (docs/cloudconfig.md): a static pod beside the other control
    plane pods, or a systemd unit of the image's etcd binary (images without a container
    runtime); the flags are the same."""

    STATIC_POD = "static-pod"
    SYSTEMD = "systemd"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSpec(_Strict):
    vni: Annotated[int, Field(strict=True, ge=1, le=16_777_215)]
    address: str = Field(description="The node's address with prefix length, e.g. 10.42.0.11/24")
    gateway: str = Field(description="The cluster network's gateway on this host")
    mtu: Annotated[int, Field(strict=True, ge=576, le=9000)] = 1450

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        iface = ipaddress.ip_interface(value)
        if iface.version != 4 or "/" not in value:
            raise ValueError(
                "address must be an IPv4 address with prefix length, e.g. 10.42.0.11/24"
            )
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise ValueError(f"address {value} is the network or broadcast address of its subnet")
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, value: str) -> str:
        if ipaddress.ip_address(value).version != 4:
            raise ValueError("gateway must be an IPv4 address")
        return value

    @model_validator(mode="after")
    def _gateway_in_subnet(self) -> NetworkSpec:
        iface = self.interface
        gateway = ipaddress.ip_address(self.gateway)
        if gateway not in iface.network:
            raise ValueError(f"gateway {self.gateway} is not inside {iface.network}")
        if gateway == iface.ip:
            raise ValueError("gateway and address must differ")
        if gateway in (iface.network.network_address, iface.network.broadcast_address):
            raise ValueError(f"gateway {self.gateway} is the network or broadcast address")
        return self

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.address)

    @property
    def gateway_interface(self) -> ipaddress.IPv4Interface:
        """The gateway with the subnet's prefix: the address the host puts on the cluster bridge."""
        return ipaddress.IPv4Interface(f"{self.gateway}/{self.interface.network.prefixlen}")


class MasterRef(_Strict):
    """One master of the cluster: etcd's initial cluster and the workers' API servers."""

    name: str
    address: str = Field(description="IPv4 address without prefix length")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("master name", value)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if ipaddress.ip_address(value).version != 4:
            raise ValueError("a master's address must be an IPv4 address")
        return value


class ClusterSpec(_Strict):
    """What a node must know about its guest cluster. With no masters listed, the agent
    uses the masters of this cluster on this host (enough for a single-host cluster)."""

    masters: list[MasterRef] = Field(default_factory=list, max_length=15)
    api_endpoint: str | None = Field(
        default=None, description="host:port of the cluster's API; default: first master:6443"
    )
    pod_cidr: str = "192.168.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    cluster_domain: str = "cluster.local"
    etcd_mode: EtcdMode = Field(
        default=EtcdMode.STATIC_POD,
        description="masters: etcd as a static pod, or as a systemd unit of the image's "
        "etcd (same certificates and flags)",
    )
    vip: str | None = Field(
        default=None,
        description="the cluster's virtual IP in the node subnet (IPv4, no prefix length): "
        "the masters hold it with VRRP (keepalived); in the API server's and etcd's "
        "certificates; default api_endpoint VIP:6443",
    )

    @field_validator("vip")
    @classmethod
    def _vip(cls, value: str | None) -> str | None:
        if value is not None and ipaddress.ip_address(value).version != 4:
            raise ValueError("vip must be an IPv4 address")
        return value

    @field_validator("pod_cidr", "service_cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        network = ipaddress.ip_network(value)
        if network.version != 4 or network.prefixlen > 28:
            raise ValueError(f"{value} must be an IPv4 network of /28 or larger")
        return str(network)

    @field_validator("cluster_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return check_dns_name("cluster_domain", value)

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not API_ENDPOINT.fullmatch(value):
            raise ValueError(f"api_endpoint {value[:80]!r} must be HOST:PORT")
        return value


class NodeSpec(_Strict):
    role: Role
    vcpus: Annotated[int, Field(strict=True, ge=1, le=256)]
    memory_mib: Annotated[int, Field(strict=True, ge=64, le=4 * 1024 * 1024)]
    disk_gib: Annotated[int, Field(strict=True, ge=1, le=65_536)]
    image: str
    kubernetes_version: str
    network: NetworkSpec
    ssh_authorized_keys: list[Annotated[str, Field(max_length=16_384)]] = Field(
        default_factory=list, max_length=64
    )
    etcd_disk_gib: Annotated[int, Field(strict=True, ge=1, le=4096)] | None = Field(
        default=None,
        description="masters: size of etcd's own data disk, kept when the root disk is "
        "re-created (default 5)",
    )
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    generation: Annotated[int, Field(strict=True, ge=0)] = Field(
        default=0,
        description="bumped by the zone to have the agent re-create the VM in place with "
        "the same spec (remediation; the etcd disk is kept); 0 is not hashed",
    )

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return check_name("image", value)

    @field_validator("kubernetes_version")
    @classmethod
    def _version(cls, value: str) -> str:
        return check_kubernetes_version(value)

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        return check_ssh_keys(value)

    @model_validator(mode="after")
    def _etcd_disk(self) -> NodeSpec:
        if self.role is Role.WORKER and self.etcd_disk_gib is not None:
            raise ValueError("etcd_disk_gib is for masters only")
        return self

    @model_validator(mode="after")
    def _vip_in_subnet(self) -> NodeSpec:
        vip = self.cluster.vip
        if vip is None:
            return self
        iface = self.network.interface
        address = ipaddress.ip_address(vip)
        if address not in iface.network:
            raise ValueError(f"cluster.vip {vip} is not inside the node subnet {iface.network}")
        taken = {iface.ip, ipaddress.ip_address(self.network.gateway)}
        taken |= {ipaddress.ip_address(m.address) for m in self.cluster.masters}
        if address in taken or address in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise ValueError(
                f"cluster.vip {vip} must be a free address of the node subnet, not a node's, "
                "the gateway's, the network's or the broadcast address"
            )
        return self

    @property
    def etcd_disk_size(self) -> int | None:
        """GiB of the etcd data disk: masters always have one."""
        if self.role is Role.MASTER:
            return self.etcd_disk_gib or DEFAULT_ETCD_DISK_GIB
        return None

    @property
    def kubernetes_minor(self) -> str:
        return ".".join(self.kubernetes_version.split(".")[:2])

    def spec_hash(self) -> str:
        """A stable hash of the spec: recorded in the domain's metadata to notice changes."""
        # Fields left at their defaults are not hashed, so a new agent version that adds
        # a defaulted field does not see every existing domain as changed.
        data = self.model_dump(mode="json", exclude_defaults=True)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class NodeKey(_Strict):
    cluster: str
    name: str

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        return check_name("cluster", value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("node", value)

    @property
    def domain(self) -> str:
        """The libvirt domain name, fixed by the API contract."""
        return f"{self.cluster}-{self.name}"

    def __str__(self) -> str:
        return f"{self.cluster}/{self.name}"


class EtcdHealth(BaseModel):
    """What a master running etcd as a unit last said of its own member: healthy when the
    member answered /health true; checked_at when the agent got the report (UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    healthy: bool
    checked_at: str


class NodeHealth(BaseModel):
    """Whether the node works once created (docs/operations.md, "Node health"): reason is
    one of the nodehealth.Reason values, since when it was first seen (UTC, ISO 8601);
    etcd: its etcd member's last report (None: the guest reports none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    healthy: bool = True
    reason: str = ""
    message: str = ""
    since: str | None = None
    etcd: EtcdHealth | None = None


class NodeStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: Phase
    message: str = ""
    domain: str
    updated_at: str
    guest: dict[str, Any] | None = Field(
        default=None, description="What the guest reported when it phoned home"
    )
    certificates: dict[str, str] = Field(
        default_factory=dict, description="Each certificate of the node and when it expires"
    )
    health: NodeHealth = Field(
        default_factory=NodeHealth, description="Whether the node works once created"
    )


class NodeEventBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(
        description="created, spec-changed, started, restarted, phoned-home, "
        "certificate-renewed, failed, deleting"
    )
    message: str
    at: str


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: str
    name: str
    spec: NodeSpec
    status: NodeStatus
    events: list[NodeEventBody] | None = Field(
        default=None,
        description="GET of one node: its last 50 events, oldest first (null in lists)",
    )


class NodeList(BaseModel):
    items: list[Node]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    libvirt: bool
