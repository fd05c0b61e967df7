"""Pure rendering of a node's NoCloud files: user-data, meta-data and network-config.

The only module that imports jinja2. user-data comes from the Jinja2 templates of the
node's Kubernetes minor, templates/<minor>/<role>.yaml.j2; every value a template
writes is derived here, in Python, and reaches the text through a filter that makes
it inert (`yaml`, `literal`, `json`). meta-data and network-config are plain data,
dumped with PyYAML and never templated.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import jinja2
import yaml
from yaml.representer import SafeRepresenter

from cloudconfig.addons import calico
from cloudconfig.context import MasterPeer, NodeContext
from cloudconfig.versions import TEMPLATES, template_folder
from pki import layout

ROLES = ("master", "worker")
DEFAULT_ROUTE = "0.0.0.0/0"  # see render_network_config
API_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_DATA_DIR = "/var/lib/etcd"
# Read-only: the guest must not be able to change its own certificates.
PKI_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,ro"
# Written by the runcmd entry before phone-home; /run, so it speaks for this boot only.
RUNCMD_MARKER = "/run/hostagent/runcmd-reached"
# Builds the phone-home body inside the guest (python3 ships with cloud-init).
PHONE_HOME_PROGRAM = (Path(__file__).parent / "phone_home_report.py").read_text()

# The guest sources phone-home.env with sh and a lab guest greps it line by line,
# so both values are written unquoted: only characters that are inert in a YAML
# block scalar and in a shell assignment are allowed (no whitespace, quotes, $, `,
# &, ;, (, ), ~, backslash).
_TOKEN = re.compile(r"[0-9a-f]+")
_URL = re.compile(
    r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[A-Za-z0-9._/%=?+,@:-]*)?"
)
_ENV_LINE = re.compile(r"[A-Za-z0-9._/%=?+,@:\[\]-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ENDPOINT = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?:([0-9]{1,5})")
_DEVICE = re.compile(r"/dev/[A-Za-z0-9._:/-]{1,200}")
# A string PyYAML would write double-quoted exactly as it is: printable ASCII, no " or \.
_PLAIN_QUOTABLE = re.compile(r"[ !#-\[\]-~]*")
# Characters a literal block scalar can carry as they are: printable, no tab, and none
# of the characters YAML 1.1 reads as a line break (NEL, LS, PS) or a BOM.
_BLOCK_UNSAFE = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_IP = TypeVar("_IP")


class _QuotingDumper(yaml.SafeDumper):
    """A SafeDumper that writes every string double-quoted.

    Double-quoted is the one YAML style that can hold any string on one line
    (line breaks and non-printables become escapes), so a value can never change
    the structure of the document it is pasted into, whatever its indentation.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')


def _undefined(value: object) -> NoReturn:
    # Filters receive a StrictUndefined untouched; turning it into text makes it
    # raise jinja2's UndefinedError, which names the missing variable.
    text = str(value)
    raise ValueError(f"{type(value).__name__} {text[:80]!r} cannot be written by this filter")


_QuotingDumper.add_representer(str, _represent_str)
_QuotingDumper.add_multi_representer(jinja2.Undefined, lambda _dumper, value: _undefined(value))
# NodeContext holds tuples (it is frozen); SafeDumper alone refuses them.
_QuotingDumper.add_representer(tuple, SafeRepresenter.represent_list)


def to_yaml(value: object) -> str:
    """The `yaml` filter: any value as one line of YAML (flow style, strings quoted)."""
    if isinstance(value, str) and _PLAIN_QUOTABLE.fullmatch(value):
        return f'"{value}"'  # what the dumper below writes, without its cost
    try:
        text = yaml.dump(
            value,
            Dumper=_QuotingDumper,
            default_flow_style=True,
            width=math.inf,
            allow_unicode=True,
        )
    except yaml.YAMLError as exc:  # e.g. an object YAML has no tag for
        raise ValueError(f"cannot write {type(value).__name__} as YAML: {exc}") from exc
    # A bare scalar (int, bool, null) is dumped as a document with an explicit end.
    text = text.removesuffix("\n...\n").removesuffix("\n")
    if "\n" in text:  # cannot happen with the dumper above; kept as the last guard
        raise ValueError(f"value does not fit on one YAML line: {value!r:.80}")
    return text


def literal(value: object, indent: int) -> str:
    """The `literal` filter: a string as a YAML literal block scalar (`|`) whose lines are
    indented by `indent` spaces, so files read naturally in user-data.

    Only text a block scalar carries exactly is written that way: printable, no tabs,
    no trailing spaces, a first line not starting with a space. Anything else falls
    back to the `yaml` filter's one double-quoted line, which can hold any string.
    """
    if not isinstance(value, str):
        return to_yaml(value)
    lines = value.split("\n")
    first = next((line for line in lines if line), "")
    if (
        not first
        or first.startswith(" ")
        or _BLOCK_UNSAFE.search(value)
        or any(line.endswith(" ") for line in lines)
    ):
        return to_yaml(value)
    breaks = len(value) - len(value.rstrip("\n"))
    header = "|-" if breaks == 0 else "|" if breaks == 1 else "|+"
    body = lines[: len(lines) - 1] if breaks else lines  # the last piece follows a break
    pad = " " * indent
    return header + "".join(f"\n{pad}{line}" if line else "\n" for line in body)


def env_line(value: object) -> str:
    """The `env_line` filter: a value written unquoted in a block scalar, so checked instead."""
    if not isinstance(value, str):
        _undefined(value)
    if not _ENV_LINE.fullmatch(value):
        raise ValueError(f"{value[:80]!r} cannot be written unquoted into an env file")
    return value


def to_json(value: object, compact: bool = False) -> str:
    """The `json` filter: the content of a JSON file, or with compact=True one line (e.g.
    a program's argument). The result still goes through `yaml` or `literal`."""
    if compact:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_undefined)
    return json.dumps(value, indent=2, sort_keys=True, default=_undefined) + "\n"


@functools.lru_cache(maxsize=16)
def _environment(template_dir: Path | None, minor: str) -> jinja2.Environment:
    # Cached: compiling the templates is most of a render's cost. Jinja's loaders check
    # the files' mtimes (auto_reload), so an edited override template is still picked up.
    # Overrides come first, file by file: <template_dir>/<minor>/, then <template_dir>/,
    # then the shipped templates/<minor>/ (an operator can replace one partial).
    dirs = [TEMPLATES / minor]
    if template_dir is not None:
        dirs = [template_dir / minor, template_dir, *dirs]
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(d) for d in dirs]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(yaml=to_yaml, literal=literal, env_line=env_line, json=to_json)
    return env


def check_phone_home(url: str, token: str) -> None:
    """Raise ValueError unless url and token are safe to write unquoted (see _URL)."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("phone_home_token must be lowercase hex (0-9a-f), at least one digit")
    if not _URL.fullmatch(url):
        raise ValueError(
            f"phone_home_url {url[:80]!r} must be an http(s) URL without whitespace, quotes "
            "or shell metacharacters"
        )


@dataclasses.dataclass(frozen=True)
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
    service_account_issuer: str
    mounts: tuple[str, ...]  # mount points the guest reports on


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
    endpoint = ctx.api_endpoint or f"{masters[0].address}:{API_PORT}"
    if not _ENDPOINT.fullmatch(endpoint) or not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"api_endpoint {endpoint[:80]!r} must be HOST:PORT")
    if ctx.etcd_disk is not None and (
        ctx.role != "master" or not _DEVICE.fullmatch(ctx.etcd_disk) or ".." in ctx.etcd_disk
    ):
        raise ValueError(f"etcd_disk {ctx.etcd_disk[:80]!r} must be a /dev path, masters only")
    mounts = [layout.GUEST_MOUNT] + ([ETCD_DATA_DIR] if ctx.etcd_disk else [])
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


def check_context(ctx: NodeContext) -> str:
    """Raise ValueError (UnsupportedVersion for the version) for a context the shipped
    templates cannot render; return its template folder (the minor)."""
    if ctx.role not in ROLES:
        raise ValueError(f"role {ctx.role!r} must be one of {', '.join(ROLES)}")
    check_phone_home(ctx.phone_home_url, ctx.phone_home_token)
    minor = template_folder(ctx.kubernetes_version)
    derive(ctx)
    return minor


def template_vars(
    ctx: NodeContext, calico_release: calico.Release | None = None
) -> dict[str, object]:
    """What a template may use: the context's fields, the derived values, the certificate
    paths (`pki`), the certificate share, the add-on files and the phone-home pieces."""
    derived = derive(ctx)
    is_master = ctx.role == "master"
    return {
        **dataclasses.asdict(ctx),
        **dataclasses.asdict(derived),
        "is_master": is_master,
        "pki": layout.guest_paths(),
        "pki_mount_tag": layout.MOUNT_TAG,
        "pki_guest_mount": layout.GUEST_MOUNT,
        "pki_mount_options": PKI_MOUNT_OPTIONS,
        "etcd_data_dir": ETCD_DATA_DIR,
        "calico_manifests": (
            calico.manifest_file(ctx.pod_cidr, ctx.mtu, calico_release) if is_master else ""
        ),
        "runcmd_marker": RUNCMD_MARKER,
        "runcmd_marker_dir": RUNCMD_MARKER.rsplit("/", 1)[0],
        "phone_home_program": PHONE_HOME_PROGRAM,
    }


def render_user_data(
    ctx: NodeContext,
    template_dir: Path | None = None,
    calico_release: calico.Release | None = None,
) -> str:
    """The node's #cloud-config, from `<minor>/<role>.yaml.j2`; a master's Calico add-on
    from calico_release (the operator's, read at config load) or the built-in.

    ValueError on bad input or a bad template; UnsupportedVersion (a ValueError) when
    no template folder serves ctx.kubernetes_version.
    """
    minor = check_context(ctx)
    variables = template_vars(ctx, calico_release)
    name = f"{ctx.role}.yaml.j2"
    try:
        text = _environment(template_dir, minor).get_template(name).render(**variables)
    except jinja2.TemplateError as exc:  # e.g. an undefined name in an override template
        raise ValueError(f"template {minor}/{name}: {type(exc).__name__}: {exc}") from exc
    _check_cloud_config(f"{minor}/{name}", text)
    return text


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


def _check_cloud_config(name: str, text: str) -> None:
    # cloud-init ignores user-data it cannot parse and the guest then boots without
    # it; better to refuse here, where the message reaches a person.
    if not text.startswith("#cloud-config\n"):
        raise ValueError(f"template {name} must render a first line '#cloud-config'")
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ValueError(f"template {name} rendered invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"template {name} must render a YAML mapping")


def render_meta_data(ctx: NodeContext) -> str:
    """NoCloud meta-data: the instance id (cloud-init's run-once key) and the hostname."""
    data = {"instance-id": ctx.instance_id, "local-hostname": ctx.hostname}
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


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
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
