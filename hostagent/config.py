"""The agent's configuration: one typed object, loaded once from TOML, passed down.

Every key, its default and its meaning is documented in docs/configuration.md; the
defaults alone give a working single-host setup.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cloudconfig import context
from cloudconfig.addons import calico
from common.names import DNS1123_LABEL
from hostagent.errors import ConfigError, validation_problems
from hostagent.images import PULLED

DEFAULT_CONFIG_PATH = Path("/etc/hostagent/hostagent.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(_Section):
    listen: str = "127.0.0.1:8470"
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class AgentApiConfig(ApiConfig):
    """The agent's [api]: client_ca_file verifies the zone's client certificate (default,
    with mutual TLS: the zone's CA the agent got with its own certificate)."""

    client_ca_file: Path | None = None


class PhoneHomeConfig(_Section):
    port: Annotated[int, Field(ge=1, le=65535)] = 8472


class LibvirtConfig(_Section):
    uri: str = "qemu:///system"
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    kvm_probe_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    shutdown_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    qemu_img_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    qemu_user: str = "libvirt-qemu"


class CapacityConfig(_Section):
    reserved_vcpus: Annotated[int, Field(ge=0)] = 1
    reserved_memory_mib: Annotated[int, Field(ge=0)] = 1024
    reserved_disk_gib: Annotated[int, Field(ge=0)] = 10
    vcpu_ratio: Annotated[float, Field(gt=0, le=16)] = 4.0
    qemu_overhead_base_mib: Annotated[int, Field(ge=0)] = 192
    qemu_overhead_per_gib_mib: Annotated[int, Field(ge=0)] = 16


class ReconcilerConfig(_Section):
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8
    max_attempts: Annotated[int, Field(ge=1)] = 5
    backoff_initial_s: Annotated[float, Field(gt=0)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    resync_interval_s: Annotated[float, Field(gt=0)] = 60.0
    crash_loop_starts: Annotated[int, Field(ge=1)] = 5
    crash_loop_window_s: Annotated[float, Field(gt=0)] = 600.0


class HealthConfig(_Section):
    """`[health]`: when the agent calls a node unhealthy (docs/configuration.md)."""

    report_interval_s: Annotated[
        int, Field(ge=context.MIN_HEALTH_INTERVAL_S, le=context.MAX_HEALTH_INTERVAL_S)
    ] = 30
    report_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    crash_loop_starts: Annotated[int, Field(ge=2)] = 3
    check_interval_s: Annotated[float, Field(gt=0)] = 10.0
    boot_timeout_s: Annotated[float, Field(gt=0)] = 900.0

    @model_validator(mode="after")
    def _timeout(self) -> HealthConfig:
        if self.report_timeout_s <= self.report_interval_s:
            raise ValueError(
                f"health.report_timeout_s {self.report_timeout_s} must be longer than "
                f"health.report_interval_s {self.report_interval_s}: guests report that often"
            )
        return self


class ImagesConfig(_Section):
    """`[images]`: images pulled with `PUT /v1/images/{name}` (docs/configuration.md)."""

    unused_ttl_s: Annotated[float, Field(gt=0)] = 86400.0
    gc_interval_s: Annotated[float, Field(gt=0)] = 600.0
    download_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    download_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    ca_file: Path | None = None


class ExtraFileConfig(_Section):
    """`[[cloudconfig.<role>.files]]`: a file added to the role's write_files."""

    path: str
    content: str
    permissions: str = "0644"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return context.check_file_path(value)

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        return context.check_content(value)

    @field_validator("permissions")
    @classmethod
    def _permissions(cls, value: str) -> str:
        return context.check_permissions(value)


class ExtraUnitConfig(_Section):
    """`[[cloudconfig.<role>.units]]`: a systemd unit, enabled and started unless enable=false."""

    name: str
    content: str
    enable: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return context.check_unit_name(value)

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        return context.check_content(value)


class RoleExtensions(_Section):
    """What every node of one role gets on top of the shipped templates."""

    files: list[ExtraFileConfig] = Field(default_factory=list, max_length=256)
    units: list[ExtraUnitConfig] = Field(default_factory=list, max_length=64)
    commands: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("commands")
    @classmethod
    def _commands(cls, value: list[str]) -> list[str]:
        return [context.check_command(command) for command in value]

    @field_validator("units")
    @classmethod
    def _unique_units(cls, value: list[ExtraUnitConfig]) -> list[ExtraUnitConfig]:
        names = [unit.name for unit in value]
        if len(set(names)) != len(names):
            raise ValueError("unit names must be unique")
        return value


class CloudConfigConfig(_Section):
    model_config = ConfigDict(arbitrary_types_allowed=True)  # calico.Release

    template_dir: Path | None = None
    # The path in the file; here the release, read and checked once, at load.
    calico_manifest: calico.Release | None = None
    master: RoleExtensions = RoleExtensions()
    worker: RoleExtensions = RoleExtensions()

    @field_validator("calico_manifest", mode="before")
    @classmethod
    def _calico_manifest(cls, value: object) -> object:
        if isinstance(value, str | Path):
            return calico.read_release(Path(value))
        return value

    def extensions(self, role: str) -> RoleExtensions:
        return self.master if role == "master" else self.worker


class VaultConfig(_Section):
    url: str
    ca_bundle: Path | None = None
    token_file: Path | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"
    mount_prefix: str = "hostagent"
    kv_mount: str = "hostagent-kv"

    @model_validator(mode="after")
    def _one_auth(self) -> VaultConfig:
        approle = self.role_id_file is not None and self.secret_id_file is not None
        if (self.token_file is not None) == approle:
            raise ValueError("set either token_file or both role_id_file and secret_id_file")
        return self


class PkiConfig(_Section):
    backend: Literal["local", "vault", "zone"] = "local"
    key_type: Literal["ecdsa", "rsa"] = "ecdsa"
    ttl_days: Annotated[float, Field(gt=0, le=3650)] = 90.0
    renew_fraction: Annotated[float, Field(gt=0, lt=1)] = 2 / 3
    revoke_on_last_node: bool = True
    vault: VaultConfig | None = None

    @model_validator(mode="after")
    def _vault_settings(self) -> PkiConfig:
        if self.backend == "vault" and self.vault is None:
            raise ValueError("backend 'vault' needs a [pki.vault] section")
        return self


class StaticPeer(_Section):
    address: str
    macs: list[str] = Field(default_factory=list)


class StaticCluster(_Section):
    cluster: str
    peers: list[StaticPeer] = Field(default_factory=list)


class NetworkConfig(_Section):
    underlay_address: str | None = None
    underlay_mtu: Annotated[int, Field(ge=626, le=9216)] | None = None
    vxlan_port: Annotated[int, Field(ge=1, le=65535)] = 4789
    peer_check_interval_s: Annotated[float, Field(gt=0)] = 30.0
    peer_check_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    clusters: list[StaticCluster] = Field(default_factory=list)

    @field_validator("underlay_address")
    @classmethod
    def _underlay(cls, value: str | None) -> str | None:
        if value is not None and ipaddress.ip_address(value).version != 4:
            raise ValueError("underlay_address must be an IPv4 address")
        return value


FAILURE_DOMAIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class ZoneConfig(_Section):
    """`[zone]`: the zone service this host registers with; no url means standalone. url
    may be a list (the zone's replicas): ``url`` is then the first, ``urls`` all of them."""

    url: str | None = None
    urls: tuple[str, ...] = ()  # filled from url
    token_file: Path | None = None
    ca_file: Path | None = None
    failure_domain: str = "default"
    api_url: str | None = None
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0

    @model_validator(mode="before")
    @classmethod
    def _url_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and "url" in data:
            given = data["url"]
            urls = list(given) if isinstance(given, list | tuple) else [given]
            if not urls:
                raise ValueError("url: an empty list (leave url out to run standalone)")
            data = {**data, "url": urls[0], "urls": tuple(urls)}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return None if value is None else check_token_url(value, "url")

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_token_url(url, "url") for url in value)

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        return None if value is None else check_token_url(value, "api_url")

    @field_validator("failure_domain")
    @classmethod
    def _failure_domain(cls, value: str) -> str:
        if not FAILURE_DOMAIN.fullmatch(value):
            raise ValueError(
                f"failure_domain {value[:80]!r} must be 1..63 letters, digits, '.', '_' or "
                "'-', starting and ending with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _token(self) -> ZoneConfig:
        if self.url is not None and self.token_file is None:
            raise ValueError(
                "url needs token_file (the host token: `hostagent zone host-token HOST` "
                "on the zone)"
            )
        return self


class Config(_Section):
    host_id: str = Field(default_factory=socket.gethostname)
    state_dir: Path = Path("/var/lib/hostagent")
    image_dir: Path | None = None
    # Where pulled images live, this agent's alone (its start and its collection remove
    # what it does not know): hosts sharing an image_dir (the lab's) need one each.
    pulled_dir: Path | None = None
    api: AgentApiConfig = AgentApiConfig()
    phone_home: PhoneHomeConfig = PhoneHomeConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    capacity: CapacityConfig = CapacityConfig()
    reconciler: ReconcilerConfig = ReconcilerConfig()
    health: HealthConfig = HealthConfig()
    # [images] in the file; `images` is the image directory (a property) in the code
    image_cache: ImagesConfig = Field(default=ImagesConfig(), alias="images")
    cloudconfig: CloudConfigConfig = CloudConfigConfig()
    pki: PkiConfig = PkiConfig()
    network: NetworkConfig = NetworkConfig()
    zone: ZoneConfig = ZoneConfig()

    @model_validator(mode="after")
    def _zone(self) -> Config:
        if self.pki.backend == "zone" and self.zone.url is None:
            raise ValueError("pki.backend 'zone' needs [zone] url (and token_file)")
        if self.zone.url is not None and not DNS1123_LABEL.fullmatch(self.host_id):
            raise ValueError(
                f"host_id {self.host_id[:80]!r}: in a zone a host id must be a DNS-1123 label "
                "(lowercase a-z, 0-9, '-'; the zone's host tokens carry it); set host_id"
            )
        if self.zone.url is not None and self.agent_url is None:
            raise ValueError(
                f"zone.api_url: set it: api.listen {self.api.listen} does not say how the "
                "zone reaches this agent, and there is no network.underlay_address to use"
            )
        return self

    @property
    def agent_url(self) -> str | None:
        """How the zone reaches this agent: [zone] api_url, else from [api] listen (an
        unspecified listen address, 0.0.0.0 or ::, takes the underlay address)."""
        if self.zone.api_url is not None:
            return self.zone.api_url
        host = self.api.host
        if ipaddress.ip_address(host).is_unspecified:
            if self.network.underlay_address is None:
                return None
            host = self.network.underlay_address
        scheme = "https" if self.api.tls_cert is not None else "http"
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.api.port}"

    @property
    def images(self) -> Path:
        return self.image_dir or self.state_dir / "images"

    @property
    def pulled_images(self) -> Path:
        return self.pulled_dir or self.images / PULLED

    @property
    def nodes_dir(self) -> Path:
        return self.state_dir / "nodes"

    @property
    def database(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def token_file(self) -> Path:
        return self.state_dir / "api-token"

    @property
    def zone_mtls(self) -> bool:
        """Mutual TLS with the zone: on whenever the zone is reached over https."""
        return self.zone.url is not None and self.zone.url.startswith("https:")

    @property
    def zone_tls_dir(self) -> Path:
        """The host's certificate of the zone (client.pem: key and certificate) and the
        zone's CA (ca.crt)."""
        return self.state_dir / "zone-tls"


def check_url(value: str, key: str) -> str:
    """An http(s) base URL with a host and nothing after the path; the trailing / dropped."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"{key} {value[:80]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} {value[:80]!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{key} {value[:80]!r} must not carry credentials, a query or fragment")
    return value.rstrip("/")


def check_token_url(value: str, key: str) -> str:
    """check_url for a URL a token is sent to (the zone's, an agent's): plain http only to
    a loopback address, as an API listening elsewhere needs TLS."""
    value = check_url(value, key)
    if urlsplit(value).scheme == "http" and not is_loopback(urlsplit(value).hostname or ""):
        raise ValueError(
            f"{key} {value[:80]!r}: plain http is only allowed to a loopback address; "
            "use https (a token travels with every request)"
        )
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: Path, key: str) -> str:
    """A token from its file (read once, at start; never logged); ConfigError naming key."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc}") from exc
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    ipaddress.ip_address(host.strip("[]"))
    return host.strip("[]"), int(port)


def load_config(path: Path | None) -> Config:
    """Load the configuration; a missing default file means all defaults.

    Raises ConfigError with the dotted key path of the first bad key.
    """
    data: dict[str, object] = {}
    if path is not None or DEFAULT_CONFIG_PATH.exists():
        source = path or DEFAULT_CONFIG_PATH
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source} is not UTF-8: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {validation_problems(exc)}") from exc
    _check_tls(config)
    return config


def _check_tls(config: Config) -> None:
    host = ipaddress.ip_address(config.api.host)
    has_tls = config.api.tls_cert is not None and config.api.tls_key is not None
    if config.api.client_ca_file is not None and not has_tls:
        raise ConfigError(
            "api.client_ca_file: client certificates come over TLS only; set api.tls_cert "
            "and api.tls_key too"
        )
    if not host.is_loopback and not has_tls:
        raise ConfigError(
            f"api.listen: {config.api.listen} is not a loopback address, which requires "
            "api.tls_cert and api.tls_key"
        )
