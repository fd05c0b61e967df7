"""Pure rendering of a node's NoCloud files: user-data, meta-data and network-config.

The only module that imports jinja2. user-data comes from the Jinja2 templates in
templates/base/ (one per role, both extending common.yaml.j2); meta-data and
network-config are plain data, so they are dumped with PyYAML and never templated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import NoReturn

import jinja2
import yaml
from yaml.representer import SafeRepresenter

from cloudconfig.context import NodeContext
from pki.layout import GUEST_MOUNT, MOUNT_TAG

SHIPPED_TEMPLATES = Path(__file__).parent / "templates" / "base"
ROLES = ("master", "worker")
DEFAULT_ROUTE = "0.0.0.0/0"  # see render_network_config
# Read-only: the guest must not be able to change its own certificates.
PKI_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,ro"

# The guest sources phone-home.env with sh and a lab guest greps it line by line,
# so both values are written unquoted: only characters that are inert in a YAML
# block scalar and in a shell assignment are allowed (no whitespace, quotes, $, `,
# &, ;, (, ), ~, backslash).
_TOKEN = re.compile(r"[0-9a-f]+")
_URL = re.compile(
    r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:/[A-Za-z0-9._/%=?+,@:-]*)?"
)
_ENV_LINE = re.compile(r"[A-Za-z0-9._/%=?+,@:\[\]-]+")


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


def env_line(value: object) -> str:
    """The `env_line` filter: a value written unquoted in a block scalar, so checked instead."""
    if not isinstance(value, str):
        _undefined(value)
    if not _ENV_LINE.fullmatch(value):
        raise ValueError(f"{value[:80]!r} cannot be written unquoted into an env file")
    return value


def to_json(value: object) -> str:
    """The `json` filter: the content of a JSON file (the result still goes through `yaml`)."""
    return json.dumps(value, indent=2, sort_keys=True, default=_undefined) + "\n"


@functools.lru_cache(maxsize=8)
def _environment(template_dir: Path | None) -> jinja2.Environment:
    # Cached: compiling the templates is most of a render's cost. Jinja's loaders check
    # the files' mtimes (auto_reload), so an edited override template is still picked up.
    # The override dir comes first, file by file: an operator can replace one
    # template (say worker.yaml.j2) and keep the shipped common.yaml.j2.
    dirs = [SHIPPED_TEMPLATES] if template_dir is None else [template_dir, SHIPPED_TEMPLATES]
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(d) for d in dirs]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(yaml=to_yaml, env_line=env_line, json=to_json)
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


def render_user_data(ctx: NodeContext, template_dir: Path | None = None) -> str:
    """The node's #cloud-config, from `<role>.yaml.j2`; ValueError on bad input or template."""
    if ctx.role not in ROLES:
        raise ValueError(f"role {ctx.role!r} must be one of {', '.join(ROLES)}")
    check_phone_home(ctx.phone_home_url, ctx.phone_home_token)
    name = f"{ctx.role}.yaml.j2"
    try:
        text = _environment(template_dir).get_template(name).render(**_template_vars(ctx))
    except jinja2.TemplateError as exc:  # e.g. an undefined name in an override template
        raise ValueError(f"template {name}: {type(exc).__name__}: {exc}") from exc
    _check_cloud_config(name, text)
    return text


def _template_vars(ctx: NodeContext) -> dict[str, object]:
    """What a template may use: the context's fields and the certificate share."""
    return {
        **dataclasses.asdict(ctx),
        "pki_mount_tag": MOUNT_TAG,
        "pki_guest_mount": GUEST_MOUNT,
        "pki_mount_options": PKI_MOUNT_OPTIONS,
    }


def _check_cloud_config(name: str, text: str) -> None:
    # cloud-init ignores user-data it cannot parse and the guest then boots without
    # it; better to refuse here, where the message reaches a person.
    if not text.startswith("#cloud-config\n"):
        raise ValueError(f"template {name} must render a first line '#cloud-config'")
    try:
        data = yaml.safe_load(text)
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
