"""The zone's configuration (/etc/hostagent/zone.toml): every key is in docs/zone.md, and
the defaults alone give a working zone on loopback."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hostagent.config import ApiConfig, VaultConfig
from hostagent.errors import ConfigError, validation_problems
from hostagent.zone.liveness import DEFAULT_REPORT_INTERVAL_S

DEFAULT_ZONE_CONFIG_PATH = Path("/etc/hostagent/zone.toml")
DEFAULT_ZONE_LISTEN = "127.0.0.1:8471"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostsConfig(_Section):
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    heartbeat_timeout_s: Annotated[float, Field(gt=0)] = 20.0
    # backend "etcd": a host is NotReady once its lease expires (unset: 3 x the interval),
    # and (either backend) its full report is written only when it changes or this often
    lease_ttl_s: Annotated[float, Field(ge=2, le=3600)] | None = None
    report_interval_s: Annotated[float, Field(gt=0)] = DEFAULT_REPORT_INTERVAL_S

    @model_validator(mode="after")
    def _timeout(self) -> HostsConfig:
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be at least twice heartbeat_interval_s")
        return self


class AgentsConfig(_Section):
    ca_file: Path | None = None
    verify_host_names: bool = True  # an agent's server certificate names its host id
    retry_initial_s: Annotated[float, Field(gt=0)] = 1.0
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    resync_interval_s: Annotated[float, Field(gt=0)] = 30.0


class ZoneNetworkConfig(_Section):
    vni_min: Annotated[int, Field(ge=1, le=16_777_215)] = 4096
    vni_max: Annotated[int, Field(ge=1, le=16_777_215)] = 16_777_215
    node_pool: str = "10.128.0.0/9"
    pod_pool: str = "100.64.0.0/10"
    service_pool: str = "10.96.0.0/12"
    mtu: Annotated[int, Field(ge=576, le=9000)] = 1450

    @field_validator("node_pool", "pod_pool", "service_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        network = ipaddress.ip_network(value)
        if network.version != 4:
            raise ValueError(f"{value} must be an IPv4 network")
        return str(network)

    @model_validator(mode="after")
    def _ranges(self) -> ZoneNetworkConfig:
        if self.vni_min > self.vni_max:
            raise ValueError("vni_min must not be above vni_max")
        sizes = {"node_pool": 24, "pod_pool": 20, "service_pool": 24}
        for key, prefix in sizes.items():
            if ipaddress.ip_network(getattr(self, key)).prefixlen > prefix:
                raise ValueError(f"{key} must be a /{prefix} or larger")
        return self


class ZonePkiConfig(_Section):
    backend: Literal["local", "vault"] = "local"
    vault: VaultConfig | None = None

    @model_validator(mode="after")
    def _vault(self) -> ZonePkiConfig:
        if self.backend == "vault" and self.vault is None:
            raise ValueError("backend 'vault' needs a [pki.vault] section")
        return self


class StoreConfig(_Section):
    """Where the zone keeps its state: SQLite in state_dir (one machine), or etcd."""

    backend: Literal["sqlite", "etcd"] = "sqlite"
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/hostagent/zone/"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    dial_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    request_timeout_s: Annotated[float, Field(gt=0)] = 5.0

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one endpoint is needed")
        for endpoint in value:
            url = urlsplit(endpoint)
            if url.scheme not in ("http", "https") or not url.hostname or url.port is None:
                raise ValueError(f"{endpoint!r} is not http(s)://host:port")
            if url.scheme == "http" and not _loopback(url.hostname):
                raise ValueError(f"{endpoint}: plain http only to a loopback address")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with /")
        return value if value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _client_certificate(self) -> StoreConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class ControlCaConfig(_Section):
    """`[control_ca]`: the CA of hostagent's own control plane (not of any cluster). No
    files: the zone makes one under <state_dir>/control-ca on its first start."""

    cert_file: Path | None = None
    key_file: Path | None = None
    host_cert_ttl_days: Annotated[float, Field(gt=0, le=365)] = 30.0
    zone_cert_ttl_days: Annotated[float, Field(gt=0, le=365)] = 30.0

    @model_validator(mode="after")
    def _pair(self) -> ControlCaConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither (the zone makes one)")
        return self


class ReplicaConfig(_Section):
    """This zone as one of several replicas on one etcd (backend "etcd" only)."""

    id: str | None = None  # unset: <host name>-<random>, new at every start
    api_url: str | None = None  # how others reach this replica; unset: from api.listen
    leader_lease_ttl_s: Annotated[int, Field(ge=2, le=60)] = 5


class RolloutConfig(_Section):
    """`[rollout]`: how often the leader looks at every cluster's rollout and health."""

    interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    drain_hook_ca_file: Path | None = None  # trust for https drain hooks; unset: system CAs


class RemediationConfig(_Section):
    """`[remediation]`: which unhealthy nodes the leader replaces (zone/remediation.py)."""

    enabled: bool = True
    unhealthy_for_s: Annotated[float, Field(ge=0)] = 180.0
    window_s: Annotated[float, Field(ge=0)] = 600.0
    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.10


class ZoneServerConfig(_Section):
    state_dir: Path = Path("/var/lib/hostagent-zone")
    # SIGTERM: the longest the zone takes to stop (hand over the lead, finish the requests
    # under way, close the store) before it exits regardless; the unit's TimeoutStopSec
    # is above it
    shutdown_timeout_s: Annotated[float, Field(gt=0, le=600)] = 20.0
    api: ApiConfig = ApiConfig(listen=DEFAULT_ZONE_LISTEN)
    hosts: HostsConfig = HostsConfig()
    agents: AgentsConfig = AgentsConfig()
    network: ZoneNetworkConfig = ZoneNetworkConfig()
    pki: ZonePkiConfig = ZonePkiConfig()
    store: StoreConfig = StoreConfig()
    control_ca: ControlCaConfig = ControlCaConfig()
    replica: ReplicaConfig = ReplicaConfig()
    rollout: RolloutConfig = RolloutConfig()
    remediation: RemediationConfig = RemediationConfig()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_zone_config(path: Path | None) -> ZoneServerConfig:
    """The zone's configuration; a missing default file means all defaults. ConfigError
    names the dotted key of every bad value."""
    data: dict[str, object] = {}
    source = path or DEFAULT_ZONE_CONFIG_PATH
    if path is not None or source.exists():
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from exc
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{source} is not valid UTF-8 TOML: {exc}") from exc
    try:
        config = ZoneServerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid zone configuration: {validation_problems(exc)}") from exc
    api = config.api
    if not ipaddress.ip_address(api.host).is_loopback and not (api.tls_cert and api.tls_key):
        raise ConfigError(
            f"api.listen: {api.listen} is not a loopback address, which requires "
            "api.tls_cert and api.tls_key"
        )
    return config
