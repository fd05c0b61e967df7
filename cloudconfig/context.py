"""NodeContext: everything the cloud-config templates may know about one node.

The templates see only this object's fields (and what render.py derives from them),
never a NodeSpec or the agent's config: the caller decides what a guest may learn, and
a template change cannot reach into the rest of the agent.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from pki.layout import GUEST_MOUNT

MAX_CONTENT = 1024 * 1024  # one extension file; user-data travels on a small ISO
MAX_COMMAND = 64 * 1024
_PERMISSIONS = re.compile(r"[0-7]{3,4}")
_UNIT_NAME = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,200}\.(service|socket|timer|path|mount|automount|target|slice)"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_file_path(path: str) -> str:
    """Return path when it is a normalised absolute path a guest can write, else ValueError."""
    if (
        not path.startswith("/")
        or path == "/"
        or posixpath.normpath(path) != path
        or path.startswith("//")
        or len(path) > 4096
        or _CONTROL.search(path)
    ):
        raise ValueError(
            f"file path {path[:80]!r} must be a normalised absolute path without control "
            "characters (no '..', '//' or trailing '/')"
        )
    if path == GUEST_MOUNT or path.startswith(GUEST_MOUNT + "/"):
        raise ValueError(f"file path {path[:80]!r} is inside the read-only {GUEST_MOUNT}")
    return path


def check_permissions(permissions: str) -> str:
    if not _PERMISSIONS.fullmatch(permissions):
        raise ValueError(f"permissions {permissions[:20]!r} must be octal digits, e.g. '0644'")
    return permissions


def check_unit_name(name: str) -> str:
    if not _UNIT_NAME.fullmatch(name):
        raise ValueError(
            f"unit name {name[:80]!r} must be a systemd unit file name such as "
            "'audit.service' (letters, digits, ':_.@-', a unit type suffix)"
        )
    return name


def check_content(content: str) -> str:
    if len(content) > MAX_CONTENT:
        raise ValueError(f"content of {len(content)} characters is over {MAX_CONTENT}")
    return content


def check_command(command: str) -> str:
    if not command.strip() or "\x00" in command or len(command) > MAX_COMMAND:
        raise ValueError(
            f"command {command[:80]!r} must be non-empty, without NUL, at most {MAX_COMMAND} "
            "characters"
        )
    return command


@dataclass(frozen=True)
class ExtraFile:
    """A file the operator adds to every node of a role (appended to write_files)."""

    path: str
    content: str
    permissions: str = "0644"

    def __post_init__(self) -> None:
        check_file_path(self.path)
        check_content(self.content)
        check_permissions(self.permissions)


@dataclass(frozen=True)
class ExtraUnit:
    """A systemd unit the operator adds: written to /etc/systemd/system, enabled if asked."""

    name: str
    content: str
    enable: bool = True

    def __post_init__(self) -> None:
        check_unit_name(self.name)
        check_content(self.content)


@dataclass(frozen=True)
class Extensions:
    """The agent config's additions for one role (Giant Swarm's Files/Units extension)."""

    files: tuple[ExtraFile, ...] = ()
    units: tuple[ExtraUnit, ...] = ()
    commands: tuple[str, ...] = ()  # run by sh in runcmd, after the units, before phone-home

    def __post_init__(self) -> None:
        for command in self.commands:
            check_command(command)


@dataclass(frozen=True)
class MasterPeer:
    """One master of the cluster: a member of etcd's initial cluster."""

    name: str
    address: str  # IPv4 without prefix length


@dataclass(frozen=True)
class Vrrp:
    """What a master's keepalived needs to hold the cluster's VIP with its peers."""

    address: str  # the VIP with the node subnet's prefix length, e.g. 10.42.0.5/24
    router_id: int  # virtual_router_id, 1..255: from the cluster's VNI
    priority: int  # higher for earlier masters: the first master takes the VIP at start
    source: str  # this master's address: unicast_src_ip
    peers: tuple[str, ...]  # the other masters' addresses: unicast_peer


# The guest's health report interval, seconds (hostagent-health.timer)
MIN_HEALTH_INTERVAL_S = 5
MAX_HEALTH_INTERVAL_S = 3600


@dataclass(frozen=True)
class NodeContext:
    cluster: str
    node: str
    role: str  # "master" | "worker": picks the template
    hostname: str  # also the Kubernetes node name (the kubelet's default)
    instance_id: str  # a new value makes cloud-init run its per-instance modules again
    mac: str
    address: str  # IPv4 with prefix length, e.g. "10.42.0.11/24"
    gateway: str
    mtu: int
    kubernetes_version: str  # MAJOR.MINOR.PATCH; its minor picks templates/<minor>/
    ssh_authorized_keys: tuple[str, ...]
    phone_home_url: str
    phone_home_token: str
    # How often the guest tells its agent it is alive (hostagent-health.timer).
    health_report_interval_s: int = 30
    # The guest cluster. The defaults match ClusterSpec's; empty masters on a master
    # means "this node alone", an empty api_endpoint "the first master, port 6443".
    masters: tuple[MasterPeer, ...] = ()
    api_endpoint: str = ""  # "host:port"
    pod_cidr: str = "192.168.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    cluster_domain: str = "cluster.local"
    # Guest device of a master's etcd data disk (None: etcd's data stays on the root disk).
    etcd_disk: str | None = None
    etcd_mode: str = "static-pod"  # "static-pod" | "systemd" (hostagent.model.EtcdMode)
    vip: str = ""  # the cluster's virtual IP (IPv4, no prefix); "" for none
    vni: int = 0  # the cluster network's VNI: the VRRP router id derives from it
    extensions: Extensions = field(default_factory=Extensions)


@dataclass(frozen=True)
class Derived:
    """What the templates use beyond the context's fields, computed once, here."""

    node_ip: str  # the address without its prefix length
    masters: tuple[MasterPeer, ...]  # resolved; empty only for a worker given api_endpoint
    api_endpoint: str  # host:port every node's kubelet and admin.conf use
    api_server: str  # https://<api_endpoint>
    local_api_server: str  # a master's own API server (controller-manager, scheduler)
    service_ip: str  # first host of service_cidr: the `kubernetes` Service
    cluster_dns: str  # tenth host of service_cidr: the DNS Service
    etcd_initial_cluster: str  # name=https://ip:2380,...
    etcd_servers: str  # https://ip:2379,... for the API server
    etcd_client_urls: str  # where etcd listens for clients: loopback, node, VIP
    vrrp: Vrrp | None  # a master of a cluster with a VIP: its keepalived's values
    service_account_issuer: str
    mounts: tuple[str, ...]  # mount points the guest reports on
