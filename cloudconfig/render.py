"""Pure rendering of a node's NoCloud files: user-data, meta-data and network-config.

The only module that imports jinja2. user-data is data (userdata.py) dumped once by
PyYAML; the files it carries are rendered from the Jinja2 templates of the node's
Kubernetes minor, templates/<minor>/. Every value a file template writes is derived
here, in Python, and reaches a YAML file through the `yaml` filter, which makes it
inert. meta-data and network-config are plain data, never templated.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import jinja2

from cloudconfig import userdata
from cloudconfig.addons import calico
from cloudconfig.context import (
    MAX_HEALTH_INTERVAL_S,
    MIN_HEALTH_INTERVAL_S,
    Derived,
    MasterPeer,
    NodeContext,
    Vrrp,
)
from cloudconfig.userdata import ETCD_DATA_DIR
from cloudconfig.versions import TEMPLATES, template_folder
from common import yamlio
from pki import layout

ROLES = ("master", "worker")
ETCD_MODES = ("static-pod", "systemd")
DEFAULT_ROUTE = "0.0.0.0/0"  # see render_network_config
API_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
# keepalived: the first master's priority; each later master's is one lower.
VRRP_TOP_PRIORITY = 200
# Skeleton templates of before user-data was data: an override of one of them would
# be ignored, so a template_dir holding one is refused (docs/cloudconfig.md).
RETIRED_TEMPLATES = (
    "common.yaml.j2",
    "master.yaml.j2",
    "worker.yaml.j2",
    "node.yaml.j2",
    "files.j2",
    "config/kubeconfig.j2",
)

# The guest sources phone-home.env with sh and a lab guest greps it line by line,
# so both values are written unquoted: only characters that are inert in a YAML
# block scalar and in a shell assignment are allowed (no whitespace, quotes, $, `,
# &, ;, (, ), ~, backslash).
_TOKEN = re.compile(r"[0-9a-f]+")
_URL = re.compile(
    r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[A-Za-z0-9._/%=?+,@:-]*)?"
)
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ENDPOINT = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?:([0-9]{1,5})")
_DEVICE = re.compile(r"/dev/[A-Za-z0-9._:/-]{1,200}")
# A string PyYAML would write double-quoted exactly as it is: printable ASCII, no " or \.
_PLAIN_QUOTABLE = re.compile(r"[ !#-\[\]-~]*")
# An argument systemd reads literally on an ExecStart line: no specifiers (%), no
# variables ($), no quotes, backslashes or whitespace.
_UNIT_ARG = re.compile(r"[A-Za-z0-9=:/.,_@+-]+")
_IP = TypeVar("_IP")


def _undefined(value: object) -> NoReturn:
    # Filters receive a StrictUndefined untouched; turning it into text makes it
    # raise jinja2's UndefinedError, which names the missing variable.
    text = str(value)
    raise ValueError(f"{type(value).__name__} {text[:80]!r} cannot be written by this filter")


def unit_arg(value: object) -> str:
    """The `unit_arg` filter, for values on a systemd ExecStart line: the value as it
    is, or ValueError when systemd would not read it literally."""
    text = value if isinstance(value, str) else _undefined(value)
    if not _UNIT_ARG.fullmatch(text):
        raise ValueError(f"{text[:80]!r} cannot be written literally on an ExecStart line")
    return text


def _check_defined(value: object) -> None:
    if isinstance(value, jinja2.Undefined):
        _undefined(value)
    if isinstance(value, list | tuple):
        for item in value:
            _check_defined(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_defined(key)
            _check_defined(item)


def to_yaml(value: object) -> str:
    """The `yaml` filter, for values in YAML file templates: any value as one line of
    YAML (flow style, strings double-quoted)."""
    if isinstance(value, str) and _PLAIN_QUOTABLE.fullmatch(value):
        return f'"{value}"'  # what yamlio.one_line writes, without its cost
    _check_defined(value)
    return yamlio.one_line(value)


@functools.lru_cache(maxsize=16)
def _environment(template_dir: Path | None, minor: str) -> jinja2.Environment:
    # Cached: compiling the templates is most of a render's cost. Jinja's loaders check
    # the files' mtimes (auto_reload), so an edited override template is still picked up.
    # Overrides come first, file by file: <template_dir>/<minor>/, then <template_dir>/,
    # then the shipped templates/<minor>/ (an operator can replace one partial).
    dirs = [TEMPLATES / minor]
    if template_dir is not None:
        dirs = [template_dir / minor, template_dir, *dirs]
        _check_no_retired(template_dir, minor)
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(d) for d in dirs]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["yaml"] = to_yaml
    env.filters["unit_arg"] = unit_arg
    return env


def _check_no_retired(template_dir: Path, minor: str) -> None:
    for folder in (template_dir / minor, template_dir):
        for name in RETIRED_TEMPLATES:
            if (folder / name).exists():
                raise ValueError(
                    f"template_dir: {folder / name} is no longer read: user-data is built "
                    "in cloudconfig/userdata.py; override a file's own template, or add "
                    "files with [[cloudconfig.<role>.files]] (docs/cloudconfig.md)"
                )


def check_phone_home(url: str, token: str) -> None:
    """Raise ValueError unless url and token are safe to write unquoted (see _URL)."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("phone_home_token must be lowercase hex (0-9a-f), at least one digit")
    if not _URL.fullmatch(url):
        raise ValueError(
            f"phone_home_url {url[:80]!r} must be an http(s) URL without whitespace, quotes "
            "or shell metacharacters"
        )


def derive(ctx: NodeContext) -> Derived:
    """Check the context and derive the template values; ValueError names the bad field."""
    if "/" not in ctx.address:
        raise ValueError(f"address {ctx.address!r} needs a prefix length, e.g. 10.42.0.11/24")
    node_ip = str(_ipv4("address", ctx.address, ipaddress.IPv4Interface).ip)
    services = _ipv4("service_cidr", ctx.service_cidr, ipaddress.IPv4Network)
    _ipv4("pod_cidr", ctx.pod_cidr, ipaddress.IPv4Network)
    if services.num_addresses < 16:
        raise ValueError(f"service_cidr {ctx.service_cidr} must be a /28 or larger")
    _check_domain(ctx.cluster_domain)
    masters = _masters(ctx, node_ip)
    vrrp = _vrrp(ctx, node_ip, masters)
    endpoint = ctx.api_endpoint or f"{ctx.vip or masters[0].address}:{API_PORT}"
    if not _ENDPOINT.fullmatch(endpoint) or not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"api_endpoint {endpoint[:80]!r} must be HOST:PORT")
    if ctx.etcd_disk is not None and (
        ctx.role != "master" or not _DEVICE.fullmatch(ctx.etcd_disk) or ".." in ctx.etcd_disk
    ):
        raise ValueError(f"etcd_disk {ctx.etcd_disk[:80]!r} must be a /dev path, masters only")
    if ctx.etcd_mode not in ETCD_MODES:
        raise ValueError(f"etcd_mode {ctx.etcd_mode[:40]!r} must be one of {', '.join(ETCD_MODES)}")
    mounts = [layout.GUEST_MOUNT] + ([ETCD_DATA_DIR] if ctx.etcd_disk else [])
    # etcd listens on the VIP too (the master that holds it answers; net.ipv4.
    # ip_nonlocal_bind lets the others bind it before they do).
    client_hosts = ["127.0.0.1", node_ip] + ([ctx.vip] if ctx.vip else [])
    return Derived(
        node_ip=node_ip,
        masters=masters,
        api_endpoint=endpoint,
        api_server=f"https://{endpoint}",
        local_api_server=f"https://{node_ip}:{API_PORT}",
        service_ip=str(services.network_address + 1),
        cluster_dns=str(services.network_address + 10),
        etcd_initial_cluster=",".join(
            f"{m.name}=https://{m.address}:{ETCD_PEER_PORT}" for m in masters
        ),
        etcd_servers=",".join(f"https://{m.address}:{ETCD_CLIENT_PORT}" for m in masters),
        etcd_client_urls=",".join(f"https://{h}:{ETCD_CLIENT_PORT}" for h in client_hosts),
        vrrp=vrrp,
        service_account_issuer=f"https://kubernetes.default.svc.{ctx.cluster_domain}",
        mounts=tuple(mounts),
    )


def _ipv4(name: str, value: str, parse: Callable[[str], _IP]) -> _IP:
    try:
        return parse(value)
    except ValueError as exc:
        raise ValueError(f"{name} {value[:80]!r} is not IPv4: {exc}") from exc


def _check_domain(domain: str) -> None:
    if len(domain) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in domain.split(".")):
        raise ValueError(f"cluster_domain {domain[:80]!r} is not a DNS name")


def _masters(ctx: NodeContext, node_ip: str) -> tuple[MasterPeer, ...]:
    """The masters, checked: DNS-label names (they go into etcd's flags), IPv4 addresses,
    no duplicates, and a master among them under its own name and address."""
    masters = ctx.masters
    if not masters:
        if ctx.role != "master" and not ctx.api_endpoint:
            raise ValueError("a worker needs the cluster's masters or its api_endpoint")
        masters = (MasterPeer(ctx.hostname, node_ip),) if ctx.role == "master" else ()
    for master in masters:
        if not _DNS_LABEL.fullmatch(master.name):
            raise ValueError(f"master name {master.name[:80]!r} is not a DNS-1123 label")
        _ipv4(f"master {master.name}'s address", master.address, ipaddress.IPv4Address)
    if len({m.name for m in masters}) != len(masters):
        raise ValueError("master names must be unique")
    if ctx.role == "master" and MasterPeer(ctx.hostname, node_ip) not in masters:
        raise ValueError(
            f"master {ctx.hostname} ({node_ip}) must be one of the cluster's masters "
            f"({', '.join(f'{m.name} ({m.address})' for m in masters)}): etcd's initial "
            "cluster must include it"
        )
    return masters


def _vrrp(ctx: NodeContext, node_ip: str, masters: tuple[MasterPeer, ...]) -> Vrrp | None:
    """A master's keepalived values when the cluster has a VIP; the VIP checked: an
    IPv4 address of the node's subnet that no master and not the gateway holds."""
    if not ctx.vip:
        return None
    vip = _ipv4("vip", ctx.vip, ipaddress.IPv4Address)
    subnet = ipaddress.IPv4Interface(ctx.address).network
    taken = {m.address for m in masters} | {node_ip, ctx.gateway}
    if (
        vip not in subnet
        or ctx.vip in taken
        or vip in (subnet.network_address, subnet.broadcast_address)
    ):
        raise ValueError(
            f"vip {ctx.vip} must be a free address of the node subnet {subnet} (not a "
            "master's, the gateway's, the network's or the broadcast address)"
        )
    if ctx.role != "master":
        return None
    index = masters.index(MasterPeer(ctx.hostname, node_ip))
    return Vrrp(
        address=f"{ctx.vip}/{subnet.prefixlen}",
        router_id=ctx.vni % 255 + 1,
        priority=VRRP_TOP_PRIORITY - index,
        source=node_ip,
        peers=tuple(m.address for m in masters if m.address != node_ip),
    )


def check_context(ctx: NodeContext) -> str:
    """Raise ValueError (UnsupportedVersion for the version) for a context the shipped
    templates cannot render; return its template folder (the minor)."""
    if ctx.role not in ROLES:
        raise ValueError(f"role {ctx.role!r} must be one of {', '.join(ROLES)}")
    check_phone_home(ctx.phone_home_url, ctx.phone_home_token)
    if not MIN_HEALTH_INTERVAL_S <= ctx.health_report_interval_s <= MAX_HEALTH_INTERVAL_S:
        raise ValueError(
            f"health_report_interval_s {ctx.health_report_interval_s} must be "
            f"{MIN_HEALTH_INTERVAL_S}..{MAX_HEALTH_INTERVAL_S}"
        )
    minor = template_folder(ctx.kubernetes_version)
    derive(ctx)
    return minor


def template_vars(ctx: NodeContext, derived: Derived) -> dict[str, object]:
    """What a file template may use: the context's fields, the derived values, the
    certificate paths (`pki`), etcd's data directory and the Kubernetes binaries."""
    return {
        **dataclasses.asdict(ctx),
        **dataclasses.asdict(derived),
        "is_master": ctx.role == "master",
        "pki": layout.guest_paths(),
        "etcd_data_dir": ETCD_DATA_DIR,
        "bin_dir": f"/opt/kubernetes/v{ctx.kubernetes_version}/bin",
    }


def render_user_data(
    ctx: NodeContext,
    template_dir: Path | None = None,
    calico_release: calico.Release | None = None,
) -> str:
    """The node's #cloud-config: userdata.cloud_config, its files rendered from the
    templates of the node's minor; a master's Calico add-on from calico_release (the
    operator's, read at config load) or the built-in.

    ValueError on bad input or a bad template; UnsupportedVersion (a ValueError) when
    no template folder serves ctx.kubernetes_version.
    """
    minor = check_context(ctx)
    derived = derive(ctx)
    body = _body_renderer(_environment(template_dir, minor), minor, template_vars(ctx, derived))
    return userdata.dump(userdata.cloud_config(ctx, derived, body, calico_release))


def _body_renderer(
    env: jinja2.Environment, minor: str, variables: dict[str, object]
) -> userdata.Body:
    """body(name, **extra): the text of template <minor>/<name>, which sees `variables`,
    `k8s` (constants.j2) and extra. An operator's `.yaml.j2` template must render YAML."""
    try:
        k8s = env.get_template("constants.j2").make_module(variables)
    except jinja2.TemplateError as exc:
        raise ValueError(f"template {minor}/constants.j2: {type(exc).__name__}: {exc}") from exc

    def body(name: str, **extra: object) -> str:
        try:
            template = env.get_template(name)
            text = template.render(**variables, k8s=k8s, **extra)
        except jinja2.TemplateError as exc:  # e.g. an undefined name in an override
            raise ValueError(f"template {minor}/{name}: {type(exc).__name__}: {exc}") from exc
        if name.endswith(".yaml.j2") and not _shipped(template):
            # A broken manifest would only fail inside the guest; better refuse here,
            # where the message reaches a person. (Tests parse the shipped ones.)
            try:
                yamlio.load_all(text)
            except yamlio.YAMLError as exc:
                raise ValueError(f"template {minor}/{name} rendered invalid YAML: {exc}") from exc
        return text

    return body


def _shipped(template: jinja2.Template) -> bool:
    return template.filename is not None and Path(template.filename).is_relative_to(TEMPLATES)


def render_node(
    ctx: NodeContext,
    template_dir: Path | None = None,
    calico_release: calico.Release | None = None,
) -> dict[str, str]:
    """The node's NoCloud files by their names on the config drive."""
    return {
        "user-data": render_user_data(ctx, template_dir, calico_release),
        "meta-data": render_meta_data(ctx),
        "network-config": render_network_config(ctx),
    }


def render_meta_data(ctx: NodeContext) -> str:
    """NoCloud meta-data: the instance id (cloud-init's run-once key) and the hostname."""
    data = {"instance-id": ctx.instance_id, "local-hostname": ctx.hostname}
    return yamlio.dump(data)


def render_network_config(ctx: NodeContext) -> str:
    """Netplan v2 with a static address: no DHCP wait at boot, and a shape the lab
    guest's line-wise parser relies on (keep keys and their order as they are).

    The default route is written `to: 0.0.0.0/0`, not `to: default`: cloud-init
    22.4 (Debian 12) raises "Address default is not a valid ip address" on the
    latter and the guest's init stage fails; netplan reads both the same.
    """
    data = {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": ctx.mac},
                "set-name": "eth0",
                "addresses": [ctx.address],
                "routes": [{"to": DEFAULT_ROUTE, "via": ctx.gateway}],
                "mtu": ctx.mtu,
            }
        },
    }
    return yamlio.dump(data)
