"""The zone's vocabulary: ClusterSpec (what a controller asks for), host reports, and the
shapes the zone answers with. Validation of user input lives here, once."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.names import check_name
from hostagent.config import check_token_url, check_url
from hostagent.model import EtcdMode, check_kubernetes_version, check_ssh_keys


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Lenient(BaseModel):
    """Reports from agents: a newer agent may send fields this zone does not know yet."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# The validation context of what the store reads back: checked when it came in, so a rule
# added since does not make the zone's own state unreadable.
STORED: dict[str, bool] = {"stored": True}

MAX_MASTERS = 7
MAX_WORKERS = 500


class PoolSpec(_Strict):
    count: Annotated[int, Field(strict=True, ge=0, le=MAX_WORKERS)]
    vcpus: Annotated[int, Field(strict=True, ge=1, le=256)] = 2
    memory_mib: Annotated[int, Field(strict=True, ge=64, le=4 * 1024 * 1024)] = 2048
    disk_gib: Annotated[int, Field(strict=True, ge=1, le=65_536)] = 20


DEFAULT_WORKER_DRAIN_S = 300.0
DEFAULT_MASTER_DRAIN_S = 120.0


class DrainHook(_Strict):
    """Called (POST) before the zone removes or replaces one of the cluster's nodes."""

    url: Annotated[str, Field(max_length=2048)]
    # unset: 300 s for a worker, 120 s for a master
    timeout_s: Annotated[float, Field(gt=0, le=3600)] | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value, "drain_hook.url")

    def timeout_for(self, master: bool) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        return DEFAULT_MASTER_DRAIN_S if master else DEFAULT_WORKER_DRAIN_S


class RolloutSpec(_Strict):
    """How a change of version, image or sizes rolls (docs/zone.md, "Rollouts")."""

    max_surge: Annotated[int, Field(strict=True, ge=0, le=MAX_WORKERS)] = 1
    max_unavailable: Annotated[int, Field(strict=True, ge=0, le=MAX_WORKERS)] = 0
    ready_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0

    @model_validator(mode="after")
    def _moves(self) -> RolloutSpec:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: no worker could move")
        return self


class ClusterSpec(_Strict):
    kubernetes_version: str
    image: str = "lab"
    masters: PoolSpec
    workers: PoolSpec = PoolSpec(count=0)
    ssh_authorized_keys: list[Annotated[str, Field(max_length=16_384)]] = Field(
        default_factory=list, max_length=64
    )
    etcd_mode: EtcdMode = Field(
        default=EtcdMode.STATIC_POD,
        description="how masters run etcd: static-pod, or systemd (the image's etcd as a "
        "unit, for images without a container runtime)",
    )
    rollout: RolloutSpec = RolloutSpec()
    drain_hook: DrainHook | None = None

    @field_validator("kubernetes_version")
    @classmethod
    def _version(cls, value: str) -> str:
        return check_kubernetes_version(value)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return check_name("image", value)

    @field_validator("masters")
    @classmethod
    def _masters(cls, value: PoolSpec) -> PoolSpec:
        if value.count % 2 == 0 or value.count > MAX_MASTERS:
            raise ValueError(
                f"masters.count {value.count} must be odd and at most {MAX_MASTERS} "
                "(etcd needs a majority: 1, 3, 5 or 7)"
            )
        return value

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        return check_ssh_keys(value)

    def fixed_part(self) -> dict[str, Any]:
        """What may not change once the cluster exists: all but the worker count, what a
        rollout changes (version, image, node sizes), and how it rolls and drains."""
        data = self.model_dump(mode="json", exclude={"rollout", "drain_hook"})
        data.pop("kubernetes_version")
        data.pop("image")
        data["workers"] = {}
        data["masters"] = {"count": self.masters.count}
        return data


class ResourcesBody(_Lenient):
    vcpus: Annotated[float, Field(strict=True, ge=0)]
    memory_mib: Annotated[int, Field(strict=True, ge=0)]
    disk_gib: Annotated[int, Field(strict=True, ge=0)]


class Overhead(_Lenient):
    base_mib: Annotated[int, Field(strict=True, ge=0)] = 192
    per_gib_mib: Annotated[int, Field(strict=True, ge=0)] = 16


class ReportedEtcd(_Lenient):
    """A master's own etcd member as its guest last reported it to the agent."""

    healthy: Annotated[bool, Field(strict=True)]
    checked_at: str


class ReportedHealth(_Lenient):
    """The agent's verdict on a node once created (docs/operations.md, "Node health");
    etcd: its etcd member's last report (masters running etcd as a unit; older agents and
    other nodes send none)."""

    healthy: Annotated[bool, Field(strict=True)] = True
    reason: str = ""
    message: str = ""
    since: str | None = None
    etcd: ReportedEtcd | None = None


class ReportedNode(_Lenient):
    cluster: str
    name: str
    phase: str
    message: str = ""
    updated_at: str = ""
    spec_hash: str = ""
    health: ReportedHealth = ReportedHealth()  # older agents send none: healthy


class ReportedNetwork(_Lenient):
    cluster: str
    vni: Annotated[int, Field(strict=True, ge=1, le=16_777_215)]


class ReportedImage(_Lenient):
    """An image the host holds (docs/zone.md, "Images"): pulled (digest sha256:<hex>) or
    a folder the operator placed (no digest)."""

    name: str
    digest: str | None = None
    phase: str
    message: str = ""


class HostReport(_Lenient):
    """What an agent sends at registration and with every heartbeat (docs/zone.md)."""

    api_url: str
    # None: the agent takes the zone's client certificate instead (mutual TLS)
    api_token: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    underlay_address: str | None = None
    failure_domain: Annotated[str, Field(min_length=1, max_length=63)] = "default"
    allocatable: ResourcesBody
    allocated: ResourcesBody
    overhead: Overhead = Overhead()
    domain_type: str | None = None
    version: str = ""
    nodes: list[ReportedNode] = Field(default_factory=list, max_length=10_000)
    networks: list[ReportedNetwork] = Field(default_factory=list, max_length=10_000)
    # None: an agent older than image reports (the zone asks it for each image instead)
    images: list[ReportedImage] | None = Field(default=None, max_length=10_000)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        if info.context is STORED:
            return value  # an older zone may have taken it: ZoneService.api_of checks again
        return check_token_url(value, "api_url")  # the zone sends api_token to it


class SignRequest(_Strict):
    """An agent asks the zone's CA to sign one of a node's certificates (pki backend "zone")."""

    name: str = Field(description="the certificate's name in pki.certset, e.g. apiserver")
    csr: Annotated[str, Field(max_length=64 * 1024)]
    ttl_s: Annotated[float, Field(strict=True, gt=0)] = 90 * 86400


class CertificateRequest(_Strict):
    """A host asks for its control-plane client certificate (docs/zone.md, "Mutual TLS")."""

    csr: Annotated[str, Field(min_length=1, max_length=64 * 1024)]


class HostState(enum.StrEnum):
    READY = "Ready"
    NOT_READY = "NotReady"


class ClusterPhase(enum.StrEnum):
    PROVISIONING = "Provisioning"
    READY = "Ready"
    UPGRADING = "Upgrading"
    DEGRADED = "Degraded"
    DELETING = "Deleting"


UNKNOWN = "Unknown"  # a node whose host stopped reporting
