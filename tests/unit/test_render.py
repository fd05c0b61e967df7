"""cloudconfig.render: pure functions, checked by parsing what they produce."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from cloudconfig.configdrive import config_drive_files
from cloudconfig.context import NodeContext
from cloudconfig.render import (
    render_meta_data,
    render_network_config,
    render_user_data,
    to_yaml,
)
from pki.layout import GUEST_MOUNT, MOUNT_TAG

URL = "http://10.42.0.1:8472/v1/phone-home/alpha/m1"
TOKEN = "0123456789abcdef" * 4


def context(role: str = "master", **changes: object) -> NodeContext:
    ctx = NodeContext(
        cluster="alpha",
        node="m1",
        role=role,
        hostname="alpha-m1",
        instance_id="alpha-m1-1a2b3c",
        mac="52:54:00:12:34:56",
        address="10.42.0.11/24",
        gateway="10.42.0.1",
        mtu=1450,
        kubernetes_version="1.31.2",
        ssh_authorized_keys=("ssh-ed25519 AAAAC3Nza alice@example",),
        phone_home_url=URL,
        phone_home_token=TOKEN,
    )
    return dataclasses.replace(ctx, **changes)  # type: ignore[arg-type]


def user_data(ctx: NodeContext, template_dir: Path | None = None) -> dict[str, object]:
    text = render_user_data(ctx, template_dir)
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def files_by_path(data: dict[str, object]) -> dict[str, dict[str, str]]:
    files = data["write_files"]
    assert isinstance(files, list)
    return {f["path"]: f for f in files}


@pytest.mark.parametrize("role", ["master", "worker"])
def test_user_data_structure(role: str) -> None:
    data = user_data(context(role))
    assert data["hostname"] == "alpha-m1"
    assert data["preserve_hostname"] is False
    assert data["ssh_authorized_keys"] == ["ssh-ed25519 AAAAC3Nza alice@example"]
    assert data["mounts"] == [
        [MOUNT_TAG, GUEST_MOUNT, "9p", "trans=virtio,version=9p2000.L,ro", "0", "0"]
    ]
    files = files_by_path(data)
    node = files["/etc/hostagent/node.json"]
    assert node["permissions"] == "0644"
    assert json.loads(node["content"]) == {
        "cluster": "alpha",
        "node": "m1",
        "role": role,
        "kubernetes_version": "1.31.2",
    }
    assert files["/etc/hostagent/role"]["content"] == f"{role}\n"
    env = files["/etc/hostagent/phone-home.env"]
    assert env["permissions"] == "0600"
    assert env["content"] == f"PHONE_HOME_URL={URL}\nPHONE_HOME_TOKEN={TOKEN}\n"


def test_phone_home_lines_are_literal_in_user_data() -> None:
    # A lab guest without cloud-init greps these exact lines out of the raw text.
    lines = [line.strip() for line in render_user_data(context()).splitlines()]
    assert f"PHONE_HOME_URL={URL}" in lines
    assert f"PHONE_HOME_TOKEN={TOKEN}" in lines


def test_phone_home_lines_come_before_any_user_value() -> None:
    # The lab guest takes the first line containing PHONE_HOME_URL=: a key that
    # carries one must not be able to redirect the guest's token.
    evil = "ssh-rsa AAAA PHONE_HOME_URL=http://evil/ PHONE_HOME_TOKEN=0"
    text = render_user_data(context(ssh_authorized_keys=(evil,), kubernetes_version=evil))
    for name, value in (("PHONE_HOME_URL", URL), ("PHONE_HOME_TOKEN", TOKEN)):
        first = next(line for line in text.splitlines() if f"{name}=" in line)
        assert first.strip() == f"{name}={value}"


def test_runcmd_phones_home_last() -> None:
    runcmd = user_data(context())["runcmd"]
    assert isinstance(runcmd, list)
    sh, flag, script = runcmd[-1]
    assert (sh, flag) == ("sh", "-c")
    assert ". /etc/hostagent/phone-home.env" in script
    assert "--retry-all-errors" in script
    assert '"Authorization: Bearer $PHONE_HOME_TOKEN"' in script
    assert script.rstrip().endswith('"$PHONE_HOME_URL"')


def test_bootcmd_mounts_pki_share_with_values_as_arguments() -> None:
    bootcmd = user_data(context())["bootcmd"]
    assert isinstance(bootcmd, list)
    assert bootcmd[0][:2] == ["sh", "-c"]
    assert bootcmd[0][3:] == ["sh", GUEST_MOUNT, MOUNT_TAG, "trans=virtio,version=9p2000.L,ro"]


def test_no_ssh_keys_omits_the_key() -> None:
    # cloud-init's schema refuses ssh_authorized_keys: [].
    assert "ssh_authorized_keys" not in user_data(context(ssh_authorized_keys=()))


def test_master_and_worker_differ_only_in_role() -> None:
    master, worker = user_data(context("master")), user_data(context("worker"))
    for data in (master, worker):
        files = files_by_path(data)
        files["/etc/hostagent/role"]["content"] = ""
        files["/etc/hostagent/node.json"]["content"] = ""
    assert master == worker


HOSTILE = [
    "ssh-rsa AAAA \"double\" 'single' comment",
    "{{ phone_home_token }} {% raw %} {# c #}",
    "&anchor value",
    "*alias",
    "!!python/object:os.system ['true']",
    "key: value # not a comment",
    "- not a list",
    "? not a key",
    "| not a block",
    "@ ` % reserved",
    "ünïcødé ✓ 鍵 😀 \u2028 \x85 \ufeff",
    "trailing space ",
    " leading space",
    "",
    "null",
    "yes",
    "0x1F",
    "...",
    "---",
    "\\back\\slash",
    "x" * 10_240,
]


def test_hostile_values_round_trip_exactly() -> None:
    ctx = context(ssh_authorized_keys=tuple(HOSTILE), kubernetes_version=HOSTILE[4])
    data = user_data(ctx)
    assert data["ssh_authorized_keys"] == HOSTILE
    node = json.loads(files_by_path(data)["/etc/hostagent/node.json"]["content"])
    assert node["kubernetes_version"] == HOSTILE[4]


@pytest.mark.parametrize("value", [*HOSTILE, "two\nlines", "a\r\nb", "nul\x00", 0, True, None, 1.5])
def test_yaml_filter_is_one_line_and_exact(value: object) -> None:
    text = to_yaml(value)
    assert "\n" not in text
    assert yaml.safe_load(f"key: {text}\n") == {"key": value}


def test_yaml_filter_refuses_what_yaml_cannot_hold() -> None:
    with pytest.raises(ValueError, match="object"):
        to_yaml(object())


def test_yaml_filter_handles_tuples_and_mappings() -> None:
    value = {"a": ("x: y", "#z"), "b": 3}
    assert yaml.safe_load(to_yaml(value)) == {"a": ["x: y", "#z"], "b": 3}


@pytest.mark.parametrize(
    "token", ["", "DEADBEEF", "dead beef", "deadbeef\n", "g00d", "abc'", "$(reboot)"]
)
def test_bad_token_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="phone_home_token"):
        render_user_data(context(phone_home_token=token))


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://host/a b",
        "http://host/\tx",
        "http://host/x\n",
        'http://host/"x',
        "http://host/'x",
        "http://host/$(reboot)",
        "http://host/`id`",
        "http://host/?a=1&b=2",
        "http://host/;id",
        "ftp://host/x",
        "host/x",
    ],
)
def test_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="phone_home_url"):
        render_user_data(context(phone_home_url=url))


@pytest.mark.parametrize(
    "url", ["https://agent.example:8472/v1/phone-home/a/b", "http://[fd00::1]:80/p?x=1"]
)
def test_good_urls_are_accepted(url: str) -> None:
    assert f"PHONE_HOME_URL={url}\n" in render_user_data(context(phone_home_url=url))


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        render_user_data(context(role="etcd"))


def test_strict_undefined_raises(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml.j2").write_text("#cloud-config\nx: {{ no_such_name | yaml }}\n")
    with pytest.raises(ValueError, match="no_such_name") as caught:
        render_user_data(context("worker"), tmp_path)
    assert type(caught.value.__cause__).__name__ == "UndefinedError"


def test_override_dir_replaces_one_file(tmp_path: Path) -> None:
    # worker.yaml.j2 is replaced; master.yaml.j2 and common.yaml.j2 stay shipped.
    (tmp_path / "worker.yaml.j2").write_text(
        '{% extends "common.yaml.j2" %}\n'
        "{% block role_files %}\n"
        "  - path: /etc/custom\n"
        "    content: {{ cluster | yaml }}\n"
        "{% endblock %}\n"
    )
    worker = files_by_path(user_data(context("worker"), tmp_path))
    assert worker["/etc/custom"]["content"] == "alpha"
    assert "/etc/hostagent/role" not in worker
    assert "/etc/hostagent/phone-home.env" in worker
    master = files_by_path(user_data(context("master"), tmp_path))
    assert master["/etc/hostagent/role"]["content"] == "master\n"


def test_override_that_breaks_yaml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml.j2").write_text("#cloud-config\na: [unclosed\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        render_user_data(context("worker"), tmp_path)


def test_meta_data() -> None:
    assert yaml.safe_load(render_meta_data(context())) == {
        "instance-id": "alpha-m1-1a2b3c",
        "local-hostname": "alpha-m1",
    }


def test_network_config_shape_is_exact() -> None:
    # The lab guest parses this line by line (quotes stripped): the layout is a contract.
    expected = """\
version: 2
ethernets:
  eth0:
    match:
      macaddress: 52:54:00:12:34:56
    set-name: eth0
    addresses:
    - 10.42.0.11/24
    routes:
    - to: 0.0.0.0/0
      via: 10.42.0.1
    mtu: 1450
"""
    assert render_network_config(context()).replace("'", "") == expected


def test_network_config_parses() -> None:
    data = yaml.safe_load(render_network_config(context(mtu=9000)))
    eth0 = data["ethernets"]["eth0"]
    assert eth0["match"] == {"macaddress": "52:54:00:12:34:56"}
    assert eth0["mtu"] == 9000


def test_config_drive_files() -> None:
    ctx = context()
    assert config_drive_files(ctx) == {
        "meta-data": render_meta_data(ctx).encode(),
        "network-config": render_network_config(ctx).encode(),
        "user-data": render_user_data(ctx).encode(),
    }


@pytest.mark.parametrize(
    "expression",
    [
        "{{ no_such_name | yaml }}",
        "{{ [no_such_name] | yaml }}",
        "{{ {'a': no_such_name} | json | yaml }}",
        "{{ no_such_name | env_line }}",
        "{{ no_such_name }}",
    ],
)
def test_strict_undefined_raises_through_every_filter(tmp_path: Path, expression: str) -> None:
    (tmp_path / "worker.yaml.j2").write_text(f"#cloud-config\nx: {expression}\n")
    with pytest.raises(ValueError, match="no_such_name") as caught:
        render_user_data(context("worker"), tmp_path)
    assert type(caught.value.__cause__).__name__ == "UndefinedError"
