"""The rendered NoCloud files checked by the real cloud-init (Debian's 22.4).

user-data of every role, every supported Kubernetes minor and a few cluster shapes
goes through `cloud-init schema`, and every Kubernetes file it embeds is parsed for
its apiVersion and kind; network-config goes through cloud-init's own netplan-v2
parser (`cloud-init devel net-convert`, which 22.4 has in place of a network schema);
the phone-home runcmd is run with the real sh, python3 and curl against a local HTTP
server.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.context import Extensions, ExtraFile, ExtraUnit, MasterPeer, NodeContext
from cloudconfig.render import render_network_config, render_user_data
from cloudconfig.versions import supported_minors
from tests.conftest import require as ci_require

pytestmark = pytest.mark.integration

CLOUD_INIT = Path("/usr/bin/cloud-init")
ETCD_DISK = "/dev/disk/by-id/virtio-etcd"

ONE_MASTER = NodeContext(
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
    masters=(MasterPeer("m1", "10.42.0.11"),),
    etcd_disk=ETCD_DISK,
)
THREE_MASTERS = dataclasses.replace(
    ONE_MASTER,
    masters=(
        MasterPeer("m0", "10.42.0.10"),
        MasterPeer("m1", "10.42.0.11"),
        MasterPeer("m2", "10.42.0.12"),
    ),
    api_endpoint="api.alpha.example:443",
    pod_cidr="172.20.0.0/16",
    service_cidr="10.100.0.0/16",
    cluster_domain="alpha.internal",
)
# Operator additions with YAML and Jinja syntax in every value.
WITH_EXTENSIONS = dataclasses.replace(
    ONE_MASTER,
    extensions=Extensions(
        files=(
            ExtraFile("/etc/motd", 'Welcome "{{ user }}" &a *b\n- x\nkey: value # c\n'),
            ExtraFile("/opt/site/run.sh", "#!/bin/sh\nexec true\n", "0755"),
            ExtraFile("/etc/site/big.txt", "x" * 10_240),
        ),
        units=(
            ExtraUnit("site-agent.service", "[Service]\nExecStart=/bin/true\n"),
            ExtraUnit("site-report.timer", "[Timer]\nOnBootSec=1h\n", enable=False),
        ),
        commands=("echo 'one: two' > /tmp/x", "{{ not jinja }} || true"),
    ),
)
# Everything at its awkward end: many keys with YAML syntax in them, a 10 kB key,
# a big MTU, an https URL with a query.
SSH_KEYS = dataclasses.replace(
    ONE_MASTER,
    cluster="c" * 63,
    node="w-0",
    hostname="w-0",
    instance_id="x" * 63 + "-0123456789abcdef",
    mac="52:54:00:ab:cd:ef",
    address="172.16.200.254/16",
    gateway="172.16.0.1",
    mtu=9000,
    ssh_authorized_keys=(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI alice@example",
        'ssh-rsa AAAAB3Nza command="echo {{ hi }}: #x" &anchor *alias',
        "ssh-ed25519 " + "A" * 10_240,
    ),
    phone_home_url="https://agent.example:8472/v1/phone-home/c/w-0?attempt=1",
    phone_home_token="0123456789abcdef" * 4,
    masters=(MasterPeer("w-0", "172.16.200.254"),),
)
# A lab master: etcd as a systemd unit, keepalived for the cluster's VIP.
SYSTEMD_VIP = dataclasses.replace(
    THREE_MASTERS, api_endpoint="", etcd_mode="systemd", vip="10.42.0.5", vni=4242
)
NOT_YAML = {"/etc/keepalived/keepalived.conf"}
ETCD_MANIFEST = "/etc/kubernetes/manifests/etcd.yaml"
SPECS = {
    "one-master": ONE_MASTER,
    "systemd-vip": SYSTEMD_VIP,
    "three-masters": THREE_MASTERS,
    "extensions": WITH_EXTENSIONS,
    "ssh-keys": SSH_KEYS,
}
MINORS = supported_minors()


def node(spec: str, role: str, minor: str) -> NodeContext:
    """The spec as a node of `role` on Kubernetes `minor` (workers have no etcd disk)."""
    ctx = dataclasses.replace(SPECS[spec], role=role, kubernetes_version=f"{minor}.3")
    if role == "worker":
        ctx = dataclasses.replace(ctx, etcd_disk=None)
    return ctx


def require(tool: str) -> str:
    """The tool's path; skip when it is missing, but fail in CI, where it must be."""
    path = shutil.which(tool)
    ci_require(path is not None, f"{tool} is not installed")
    assert path is not None
    return path


@pytest.fixture
def cloud_init() -> str:
    ci_require(CLOUD_INIT.exists(), f"{CLOUD_INIT} is not installed (apt-get install cloud-init)")
    return str(CLOUD_INIT)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("role", ["master", "worker"])
@pytest.mark.parametrize("minor", MINORS)
def test_user_data_passes_cloud_init_schema(
    cloud_init: str, tmp_path: Path, minor: str, role: str, spec: str
) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text(render_user_data(node(spec, role, minor)))
    result = run(cloud_init, "schema", "--config-file", str(user_data))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Valid cloud-config" in output


# What each Kubernetes file of write_files must hold: (apiVersion, kind) of every document.
KUBELET = ("kubelet.config.k8s.io/v1beta1", "KubeletConfiguration")
KUBECONFIG = ("v1", "Config")
POD = ("v1", "Pod")
KUBE_FILES = {
    "/var/lib/kubelet/config.yaml": {KUBELET},
    "/etc/kubernetes/kubelet.conf": {KUBECONFIG},
    "/var/lib/kube-proxy/config.yaml": {
        ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
    },
    "/var/lib/kube-proxy/kubeconfig.conf": {KUBECONFIG},
    "/etc/kubernetes/manifests/kube-proxy.yaml": {POD},
}
MASTER_FILES = {
    "/etc/kubernetes/manifests/etcd.yaml": {POD},
    "/etc/kubernetes/manifests/kube-apiserver.yaml": {POD},
    "/etc/kubernetes/manifests/kube-controller-manager.yaml": {POD},
    "/etc/kubernetes/manifests/kube-scheduler.yaml": {POD},
    "/etc/kubernetes/admin.conf": {KUBECONFIG},
    "/etc/kubernetes/controller-manager.conf": {KUBECONFIG},
    "/etc/kubernetes/scheduler.conf": {KUBECONFIG},
    "/etc/kubernetes/addons/coredns.yaml": {
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "ClusterRole"),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
        ("v1", "ConfigMap"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
    },
}
CALICO_KINDS = {
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("v1", "ConfigMap"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
    ("crd.projectcalico.org/v1", "IPPool"),
    ("crd.projectcalico.org/v1", "BGPConfiguration"),
    ("crd.projectcalico.org/v1", "FelixConfiguration"),
}


def kinds(content: str) -> set[tuple[str, str]]:
    documents = [doc for doc in yaml.safe_load_all(content) if doc is not None]
    assert documents
    for doc in documents:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), doc
    return {(doc["apiVersion"], doc["kind"]) for doc in documents}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("role", ["master", "worker"])
@pytest.mark.parametrize("minor", MINORS)
def test_embedded_kubernetes_files_parse(minor: str, role: str, spec: str) -> None:
    ctx = node(spec, role, minor)
    data = yaml.safe_load(render_user_data(ctx))
    files = {f["path"]: f["content"] for f in data["write_files"]}
    # etcd_mode "systemd": a unit instead of etcd's manifest
    pod = ctx.etcd_mode == "static-pod"
    masters = {p: k for p, k in MASTER_FILES.items() if pod or p != ETCD_MANIFEST}
    expected = KUBE_FILES | (masters if role == "master" else {})
    for path, wanted in expected.items():
        assert kinds(files[path]) == wanted, path
    if role == "master":
        assert kinds(files["/etc/kubernetes/addons/calico.yaml"]) == CALICO_KINDS
    else:
        assert not {*MASTER_FILES, "/etc/kubernetes/addons/calico.yaml"} & set(files)
    # Any other YAML file a template adds must parse as well (keepalived's is not YAML).
    for path, content in files.items():
        if path.endswith((".yaml", ".conf")) and path not in {*expected, *NOT_YAML}:
            yaml.safe_load_all(content)


@pytest.mark.parametrize("spec", ["one-master", "ssh-keys"])
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


def local_mode(path: str) -> str | None:
    try:
        return f"{stat.S_IMODE(os.stat(path).st_mode):04o}"
    except OSError:
        return None


@pytest.mark.parametrize("role", ["master", "worker"])
def test_phone_home_runcmd_posts_json(
    tmp_path: Path, phone_home_server: tuple[str, list[dict[str, Any]]], role: str
) -> None:
    for tool in ("sh", "curl", "ip", "hostname", "python3"):
        require(tool)
    url, received = phone_home_server
    ctx = dataclasses.replace(
        node("extensions", role, MINORS[-1]), phone_home_url=url, phone_home_token="c0ffee"
    )
    data = yaml.safe_load(render_user_data(ctx))
    env = next(f for f in data["write_files"] if f["path"] == "/etc/hostagent/phone-home.env")
    env_file = tmp_path / "phone-home.env"
    env_file.write_text(env["content"])
    sh, flag, script, *args = data["runcmd"][-1]
    script = script.replace("/etc/hostagent/phone-home.env", str(env_file))

    result = subprocess.run(
        [sh, flag, script, *args], capture_output=True, text=True, timeout=60, check=False
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
    paths = [f["path"] for f in data["write_files"]]
    # Every path is reported, with its mode here (most do not exist on this machine).
    assert body["files"] == {path: local_mode(path) for path in paths}
    mounts = {"/etc/kubernetes/pki": os.path.ismount("/etc/kubernetes/pki")}
    if role == "master":
        mounts["/var/lib/etcd"] = os.path.ismount("/var/lib/etcd")
    assert body["mounts"] == mounts
    assert isinstance(body["commands_ran"], bool)
    assert (body["role"], body["kubernetes_version"]) == (role, f"{MINORS[-1]}.3")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("role", ["master", "worker"])
def test_shell_commands_parse(role: str, spec: str) -> None:
    sh = require("sh")
    data = yaml.safe_load(render_user_data(node(spec, role, MINORS[-1])))
    for command in data["bootcmd"] + data["runcmd"]:
        if isinstance(command, list) and command[:2] == ["sh", "-c"]:
            result = run(sh, "-n", "-c", command[2])
            assert result.returncode == 0, f"{command[2]}\n{result.stderr}"
            if len(command) > 4 and command[4].startswith('"""'):  # the phone-home program
                compile(command[4], "phone-home", "exec")
