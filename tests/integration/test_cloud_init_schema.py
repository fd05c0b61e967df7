"""The rendered NoCloud files checked by the real cloud-init (Debian's 22.4).

user-data goes through `cloud-init schema`, network-config through cloud-init's
own netplan-v2 parser (`cloud-init devel net-convert`, which 22.4 has in place of
a network schema), and the phone-home runcmd is run with the real sh and curl
against a local HTTP server.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.context import NodeContext
from cloudconfig.render import render_network_config, render_user_data

pytestmark = pytest.mark.integration

CLOUD_INIT = Path("/usr/bin/cloud-init")

SMALL = NodeContext(
    cluster="alpha",
    node="m1",
    role="master",
    hostname="m1",
    instance_id="alpha-m1-0001",
    mac="52:54:00:12:34:56",
    address="10.42.0.11/24",
    gateway="10.42.0.1",
    mtu=1450,
    kubernetes_version="1.31.2",
    ssh_authorized_keys=(),
    phone_home_url="http://10.42.0.1:8472/v1/phone-home/alpha/m1",
    phone_home_token="00ff",
)
# Everything at its awkward end: many keys with YAML syntax in them, a 10 kB key,
# a big MTU, an https URL with a query.
LARGE = dataclasses.replace(
    SMALL,
    cluster="c" * 63,
    node="w-0",
    hostname="w-0",
    instance_id="x" * 63 + "-0123456789abcdef",
    mac="52:54:00:ab:cd:ef",
    address="172.16.200.254/16",
    gateway="172.16.0.1",
    mtu=9000,
    kubernetes_version='1.31.2 "quoted" {{ x }} &a *b !!python/object: #',
    ssh_authorized_keys=(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI alice@example",
        'ssh-rsa AAAAB3Nza command="echo {{ hi }}: #x" &anchor *alias',
        "ssh-ed25519 " + "A" * 10_240,
    ),
    phone_home_url="https://agent.example:8472/v1/phone-home/c/w-0?attempt=1",
    phone_home_token="0123456789abcdef" * 4,
)
SPECS = {"small": SMALL, "large": LARGE}


def require(tool: str) -> str:
    """The tool's path; skip when it is missing, but fail in CI, where it must be."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is required in CI")
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture
def cloud_init() -> str:
    if not CLOUD_INIT.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CLOUD_INIT} is required in CI (apt-get install cloud-init)")
        pytest.skip(f"{CLOUD_INIT} is not installed")
    return str(CLOUD_INIT)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("role", ["master", "worker"])
def test_user_data_passes_cloud_init_schema(
    cloud_init: str, tmp_path: Path, role: str, spec: str
) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text(render_user_data(dataclasses.replace(SPECS[spec], role=role)))
    result = run(cloud_init, "schema", "--config-file", str(user_data))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Valid cloud-config" in output


@pytest.mark.parametrize("spec", SPECS)
def test_network_config_is_understood_by_cloud_init(
    cloud_init: str, tmp_path: Path, spec: str
) -> None:
    ctx = SPECS[spec]
    network_config = tmp_path / "network-config"
    network_config.write_text(render_network_config(ctx))
    assert yaml.safe_load(network_config.read_text())["ethernets"]["eth0"]["mtu"] == ctx.mtu
    out = tmp_path / "out"
    result = run(
        cloud_init, "devel", "net-convert", "--network-data", str(network_config),
        "--kind", "yaml", "--directory", str(out), "--distro", "debian",
        "--output-kind", "networkd",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    unit = (out / "etc/systemd/network/10-cloud-init-eth0.network").read_text()
    for line in (
        f"MACAddress={ctx.mac}",
        f"Address={ctx.address}",
        f"Gateway={ctx.gateway}",
        f"MTUBytes={ctx.mtu}",
        "DHCP=no",
    ):
        assert line in unit.splitlines(), unit


class _PhoneHome(http.server.BaseHTTPRequestHandler):
    """A stand-in for the agent's phone-home endpoint: records what it receives."""

    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.received.append(
            {"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def phone_home_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Handler", (_PhoneHome,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/phone-home/alpha/m1", received
    finally:
        server.shutdown()
        server.server_close()


def test_phone_home_runcmd_posts_json(
    tmp_path: Path, phone_home_server: tuple[str, list[dict[str, Any]]]
) -> None:
    for tool in ("sh", "curl", "ip", "awk", "hostname"):
        require(tool)
    url, received = phone_home_server
    ctx = dataclasses.replace(SMALL, phone_home_url=url, phone_home_token="c0ffee")
    data = yaml.safe_load(render_user_data(ctx))
    env = next(f for f in data["write_files"] if f["path"] == "/etc/hostagent/phone-home.env")
    env_file = tmp_path / "phone-home.env"
    env_file.write_text(env["content"])
    script = data["runcmd"][-1][2].replace("/etc/hostagent/phone-home.env", str(env_file))

    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    [request] = received
    assert request["path"] == "/v1/phone-home/alpha/m1"
    assert request["headers"]["Authorization"] == "Bearer c0ffee"
    assert request["headers"]["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert body["hostname"] == run("hostname").stdout.strip()
    assert isinstance(body["addresses"], list)
    assert all("/" in address for address in body["addresses"])


@pytest.mark.parametrize("role", ["master", "worker"])
def test_shell_commands_parse(role: str) -> None:
    sh = require("sh")
    data = yaml.safe_load(render_user_data(dataclasses.replace(LARGE, role=role)))
    for command in data["bootcmd"] + data["runcmd"]:
        if isinstance(command, list) and command[:2] == ["sh", "-c"]:
            result = run(sh, "-n", "-c", command[2])
            assert result.returncode == 0, f"{command[2]}\n{result.stderr}"
