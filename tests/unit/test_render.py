"""cloudconfig.render and cloudconfig.versions: pure functions, checked by parsing what they
produce."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudconfig import phone_home_report
from cloudconfig.addons.calico import calico_manifests
from cloudconfig.configdrive import config_drive_files
from cloudconfig.context import (
    Extensions,
    ExtraFile,
    ExtraUnit,
    MasterPeer,
    NodeContext,
    check_command,
)
from cloudconfig.render import (
    check_context,
    derive,
    render_meta_data,
    render_network_config,
    render_node,
    render_user_data,
    to_yaml,
)
from cloudconfig.userdata import PHONE_HOME_PROGRAM, RUNCMD_MARKER
from cloudconfig.versions import (
    TEMPLATES,
    UnsupportedVersion,
    supported_minors,
    template_folder,
)
from pki import layout
from pki.layout import GUEST_MOUNT, MOUNT_TAG

URL = "http://10.42.0.1:8472/v1/phone-home/alpha/m1"
TOKEN = "0123456789abcdef" * 4
ETCD_DISK = "/dev/disk/by-id/virtio-etcd"
PKI_MOUNT = [MOUNT_TAG, GUEST_MOUNT, "9p", "trans=virtio,version=9p2000.L,ro", "0", "0"]


ENV = f"PHONE_HOME_URL={URL}\nPHONE_HOME_TOKEN={TOKEN}\nPHONE_HOME_HEALTH_INTERVAL_S=30\n"


def context(role: str = "master", **changes: Any) -> NodeContext:
    ctx = NodeContext(
        cluster="alpha",
        node="m1",
        role=role,
        hostname="m1",
        instance_id="alpha-m1-1a2b3c",
        mac="52:54:00:12:34:56",
        address="10.42.0.11/24",
        gateway="10.42.0.1",
        mtu=1450,
        kubernetes_version="1.31.2",
        ssh_authorized_keys=("ssh-ed25519 AAAAC3Nza alice@example",),
        phone_home_url=URL,
        phone_home_token=TOKEN,
        masters=(MasterPeer("m1", "10.42.0.11"),),
        etcd_disk=ETCD_DISK if role == "master" else None,
    )
    return dataclasses.replace(ctx, **changes)


def user_data(ctx: NodeContext, template_dir: Path | None = None) -> dict[str, Any]:
    text = render_user_data(ctx, template_dir)
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def files_by_path(data: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {f["path"]: f for f in data["write_files"]}


def phone_home_args(data: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The last runcmd entry: (shell script, python program, expectation)."""
    sh, flag, script, argv0, program, expected = data["runcmd"][-1]
    assert (sh, flag, argv0) == ("sh", "-c", "sh")
    return script, program, json.loads(expected)


# --- the document -------------------------------------------------------------------


@pytest.mark.parametrize("role", ["master", "worker"])
def test_user_data_structure(role: str) -> None:
    data = user_data(context(role))
    assert data["hostname"] == "m1"
    assert data["preserve_hostname"] is False
    assert data["ssh_authorized_keys"] == ["ssh-ed25519 AAAAC3Nza alice@example"]
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
    env = data["write_files"][0]
    assert env["path"] == "/etc/hostagent/phone-home.env"
    assert env["permissions"] == "0600"
    assert env["content"] == ENV


def test_master_formats_etcd_disk_once_and_mounts_it() -> None:
    data = user_data(context("master"))
    # partition "auto" + label reuses an existing etcd file system; "none" would format
    # on every new instance id, i.e. lose etcd's data whenever the root disk changes.
    assert data["fs_setup"] == [
        {
            "label": "etcd",
            "filesystem": "ext4",
            "device": ETCD_DISK,
            "partition": "auto",
            "overwrite": False,
        }
    ]
    assert data["mounts"] == [
        PKI_MOUNT,
        [ETCD_DISK, "/var/lib/etcd", "ext4", "defaults,nofail", "0", "2"],
    ]


def test_master_without_etcd_disk_keeps_etcd_on_root_disk() -> None:
    data = user_data(context("master", etcd_disk=None))
    assert "fs_setup" not in data
    assert data["mounts"] == [PKI_MOUNT]
    pod = yaml_file(data, "/etc/kubernetes/manifests/etcd.yaml")
    assert pod["spec"]["volumes"][0]["hostPath"]["type"] == "DirectoryOrCreate"
    _script, _program, expected = phone_home_args(data)
    assert expected["mounts"] == [GUEST_MOUNT]


def test_worker_mounts_only_the_certificates() -> None:
    data = user_data(context("worker"))
    assert "fs_setup" not in data
    assert data["mounts"] == [PKI_MOUNT]


MASTER_ONLY = {
    "/etc/kubernetes/manifests/etcd.yaml",
    "/etc/kubernetes/manifests/kube-apiserver.yaml",
    "/etc/kubernetes/manifests/kube-controller-manager.yaml",
    "/etc/kubernetes/manifests/kube-scheduler.yaml",
    "/etc/kubernetes/admin.conf",
    "/etc/kubernetes/controller-manager.conf",
    "/etc/kubernetes/scheduler.conf",
    "/etc/kubernetes/addons/calico.yaml",
    "/etc/kubernetes/addons/coredns.yaml",
    "/etc/systemd/system/k8s-addons.service",
}
EVERY_NODE = {
    "/var/lib/kubelet/config.yaml",
    "/etc/kubernetes/kubelet.conf",
    "/etc/systemd/system/kubelet.service",
    "/var/lib/kube-proxy/config.yaml",
    "/var/lib/kube-proxy/kubeconfig.conf",
    "/etc/kubernetes/manifests/kube-proxy.yaml",
    "/etc/containerd/config.toml",
    "/usr/local/sbin/hostagent-health",
    "/etc/systemd/system/hostagent-health.service",
    "/etc/systemd/system/hostagent-health.timer",
}


@pytest.mark.parametrize("minor", supported_minors())
def test_files_per_role(minor: str) -> None:
    version = f"{minor}.4"
    master = set(files_by_path(user_data(context("master", kubernetes_version=version))))
    worker = set(files_by_path(user_data(context("worker", kubernetes_version=version))))
    assert master >= MASTER_ONLY | EVERY_NODE
    assert worker >= EVERY_NODE
    assert not worker & MASTER_ONLY
    assert master - worker == MASTER_ONLY


def yaml_file(data: dict[str, Any], path: str) -> Any:
    return yaml.safe_load(files_by_path(data)[path]["content"])


def test_etcd_static_pod() -> None:
    masters = (
        MasterPeer("m0", "10.42.0.10"),
        MasterPeer("m1", "10.42.0.11"),
        MasterPeer("m2", "10.42.0.12"),
    )
    pod = yaml_file(user_data(context(masters=masters)), "/etc/kubernetes/manifests/etcd.yaml")
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    [container] = pod["spec"]["containers"]
    assert container["image"] == "registry.k8s.io/etcd:3.5.15-0"
    flags = container["command"][1:]
    assert "--name=m1" in flags
    assert "--data-dir=/var/lib/etcd" in flags
    assert (
        "--initial-cluster=m0=https://10.42.0.10:2380,m1=https://10.42.0.11:2380,"
        "m2=https://10.42.0.12:2380"
    ) in flags
    assert "--listen-peer-urls=https://10.42.0.11:2380" in flags
    assert f"--cert-file={layout.ETCD_SERVER.cert}" in flags
    assert f"--peer-key-file={layout.ETCD_PEER.key}" in flags
    assert "--client-cert-auth=true" in flags and "--peer-client-cert-auth=true" in flags
    # Only the mount point will do: a missing disk must not put etcd on the root disk.
    data_volume = pod["spec"]["volumes"][0]
    assert data_volume == {
        "name": "etcd-data",
        "hostPath": {"path": "/var/lib/etcd", "type": "Directory"},
    }


def test_api_server_static_pod() -> None:
    pod = yaml_file(user_data(context()), "/etc/kubernetes/manifests/kube-apiserver.yaml")
    [container] = pod["spec"]["containers"]
    assert container["image"] == "registry.k8s.io/kube-apiserver:v1.31.2"
    flags = container["command"][1:]
    for flag in (
        "--advertise-address=10.42.0.11",
        "--etcd-servers=https://10.42.0.11:2379",
        "--service-cluster-ip-range=10.96.0.0/12",
        f"--service-account-key-file={GUEST_MOUNT}/sa.pub",
        f"--service-account-signing-key-file={GUEST_MOUNT}/sa.key",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--tls-cert-file={GUEST_MOUNT}/apiserver.crt",
        f"--kubelet-client-certificate={GUEST_MOUNT}/apiserver-kubelet-client.crt",
        f"--etcd-certfile={GUEST_MOUNT}/apiserver-etcd-client.crt",
        f"--proxy-client-cert-file={GUEST_MOUNT}/front-proxy-client.crt",
        f"--requestheader-client-ca-file={GUEST_MOUNT}/front-proxy-ca.crt",
    ):
        assert flag in flags


def test_kubeconfigs_reference_certificate_files() -> None:
    data = user_data(context(api_endpoint="api.alpha.example:443"))
    expected = {
        "/etc/kubernetes/admin.conf": ("https://api.alpha.example:443", layout.ADMIN),
        "/etc/kubernetes/kubelet.conf": ("https://api.alpha.example:443", layout.KUBELET_CLIENT),
        "/etc/kubernetes/controller-manager.conf": (
            "https://10.42.0.11:6443",
            layout.CONTROLLER_MANAGER,
        ),
        "/etc/kubernetes/scheduler.conf": ("https://10.42.0.11:6443", layout.SCHEDULER),
        "/var/lib/kube-proxy/kubeconfig.conf": (
            "https://api.alpha.example:443",
            layout.KUBE_PROXY,
        ),
    }
    for path, (server, cert) in expected.items():
        config = yaml_file(data, path)
        assert (config["apiVersion"], config["kind"]) == ("v1", "Config")
        [cluster] = config["clusters"]
        assert cluster["cluster"] == {"certificate-authority": layout.CA.cert, "server": server}
        [user] = config["users"]
        assert user["user"] == {"client-certificate": cert.cert, "client-key": cert.key}
        assert config["current-context"] == config["contexts"][0]["name"]
        assert files_by_path(data)[path]["permissions"] == "0600"


def test_kubelet_and_kube_proxy_configuration() -> None:
    data = user_data(context("worker", service_cidr="10.100.0.0/16", cluster_domain="k.test"))
    kubelet = yaml_file(data, "/var/lib/kubelet/config.yaml")
    assert (kubelet["apiVersion"], kubelet["kind"]) == (
        "kubelet.config.k8s.io/v1beta1",
        "KubeletConfiguration",
    )
    assert kubelet["clusterDNS"] == ["10.100.0.10"]
    assert kubelet["clusterDomain"] == "k.test"
    assert kubelet["authentication"]["x509"]["clientCAFile"] == layout.CA.cert
    assert kubelet["tlsCertFile"] == layout.KUBELET_SERVING.cert
    assert "registerWithTaints" not in kubelet  # masters only
    proxy = yaml_file(data, "/var/lib/kube-proxy/config.yaml")
    assert proxy["kind"] == "KubeProxyConfiguration"
    assert proxy["clusterCIDR"] == "192.168.0.0/16"
    assert proxy["hostnameOverride"] == "m1"


def test_master_kubelet_registers_tainted() -> None:
    kubelet = yaml_file(user_data(context()), "/var/lib/kubelet/config.yaml")
    assert kubelet["registerWithTaints"] == [
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
    ]


def test_calico_addon_is_the_built_in_data() -> None:
    data = user_data(context(pod_cidr="172.20.0.0/16", mtu=1400))
    docs = list(
        yaml.safe_load_all(files_by_path(data)["/etc/kubernetes/addons/calico.yaml"]["content"])
    )
    assert docs == calico_manifests("172.20.0.0/16", 1400)


@pytest.mark.parametrize("role", ["master", "worker"])
def test_templates_use_only_certificates_the_pki_side_writes(role: str) -> None:
    text = render_user_data(context(role))
    referenced = set(re.findall(re.escape(GUEST_MOUNT) + r"/([A-Za-z0-9/._-]+)", text))
    assert referenced, "the templates reference certificates"
    written = {*layout.files_for(role), layout.ROTATED_FILE}
    assert referenced <= written, referenced - written


@pytest.mark.parametrize("role", ["master", "worker"])
def test_every_write_files_path_is_reported(role: str) -> None:
    ctx = context(role, extensions=EXTENSIONS)
    data = user_data(ctx)
    _script, _program, expected = phone_home_args(data)
    assert expected["files"] == [f["path"] for f in data["write_files"]]
    assert expected["role"] == role
    assert expected["kubernetes_version"] == "1.31.2"
    assert expected["marker"] == RUNCMD_MARKER


def test_units_are_enabled_after_daemon_reload() -> None:
    runcmd = user_data(context())["runcmd"]
    reload = runcmd.index(["systemctl", "daemon-reload"])
    enable = runcmd[reload + 1]
    assert enable == [
        "systemctl",
        "enable",
        "--now",
        "--no-block",
        "kubelet.service",
        "hostagent-cert-reload.timer",
        "hostagent-health.timer",
        "k8s-addons.service",
    ]


@pytest.mark.parametrize("minor", supported_minors())
@pytest.mark.parametrize("role", ["master", "worker"])
def test_every_node_keeps_reporting_its_health(minor: str, role: str) -> None:
    ctx = context(role, kubernetes_version=f"{minor}.4", health_report_interval_s=45)
    data = user_data(ctx)
    files = files_by_path(data)
    timer = files["/etc/systemd/system/hostagent-health.timer"]["content"]
    assert "OnBootSec=45s\nOnUnitActiveSec=45s\n" in timer
    service = files["/etc/systemd/system/hostagent-health.service"]["content"]
    assert "ExecStart=/usr/local/sbin/hostagent-health\n" in service
    script = files["/usr/local/sbin/hostagent-health"]
    assert script["permissions"] == "0755"
    assert ". /etc/hostagent/phone-home.env\n" in script["content"]
    assert '"$PHONE_HOME_URL/health"' in script["content"]
    enabled = next(c for c in data["runcmd"] if c[:3] == ["systemctl", "enable", "--now"])
    assert "hostagent-health.timer" in enabled
    assert "hostagent-health.service" not in enabled  # the timer starts it
    lines = [line.strip() for line in render_user_data(ctx).splitlines()]
    assert "PHONE_HOME_HEALTH_INTERVAL_S=45" in lines  # what a lab guest greps


# The guest's commands, stubbed: curl answers etcd's /health with $ETCD_HEALTH (fails
# when empty) and keeps what it would post to the agent in $POSTED.
FAKE_CURL = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in
    */health) [ "$arg" = https://127.0.0.1:2379/health ] || url=$arg ;;
  esac
done
case "$*" in
  *127.0.0.1:2379/health*) [ -n "$ETCD_HEALTH" ] && echo "$ETCD_HEALTH" && exit 0; exit 7 ;;
esac
while [ $# -gt 0 ]; do
  [ "$1" = --data-binary ] && printf '%s' "$2" > "$POSTED"
  shift
done
echo "$url" >> "$POSTED.url"
"""


def run_health_script(tmp_path: Path, script: str, etcd_health: str) -> dict[str, Any]:
    """The rendered health script run with stub commands: the JSON it posts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("curl", FAKE_CURL), ("systemctl", "#!/bin/sh\necho active\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env_file = tmp_path / "phone-home.env"
    env_file.write_text(
        "PHONE_HOME_URL=http://10.42.0.1:8471/v1/phone-home/alpha/m1\nPHONE_HOME_TOKEN=secret\n"
    )
    runnable = tmp_path / "hostagent-health"
    runnable.write_text(script.replace(". /etc/hostagent/phone-home.env", f". {env_file}"))
    posted = tmp_path / "posted.json"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ETCD_HEALTH": etcd_health, "POSTED": str(posted)}
    subprocess.run(["sh", str(runnable)], env=env, check=True, timeout=30)
    assert (tmp_path / "posted.json.url").read_text().split() == [
        "http://10.42.0.1:8471/v1/phone-home/alpha/m1/health"
    ]
    (tmp_path / "posted.json.url").unlink()
    report: dict[str, Any] = json.loads(posted.read_text())
    return report


@pytest.mark.parametrize("minor", supported_minors())
def test_a_master_with_etcd_as_a_unit_reports_its_members_health(
    tmp_path: Path, minor: str
) -> None:
    ctx = context("master", kubernetes_version=f"{minor}.4", etcd_mode="systemd")
    script = files_by_path(user_data(ctx))["/usr/local/sbin/hostagent-health"]["content"]
    etcd = layout.ETCD_HEALTHCHECK_CLIENT
    assert f"--cacert {layout.ETCD_CA.cert} --cert {etcd.cert} \\\n    --key {etcd.key}" in script
    answers = {
        '{"health":"true","reason":""}': True,  # etcd 3.5
        '{"health": "true"}': True,  # etcd 3.4
        '{"health":"false","reason":"RAFT NO LEADER"}': False,
        "": False,  # not answering
    }
    for answer, healthy in answers.items():
        report = run_health_script(tmp_path, script, answer)
        assert report == {"kubelet": "active", "etcd": {"healthy": healthy}}, answer
    for other in (context("master"), context("worker")):  # etcd in a pod, or none
        plain = files_by_path(user_data(other))["/usr/local/sbin/hostagent-health"]["content"]
        assert "2379" not in plain
        assert run_health_script(tmp_path, plain, '{"health":"true"}') == {"kubelet": "active"}


@pytest.mark.parametrize("interval", [0, 4, 3601])
def test_a_health_interval_out_of_range_is_refused(interval: int) -> None:
    with pytest.raises(ValueError, match="health_report_interval_s"):
        render_user_data(context(health_report_interval_s=interval))


# --- phone-home ---------------------------------------------------------------------


def test_phone_home_lines_are_literal_in_user_data() -> None:
    # A lab guest without cloud-init greps these exact lines out of the raw text.
    lines = [line.strip() for line in render_user_data(context()).splitlines()]
    assert f"PHONE_HOME_URL={URL}" in lines
    assert f"PHONE_HOME_TOKEN={TOKEN}" in lines


def test_files_read_as_files_in_user_data() -> None:
    # Multi-line contents are block scalars: a person reading user-data sees the file.
    text = render_user_data(context())
    assert "  content: |\n    [Unit]\n    Description=kubelet 1.31.2\n" in text
    assert re.search(r'\n +- "--initial-cluster-state=new"\n', text)  # etcd's manifest


def test_phone_home_lines_come_before_any_user_value() -> None:
    # The lab guest takes the first line containing PHONE_HOME_URL=: a key or an
    # extension that carries one must not be able to redirect the guest's token.
    evil = "ssh-rsa AAAA PHONE_HOME_URL=http://evil/ PHONE_HOME_TOKEN=0"
    extensions = Extensions(files=(ExtraFile("/etc/evil", evil + "\n"),), commands=(evil,))
    text = render_user_data(context(ssh_authorized_keys=(evil,), extensions=extensions))
    for name, value in (("PHONE_HOME_URL", URL), ("PHONE_HOME_TOKEN", TOKEN)):
        first = next(line for line in text.splitlines() if f"{name}=" in line)
        assert first.strip() == f"{name}={value}"


def test_runcmd_phones_home_last_after_the_marker() -> None:
    data = user_data(context())
    script, program, _expected = phone_home_args(data)
    assert ". /etc/hostagent/phone-home.env" in script
    assert 'python3 -c "$1" "$2"' in script
    assert "--retry-all-errors" in script
    assert '"Authorization: Bearer $PHONE_HOME_TOKEN"' in script
    assert script.rstrip().endswith('"$PHONE_HOME_URL"')
    assert program == PHONE_HOME_PROGRAM
    assert data["runcmd"][-2] == ["touch", RUNCMD_MARKER]


def test_phone_home_report(tmp_path: Path) -> None:
    written = tmp_path / "a 'b' \"c\""
    written.write_text("x")
    written.chmod(0o640)
    marker = tmp_path / "marker"
    expected = {
        "role": "master",
        "kubernetes_version": "1.31.2",
        "files": [str(written), str(tmp_path / "missing")],
        "mounts": ["/", str(tmp_path)],
        "marker": str(marker),
        "health_interval_s": 30,
    }
    body = phone_home_report.report(expected)
    assert body["files"] == {str(written): "0640", str(tmp_path / "missing"): None}
    assert body["mounts"] == {"/": True, str(tmp_path): False}
    assert body["commands_ran"] is False
    marker.touch()
    assert phone_home_report.report(expected)["commands_ran"] is True
    assert (body["role"], body["kubernetes_version"]) == ("master", "1.31.2")
    assert body["health_interval_s"] == 30  # the agent watches its health reports
    assert isinstance(body["hostname"], str) and isinstance(body["addresses"], list)
    json.dumps(body)


def test_bootcmd_mounts_pki_share_with_values_as_arguments() -> None:
    bootcmd = user_data(context())["bootcmd"]
    assert bootcmd[0][:2] == ["sh", "-c"]
    assert bootcmd[0][3:] == ["sh", GUEST_MOUNT, MOUNT_TAG, "trans=virtio,version=9p2000.L,ro"]


def test_no_ssh_keys_omits_the_key() -> None:
    # cloud-init's schema refuses ssh_authorized_keys: [].
    assert "ssh_authorized_keys" not in user_data(context(ssh_authorized_keys=()))


# --- extensions ----------------------------------------------------------------------

EXTENSIONS = Extensions(
    files=(ExtraFile("/etc/motd", "hello\n"), ExtraFile("/opt/x/run.sh", "#!/bin/sh\n", "0755")),
    units=(
        ExtraUnit("audit.service", "[Service]\nExecStart=/bin/true\n"),
        ExtraUnit("later.timer", "[Timer]\nOnBootSec=1h\n", enable=False),
    ),
    commands=("echo one", "echo two > /tmp/two"),
)


def test_extensions_are_appended() -> None:
    data = user_data(context("worker", extensions=EXTENSIONS))
    paths = [f["path"] for f in data["write_files"]]
    assert paths[-4:] == [
        "/etc/motd",
        "/opt/x/run.sh",
        "/etc/systemd/system/audit.service",
        "/etc/systemd/system/later.timer",
    ]
    files = files_by_path(data)
    assert files["/opt/x/run.sh"] == {
        "path": "/opt/x/run.sh",
        "permissions": "0755",
        "content": "#!/bin/sh\n",
    }
    assert files["/etc/systemd/system/later.timer"]["content"] == "[Timer]\nOnBootSec=1h\n"
    runcmd = data["runcmd"]
    enable = ["systemctl", "enable", "--now", "--no-block", "kubelet.service"]
    timers = ["hostagent-cert-reload.timer", "hostagent-health.timer"]
    assert [*enable, *timers, "audit.service"] in runcmd
    marker = runcmd.index(["touch", RUNCMD_MARKER])
    assert runcmd[marker - 3 : marker - 1] == ["echo one", "echo two > /tmp/two"]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ExtraFile("etc/x", ""), "absolute"),
        (lambda: ExtraFile("/etc/../x", ""), "normalised"),
        (lambda: ExtraFile("/etc//x", ""), "normalised"),
        (lambda: ExtraFile("/etc/x/", ""), "normalised"),
        (lambda: ExtraFile("//etc/x", ""), "normalised"),
        (lambda: ExtraFile("/", ""), "absolute"),
        (lambda: ExtraFile("/etc/x\ny", ""), "control"),
        (lambda: ExtraFile(f"{GUEST_MOUNT}/ca.crt", ""), "read-only"),
        (lambda: ExtraFile("/etc/x", "", "rw"), "octal"),
        (lambda: ExtraFile("/etc/x", "", "0888"), "octal"),
        (lambda: ExtraFile("/etc/x", "x" * (1024 * 1024 + 1)), "over"),
        (lambda: ExtraUnit("../x.service", ""), "unit name"),
        (lambda: ExtraUnit("a b.service", ""), "unit name"),
        (lambda: ExtraUnit("audit", ""), "unit name"),
        (lambda: ExtraUnit("x.service/", ""), "unit name"),
        (lambda: Extensions(commands=("",)), "non-empty"),
        (lambda: Extensions(commands=("   ",)), "non-empty"),
        (lambda: Extensions(commands=("a\x00b",)), "NUL"),
    ],
)
def test_bad_extensions_are_refused(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# --- hostile values -----------------------------------------------------------------

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
MULTILINE = [
    "line one\nline two\n",
    "no final newline\nsecond",
    "two final newlines\n\n",
    "\n\nleading blank lines\n",
    "  indented first line\nx\n",
    "---\n...\n# not a comment\n- not a list\nkey: {{ value }}\n&a *b !!str |\n",
    "trailing space \nnext\n",
    "tab\there\n",
    "cr\r\nlf\n",
    "nel\x85 ls\u2028 ps\u2029 bom\ufeff nul\x00 del\x7f\n",
    "\n",
    "\n\n\n",
    "ünïcødé ✓ 鍵 😀\nsecond\n",
]


def test_hostile_values_round_trip_exactly() -> None:
    ctx = context(ssh_authorized_keys=tuple(HOSTILE))
    data = user_data(ctx)
    assert data["ssh_authorized_keys"] == HOSTILE


HOSTILE_EXTENSIONS = Extensions(
    files=tuple(
        ExtraFile(f"/etc/hostile/{i}-\"q\" 'q' {{{{ x }}}} &a *b #c: d - ünï", content, "0600")
        for i, content in enumerate(HOSTILE + MULTILINE)
    ),
    units=tuple(ExtraUnit(f"h{i}.service", c) for i, c in enumerate(HOSTILE + MULTILINE)),
    commands=tuple(c for c in HOSTILE + MULTILINE if c.strip() and "\x00" not in c),
)


@pytest.mark.parametrize("role", ["master", "worker"])
def test_hostile_extensions_round_trip_exactly(role: str) -> None:
    data = user_data(context(role, extensions=HOSTILE_EXTENSIONS))
    files = files_by_path(data)
    for extra in HOSTILE_EXTENSIONS.files:
        assert files[extra.path] == {
            "path": extra.path,
            "permissions": "0600",
            "content": extra.content,
        }
    for unit in HOSTILE_EXTENSIONS.units:
        assert files[f"/etc/systemd/system/{unit.name}"]["content"] == unit.content
    marker = data["runcmd"].index(["touch", RUNCMD_MARKER])
    commands = HOSTILE_EXTENSIONS.commands
    assert data["runcmd"][marker - 1 - len(commands) : marker - 1] == list(commands)


# Any string, with YAML's and Jinja's syntax and the characters YAML treats specially
# (line breaks of every kind, BOM, NUL, tabs, trailing spaces) drawn more often.
SYNTAX = [*":#{}[]&*!|>'\"%@`-?,.=~ \t\n\r\\", "\x85", "\u2028", "\u2029", "\ufeff", "\x00"]
TEXT = st.text() | st.text(st.sampled_from(SYNTAX) | st.characters(), max_size=40)


@st.composite
def hostile_nodes(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A role, and every user-controlled field drawn (a worker's names too)."""
    fields: dict[str, Any] = {
        "hostname": draw(TEXT),
        "cluster": draw(TEXT),
        "node": draw(TEXT),
        "ssh_authorized_keys": draw(st.lists(TEXT, max_size=3)),
        "files": draw(st.lists(st.tuples(TEXT.map("/".__add__), TEXT, TEXT), max_size=3)),
        "units": draw(st.lists(st.tuples(TEXT.map("a".__add__), TEXT, st.booleans()), max_size=3)),
        "commands": draw(st.lists(TEXT, max_size=3)),
    }
    return draw(st.sampled_from(["master", "worker"])), fields


def accepted(make: Any, values: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """make(*value) for every value it does not refuse (ValueError)."""
    made = []
    for value in values:
        with contextlib.suppress(ValueError):
            made.append(make(*value))
    return tuple(made)


def hostile_context(role: str, fields: dict[str, Any]) -> NodeContext:
    extensions = Extensions(
        files=accepted(
            ExtraFile, fields["files"] + [(p, c, "0640") for p, c, _m in fields["files"]]
        ),
        units=accepted(
            ExtraUnit, fields["units"] + [(n + ".service", c, e) for n, c, e in fields["units"]]
        ),
        commands=accepted(check_command, [(c,) for c in fields["commands"]]),
    )
    names = {} if role == "master" else {k: fields[k] for k in ("hostname", "cluster", "node")}
    return context(
        role,
        ssh_authorized_keys=tuple(fields["ssh_authorized_keys"]),
        extensions=extensions,
        **names,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_nodes())
def test_any_user_value_reads_back_exactly_or_is_refused(node: tuple[str, dict[str, Any]]) -> None:
    role, fields = node
    ctx = hostile_context(role, fields)  # extensions it refuses are left out
    try:
        text = render_user_data(ctx)
    except ValueError:
        return  # refused: names rendering checks (say a unit name used twice)
    data = yaml.safe_load(text)
    assert text.startswith("#cloud-config\n")
    keys = ["write_files", "hostname", "preserve_hostname", "ssh_authorized_keys", "bootcmd"]
    keys += ["fs_setup", "mounts", "runcmd"] if role == "master" else ["mounts", "runcmd"]
    assert list(data) == [k for k in keys if k != "ssh_authorized_keys" or ctx.ssh_authorized_keys]
    assert data["hostname"] == ctx.hostname
    assert data.get("ssh_authorized_keys", []) == list(ctx.ssh_authorized_keys)
    node_json = json.loads(files_by_path(data)["/etc/hostagent/node.json"]["content"])
    assert (node_json["cluster"], node_json["node"]) == (ctx.cluster, ctx.node)
    kubelet = yaml_file(data, "/etc/kubernetes/kubelet.conf")  # a templated YAML file
    assert kubelet["users"][0]["name"] == f"system:node:{ctx.hostname}"
    assert kubelet["clusters"][0]["name"] == ctx.cluster
    extras = [
        {"path": f.path, "permissions": f.permissions, "content": f.content}
        for f in ctx.extensions.files
    ]
    extras += [
        {"path": f"/etc/systemd/system/{u.name}", "permissions": "0644", "content": u.content}
        for u in ctx.extensions.units
    ]
    assert data["write_files"][len(data["write_files"]) - len(extras) :] == extras
    marker = data["runcmd"].index(["touch", RUNCMD_MARKER])
    commands = list(ctx.extensions.commands)
    assert data["runcmd"][marker - 1 - len(commands) : marker - 1] == commands
    _script, program, expected = phone_home_args(data)
    assert program == PHONE_HOME_PROGRAM
    assert expected["files"] == [f["path"] for f in data["write_files"]]
    env = data["write_files"][0]["content"]
    assert env == ENV


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


# --- checks on the context ----------------------------------------------------------


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


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"masters": (MasterPeer("m2", "10.42.0.12"),)}, "must be one of the cluster's masters"),
        ({"masters": (MasterPeer("m1", "10.42.0.99"),)}, "must be one of the cluster's masters"),
        ({"masters": (MasterPeer("m1", "10.42.0.11"), MasterPeer("a,b=c", "10.42.0.2"))}, "DNS"),
        ({"masters": (MasterPeer("m1", "10.42.0.11"), MasterPeer("m1", "10.42.0.2"))}, "unique"),
        ({"masters": (MasterPeer("m1", "10.42.0.11"), MasterPeer("m2", "fd00::1"))}, "IPv4"),
        ({"role": "worker", "masters": (), "api_endpoint": ""}, "masters or its api_endpoint"),
        ({"api_endpoint": "https://x:443"}, "HOST:PORT"),
        ({"api_endpoint": "x:99999"}, "HOST:PORT"),
        ({"etcd_disk": "/dev/../etc/passwd"}, "etcd_disk"),
        ({"etcd_disk": "vdb"}, "etcd_disk"),
        ({"role": "worker", "etcd_disk": ETCD_DISK}, "etcd_disk"),
        ({"address": "10.42.0.11"}, "prefix length"),
        ({"service_cidr": "10.96.0.0/29"}, "/28"),
        ({"pod_cidr": "fd00::/64"}, "IPv4"),
        ({"cluster_domain": "Cluster.Local"}, "DNS name"),
        ({"cluster_domain": "a b"}, "DNS name"),
    ],
)
def test_bad_cluster_values_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_user_data(context(**changes))


def test_derived_values() -> None:
    masters = (MasterPeer("m0", "10.42.0.10"), MasterPeer("m1", "10.42.0.11"))
    derived = derive(context(masters=masters, service_cidr="10.100.0.0/16"))
    assert derived.node_ip == "10.42.0.11"
    assert derived.service_ip == "10.100.0.1"
    assert derived.cluster_dns == "10.100.0.10"
    assert derived.api_endpoint == "10.42.0.10:6443"
    assert derived.api_server == "https://10.42.0.10:6443"
    assert derived.local_api_server == "https://10.42.0.11:6443"
    assert derived.etcd_initial_cluster == ("m0=https://10.42.0.10:2380,m1=https://10.42.0.11:2380")
    assert derived.etcd_servers == "https://10.42.0.10:2379,https://10.42.0.11:2379"
    assert derived.mounts == (GUEST_MOUNT, "/var/lib/etcd")


def test_master_alone_is_its_own_cluster() -> None:
    derived = derive(context(masters=()))
    assert derived.masters == (MasterPeer("m1", "10.42.0.11"),)
    assert derived.etcd_initial_cluster == "m1=https://10.42.0.11:2380"


def test_worker_with_only_an_api_endpoint() -> None:
    ctx = context("worker", masters=(), api_endpoint="api.alpha.example:443")
    assert derive(ctx).api_server == "https://api.alpha.example:443"
    kubelet = yaml_file(user_data(ctx), "/etc/kubernetes/kubelet.conf")
    assert kubelet["clusters"][0]["cluster"]["server"] == "https://api.alpha.example:443"


# --- versions -----------------------------------------------------------------------


def test_supported_minors_come_from_the_folders() -> None:
    assert supported_minors() == ["1.30", "1.31"]
    assert supported_minors() is not supported_minors()  # callers cannot change the cache


@pytest.mark.parametrize(("version", "folder"), [("1.30.0", "1.30"), ("1.31.12", "1.31")])
def test_template_folder(version: str, folder: str) -> None:
    assert template_folder(version) == folder


@pytest.mark.parametrize("version", ["1.29.9", "1.32.0", "1.31", "1.31.2 ", "v1.31.2", "x", ""])
def test_unsupported_versions_name_the_supported_ones(version: str) -> None:
    with pytest.raises(UnsupportedVersion, match=r"supported minors are 1\.30, 1\.31"):
        template_folder(version)
    with pytest.raises(UnsupportedVersion):
        render_user_data(context(kubernetes_version=version))
    assert issubclass(UnsupportedVersion, ValueError)


@pytest.mark.parametrize("minor", supported_minors())
@pytest.mark.parametrize("role", ["master", "worker"])
def test_every_minor_renders_its_own_versions(minor: str, role: str) -> None:
    data = user_data(context(role, kubernetes_version=f"{minor}.7"))
    proxy = yaml_file(data, "/etc/kubernetes/manifests/kube-proxy.yaml")
    assert proxy["spec"]["containers"][0]["image"] == f"registry.k8s.io/kube-proxy:v{minor}.7"
    assert json.loads(files_by_path(data)["/etc/hostagent/node.json"]["content"])[
        "kubernetes_version"
    ] == (f"{minor}.7")
    toml = files_by_path(data)["/etc/containerd/config.toml"]["content"]
    pause = {"1.30": "pause:3.9", "1.31": "pause:3.10"}[minor]
    assert f'sandbox_image = "registry.k8s.io/{pause}"' in toml


@pytest.mark.parametrize("minor", supported_minors())
@pytest.mark.parametrize("role", ["master", "worker"])
def test_every_shipped_yaml_file_parses(minor: str, role: str) -> None:
    # Rendering parses only an operator's YAML templates; the shipped ones are checked here.
    files = files_by_path(user_data(context(role, kubernetes_version=f"{minor}.1")))
    kubeconfigs = ("/etc/kubernetes/", "/var/lib/kube-proxy/")
    yaml_files = [
        path
        for path in files
        if path.endswith(".yaml") or (path.startswith(kubeconfigs) and path.endswith(".conf"))
    ]
    assert len(yaml_files) == (14 if role == "master" else 5)
    for path in yaml_files:
        documents = list(yaml.safe_load_all(files[path]["content"]))
        assert documents and all(isinstance(d, dict) for d in documents), path


def test_minors_differ_where_kubernetes_does() -> None:
    old = user_data(context(kubernetes_version="1.30.5"))
    new = user_data(context(kubernetes_version="1.31.2"))
    etcd = "/etc/kubernetes/manifests/etcd.yaml"
    assert yaml_file(old, etcd)["spec"]["containers"][0]["image"].endswith(":3.5.12-0")
    assert yaml_file(new, etcd)["spec"]["containers"][0]["image"].endswith(":3.5.15-0")
    kubelet = "/var/lib/kubelet/config.yaml"
    assert "failCgroupV1" not in yaml_file(old, kubelet)
    assert yaml_file(new, kubelet)["failCgroupV1"] is True


# --- override templates -------------------------------------------------------------


KUBELET_CONFIG = "config/kubelet.yaml.j2"


def test_strict_undefined_raises(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / KUBELET_CONFIG).write_text("x: {{ no_such_name | yaml }}\n")
    with pytest.raises(ValueError, match=f"1.31/{KUBELET_CONFIG}: .*no_such_name") as caught:
        render_user_data(context("worker"), tmp_path)
    assert type(caught.value.__cause__).__name__ == "UndefinedError"


def test_override_dir_replaces_one_file(tmp_path: Path) -> None:
    # The kubelet unit's template is replaced; every other file stays shipped.
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "kubelet.service.j2").write_text(
        "[Service]\nExecStart={{ bin_dir }}/kubelet --node-ip={{ node_ip }} # {{ cluster }}\n"
    )
    for role in ("master", "worker"):
        data = user_data(context(role), tmp_path)
        files = files_by_path(data)
        kubelet = "/opt/kubernetes/v1.31.2/bin/kubelet"
        assert files["/etc/systemd/system/kubelet.service"]["content"] == (
            f"[Service]\nExecStart={kubelet} --node-ip=10.42.0.11 # alpha\n"
        )
        shipped = files_by_path(user_data(context(role)))
        del (
            files["/etc/systemd/system/kubelet.service"],
            shipped["/etc/systemd/system/kubelet.service"],
        )
        assert files == shipped


@pytest.mark.parametrize(
    "name",
    [
        "worker.yaml.j2",
        "common.yaml.j2",
        "files.j2",
        "1.31/master.yaml.j2",
        "1.31/node.yaml.j2",
        "config/kubeconfig.j2",
    ],
)
def test_override_of_a_retired_skeleton_template_is_refused(tmp_path: Path, name: str) -> None:
    # user-data is data now: an override of the old skeleton would be ignored silently.
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text('{% extends "common.yaml.j2" %}\n')
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / name))} is no longer read"):
        render_user_data(context("worker"), tmp_path)


def test_override_per_minor_comes_first(tmp_path: Path) -> None:
    (tmp_path / "1.30").mkdir()
    (tmp_path / "constants.j2").write_text('{% set etcd_image = "every/minor" %}\n')
    (tmp_path / "1.30" / "constants.j2").write_text(
        (TEMPLATES / "1.30" / "constants.j2").read_text() + '{% set etcd_image = "only/1.30" %}\n'
    )
    etcd = "/etc/kubernetes/manifests/etcd.yaml"
    old = yaml_file(user_data(context(kubernetes_version="1.30.1"), tmp_path), etcd)
    assert old["spec"]["containers"][0]["image"] == "only/1.30"
    with pytest.raises(ValueError, match="UndefinedError"):  # a partial override
        user_data(context(kubernetes_version="1.31.1"), tmp_path)


@pytest.mark.parametrize(
    "name", [KUBELET_CONFIG, "manifests/kube-proxy.yaml.j2", "config/kubeconfig.yaml.j2"]
)
def test_override_that_breaks_yaml_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("a: [unclosed\n")
    with pytest.raises(ValueError, match=f"template 1.31/{name} rendered invalid YAML"):
        render_user_data(context("worker"), tmp_path)


def test_override_of_a_file_that_is_not_yaml_is_not_parsed(tmp_path: Path) -> None:
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "kubelet.service.j2").write_text("a: [unclosed\n")
    files = files_by_path(user_data(context("worker"), tmp_path))
    assert files["/etc/systemd/system/kubelet.service"]["content"] == "a: [unclosed\n"


@pytest.mark.parametrize(
    "expression",
    ["{{ no_such_name | yaml }}", "{{ [no_such_name] | yaml }}", "{{ no_such_name }}"],
)
def test_strict_undefined_raises_through_every_filter(tmp_path: Path, expression: str) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / KUBELET_CONFIG).write_text(f"x: {expression}\n")
    with pytest.raises(ValueError, match="no_such_name") as caught:
        render_user_data(context("worker"), tmp_path)
    assert type(caught.value.__cause__).__name__ == "UndefinedError"


# --- meta-data, network-config, the drive's files -----------------------------------


def test_meta_data() -> None:
    assert yaml.safe_load(render_meta_data(context())) == {
        "instance-id": "alpha-m1-1a2b3c",
        "local-hostname": "m1",
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


def test_render_node_and_config_drive_files() -> None:
    ctx = context()
    files = render_node(ctx)
    assert files == {
        "user-data": render_user_data(ctx),
        "meta-data": render_meta_data(ctx),
        "network-config": render_network_config(ctx),
    }
    assert config_drive_files(ctx) == {name: text.encode() for name, text in files.items()}


def test_check_context_returns_the_folder() -> None:
    assert check_context(context(kubernetes_version="1.30.2")) == "1.30"


# --- from the agent's config and the node's spec (hostagent side of the seam) ---------

TOML = '''
[cloudconfig.master]
commands = ["echo master"]

[[cloudconfig.master.files]]
path = "/etc/motd"
content = """
Welcome to a "master" {{ of }} &all
"""
permissions = "0640"

[[cloudconfig.worker.units]]
name = "audit.service"
content = "[Service]\\nExecStart=/bin/true\\n"
enable = false
'''


def test_agent_config_extensions_reach_the_templates(tmp_path: Path) -> None:
    from hostagent.config import load_config
    from hostagent.nodecontext import role_extensions

    (tmp_path / "hostagent.toml").write_text(TOML)
    config = load_config(tmp_path / "hostagent.toml").cloudconfig
    master = role_extensions(config.extensions("master"))
    worker = role_extensions(config.extensions("worker"))
    assert master == Extensions(
        files=(ExtraFile("/etc/motd", 'Welcome to a "master" {{ of }} &all\n', "0640"),),
        commands=("echo master",),
    )
    assert worker == Extensions(
        units=(ExtraUnit("audit.service", "[Service]\nExecStart=/bin/true\n", enable=False),)
    )
    files = files_by_path(user_data(context("master", extensions=master)))
    assert files["/etc/motd"]["content"] == 'Welcome to a "master" {{ of }} &all\n'


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('[[cloudconfig.worker.files]]\npath = "etc/x"\ncontent = ""\n', "worker.files.0.path"),
        ('[[cloudconfig.master.units]]\nname = "x"\ncontent = ""\n', "master.units.0.name"),
        ('[cloudconfig.master]\ncommands = [""]\n', "master.commands"),
        ("[cloudconfig.master]\nfiles = 3\n", "master.files"),
        ('[cloudconfig.etcd]\ncommands = ["x"]\n', "cloudconfig.etcd"),
        (
            '[[cloudconfig.worker.units]]\nname = "a.service"\ncontent = ""\n'
            '[[cloudconfig.worker.units]]\nname = "a.service"\ncontent = ""\n',
            "unique",
        ),
    ],
)
def test_bad_agent_config_extensions_are_refused(tmp_path: Path, toml: str, match: str) -> None:
    from hostagent.config import load_config
    from hostagent.errors import ConfigError

    (tmp_path / "hostagent.toml").write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "hostagent.toml")


def record(name: str, role: str, host_part: int, in_cluster: str = "alpha", **spec: Any) -> Any:
    from hostagent.model import NodeKey, NodeSpec, Phase
    from hostagent.store import NodeRecord

    body = {
        "role": role,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 7, "address": f"10.42.0.{host_part}/24", "gateway": "10.42.0.1"},
        **spec,
    }
    return NodeRecord(
        key=NodeKey(cluster=in_cluster, name=name),
        spec=NodeSpec.model_validate(body),
        token="00ff",
        phase=Phase.PENDING,
        message="",
        updated_at="",
        deleting=False,
        guest=None,
        domain_id=None,
    )


def test_cluster_masters_from_the_spec_or_this_host() -> None:
    from hostagent.nodecontext import cluster_masters

    listed = {"masters": [{"name": "mx", "address": "10.42.0.99"}]}
    worker = record("w1", "worker", 21, cluster=listed)
    peers = [
        record("m2", "master", 12),
        record("m1", "master", 11),
        record("m9", "master", 19, in_cluster="beta"),
        record("w2", "worker", 22),
    ]
    assert cluster_masters(worker, peers) == (MasterPeer("mx", "10.42.0.99"),)
    assert cluster_masters(record("w1", "worker", 21), peers) == (
        MasterPeer("m1", "10.42.0.11"),
        MasterPeer("m2", "10.42.0.12"),
    )
    assert cluster_masters(record("m3", "master", 13), []) == (MasterPeer("m3", "10.42.0.13"),)
    assert cluster_masters(record("w1", "worker", 21), []) == ()
