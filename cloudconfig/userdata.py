"""A node's #cloud-config as data (pure), written once by `dump` with PyYAML's SafeDumper.

Python decides the document's structure: which files a role gets (`write_files`), the
certificate share (`bootcmd`, `mounts`), etcd's disk (`fs_setup`), `runcmd` and the
phone-home. Jinja renders file bodies only: `body(name, **values)` is the template
`<minor>/<name>` (render.py). Every value is a Python string in a Python structure, so
no value can change the document's structure, whatever its characters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudconfig.addons import calico
from cloudconfig.context import Derived, NodeContext
from common import yamlio
from pki import layout

ETCD_DATA_DIR = "/var/lib/etcd"
# Read-only: the guest must not be able to change its own certificates.
PKI_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,ro"
# Written by the runcmd entry before phone-home; /run, so it speaks for this boot only.
RUNCMD_MARKER = "/run/hostagent/runcmd-reached"
PHONE_HOME_ENV = "/etc/hostagent/phone-home.env"
# Builds the phone-home body inside the guest (python3 ships with cloud-init).
PHONE_HOME_PROGRAM = (Path(__file__).parent / "phone_home_report.py").read_text()
# Sources phone-home.env and posts the body PROGRAM ($1) builds from EXPECTED ($2).
PHONE_HOME_SCRIPT = """\
set -eu
set -a
. /etc/hostagent/phone-home.env
set +a
body=$(python3 -c "$1" "$2")
exec curl -fsS --retry 30 --retry-delay 2 --retry-all-errors -X POST \\
  -H "Authorization: Bearer $PHONE_HOME_TOKEN" -H 'Content-Type: application/json' \\
  --data-binary "$body" "$PHONE_HOME_URL"
"""
# cloud-init 22.4's mounts module drops an entry whose device is not a block device (a
# 9p tag is not), so bootcmd mounts the certificate share on every boot; the values
# reach sh as arguments, never as code.
MOUNT_PKI_SCRIPT = 'mountpoint -q "$1" || { mkdir -p "$1" && mount -t 9p -o "$3" "$2" "$1"; }'
SYSTEMD_DIR = "/etc/systemd/system"
KEEPALIVED_CONF = "/etc/keepalived/keepalived.conf"
# A master binds etcd's client port on the VIP before it holds it (render.derive).
NONLOCAL_BIND_SYSCTL = "net.ipv4.ip_nonlocal_bind = 1\n"

Body = Callable[..., str]  # body(template name, **extra values) -> the file's text


class WriteFiles:
    """write_files in order, and the units runcmd enables."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []
        self.units: list[str] = []

    def file(self, path: str, content: str, permissions: str = "0644") -> None:
        self.entries.append({"path": path, "permissions": permissions, "content": content})

    def unit(self, name: str, content: str, enable: bool = True) -> None:
        """A systemd unit under /etc/systemd/system; runcmd enables and starts it if enable."""
        if enable:
            self.units.append(name)
        self.file(f"{SYSTEMD_DIR}/{name}", content)

    @property
    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.entries]


def cloud_config(
    ctx: NodeContext,
    derived: Derived,
    body: Body,
    calico_release: calico.Release | None = None,
) -> dict[str, Any]:
    """The node's cloud-config: what every node gets, then its role's additions, then
    the operator's (ctx.extensions)."""
    files = WriteFiles()
    _identity_files(files, ctx)
    _node_files(files, ctx, derived, body)
    if ctx.role == "master":
        _master_files(files, ctx, derived, body, calico_release)
    # The operator's additions come last: a path that is also shipped is written twice,
    # and the operator's content wins.
    for extra in ctx.extensions.files:
        files.file(extra.path, extra.content, extra.permissions)
    for unit in ctx.extensions.units:
        files.unit(unit.name, unit.content, unit.enable)
    data: dict[str, Any] = {
        "write_files": files.entries,
        "hostname": ctx.hostname,
        "preserve_hostname": False,
    }
    if ctx.ssh_authorized_keys:  # cloud-init's schema refuses an empty list
        data["ssh_authorized_keys"] = list(ctx.ssh_authorized_keys)
    pki_mount = [layout.GUEST_MOUNT, layout.MOUNT_TAG, PKI_MOUNT_OPTIONS]
    data["bootcmd"] = [["sh", "-c", MOUNT_PKI_SCRIPT, "sh", *pki_mount]]
    mounts = [[layout.MOUNT_TAG, layout.GUEST_MOUNT, "9p", PKI_MOUNT_OPTIONS, "0", "0"]]
    if ctx.etcd_disk:
        data["fs_setup"] = [_etcd_file_system(ctx.etcd_disk)]
        mounts.append([ctx.etcd_disk, ETCD_DATA_DIR, "ext4", "defaults,nofail", "0", "2"])
    data["mounts"] = mounts
    data["runcmd"] = _runcmd(ctx, derived, files)
    return data


def _identity_files(files: WriteFiles, ctx: NodeContext) -> None:
    # First, on lines of their own: a lab guest without cloud-init greps the first
    # PHONE_HOME_* lines out of user-data, so they come before any user value. Both
    # values are checked (render.check_phone_home) to need no quoting in a YAML block
    # scalar or a shell assignment.
    env = (
        f"PHONE_HOME_URL={ctx.phone_home_url}\nPHONE_HOME_TOKEN={ctx.phone_home_token}\n"
        f"PHONE_HOME_HEALTH_INTERVAL_S={ctx.health_report_interval_s}\n"
    )
    files.file(PHONE_HOME_ENV, env, "0600")
    node = {
        "cluster": ctx.cluster,
        "node": ctx.node,
        "role": ctx.role,
        "kubernetes_version": ctx.kubernetes_version,
    }
    files.file("/etc/hostagent/node.json", json.dumps(node, indent=2, sort_keys=True) + "\n")
    files.file("/etc/hostagent/role", ctx.role + "\n")


def _node_files(files: WriteFiles, ctx: NodeContext, derived: Derived, body: Body) -> None:
    """Both roles: kernel settings, containerd's config, the kubelet (unit,
    KubeletConfiguration, kubeconfig), certificate reloads, the health report to the
    agent, kube-proxy."""
    node_user = f"system:node:{ctx.hostname}"
    files.file("/etc/modules-load.d/kubernetes.conf", "overlay\nbr_netfilter\n")
    files.file(
        "/etc/sysctl.d/90-kubernetes.conf",
        "net.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\n"
        "net.bridge.bridge-nf-call-ip6tables = 1\n",
    )
    files.file("/etc/containerd/config.toml", body("config/containerd.toml.j2"))
    files.file("/var/lib/kubelet/config.yaml", body("config/kubelet.yaml.j2"))
    kubelet_conf = _kubeconfig(body, node_user, derived.api_server, layout.KUBELET_CLIENT)
    files.file("/etc/kubernetes/kubelet.conf", kubelet_conf, "0600")
    files.unit("kubelet.service", body("units/kubelet.service.j2"))
    files.file("/usr/local/sbin/hostagent-cert-reload", body("units/cert-reload.sh.j2"), "0755")
    reload = body("units/hostagent-cert-reload.service.j2")
    files.unit("hostagent-cert-reload.service", reload, enable=False)
    files.unit("hostagent-cert-reload.timer", body("units/hostagent-cert-reload.timer.j2"))
    etcd_unit = ctx.role == "master" and ctx.etcd_mode == "systemd"
    health = body(
        "units/hostagent-health.sh.j2", phone_home_env=PHONE_HOME_ENV, etcd_unit=etcd_unit
    )
    files.file("/usr/local/sbin/hostagent-health", health, "0755")
    files.unit("hostagent-health.service", body("units/hostagent-health.service.j2"), enable=False)
    files.unit("hostagent-health.timer", body("units/hostagent-health.timer.j2"))
    files.file("/var/lib/kube-proxy/config.yaml", body("config/kube-proxy.yaml.j2"))
    proxy_conf = _kubeconfig(body, "system:kube-proxy", derived.api_server, layout.KUBE_PROXY)
    files.file("/var/lib/kube-proxy/kubeconfig.conf", proxy_conf, "0600")
    files.file("/etc/kubernetes/manifests/kube-proxy.yaml", body("manifests/kube-proxy.yaml.j2"))


def _master_files(
    files: WriteFiles,
    ctx: NodeContext,
    derived: Derived,
    body: Body,
    calico_release: calico.Release | None,
) -> None:
    """A control-plane node: etcd (a static pod, or a unit with etcd_mode "systemd"),
    kube-apiserver, kube-controller-manager and kube-scheduler as static pods, their
    kubeconfigs, keepalived for the cluster's VIP if it has one, and the cluster add-ons
    (Calico from addons/calico.py, CoreDNS) with the unit that applies them."""
    pods: tuple[str, ...] = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
    if ctx.etcd_mode == "systemd":
        files.unit("etcd.service", body("units/etcd.service.j2"))
    else:
        pods = ("etcd", *pods)
    for name in pods:
        manifest = body(f"manifests/{name}.yaml.j2")
        files.file(f"/etc/kubernetes/manifests/{name}.yaml", manifest, "0600")
    if derived.vrrp is not None:
        files.file("/etc/sysctl.d/90-hostagent-vip.conf", NONLOCAL_BIND_SYSCTL)
        files.file(KEEPALIVED_CONF, body("config/keepalived.conf.j2"), "0600")
        files.unit("keepalived.service", body("units/keepalived.service.j2"))
    kubeconfigs = (  # the admin through api_endpoint, the others to this master's own
        ("admin.conf", "kubernetes-admin", derived.api_server, layout.ADMIN),
        (
            "controller-manager.conf",
            "system:kube-controller-manager",
            derived.local_api_server,
            layout.CONTROLLER_MANAGER,
        ),
        ("scheduler.conf", "system:kube-scheduler", derived.local_api_server, layout.SCHEDULER),
    )
    for name, user, server, cert in kubeconfigs:
        files.file(f"/etc/kubernetes/{name}", _kubeconfig(body, user, server, cert), "0600")
    calico_file = calico.manifest_file(ctx.pod_cidr, ctx.mtu, calico_release)
    files.file("/etc/kubernetes/addons/calico.yaml", calico_file)
    files.file("/etc/kubernetes/addons/coredns.yaml", body("addons/coredns.yaml.j2"))
    files.unit("k8s-addons.service", body("units/k8s-addons.service.j2"))


def _kubeconfig(body: Body, user: str, server: str, cert: layout.Cert) -> str:
    return body("config/kubeconfig.yaml.j2", user=user, server=server, cert=cert)


def _etcd_file_system(device: str) -> dict[str, Any]:
    # etcd's own disk, formatted once: partition "auto" with a label reuses a disk that
    # already carries an "etcd" ext4 file system and leaves a disk with anything else
    # alone; never "none", which formats every time. overwrite stays false.
    return {
        "label": "etcd",
        "filesystem": "ext4",
        "device": device,
        "partition": "auto",
        "overwrite": False,
    }


def _runcmd(ctx: NodeContext, derived: Derived, files: WriteFiles) -> list[Any]:
    commands: list[Any] = [
        # Kernel settings every Kubernetes node needs (files written above).
        ["modprobe", "-a", "overlay", "br_netfilter"],
        ["sysctl", "--system"],
        # containerd comes with the image; restart it to read the config written above.
        [
            "sh",
            "-c",
            "if systemctl cat containerd.service >/dev/null 2>&1; "
            "then systemctl restart containerd.service; fi",
        ],
        ["systemctl", "daemon-reload"],
    ]
    if files.units:
        # --no-block: a unit waiting for the API server must not hold up the phone-home.
        commands.append(["systemctl", "enable", "--now", "--no-block", *files.units])
    commands += ctx.extensions.commands
    # The phone-home reports commands_ran: true when these entries ran.
    commands += [["mkdir", "-p", RUNCMD_MARKER.rsplit("/", 1)[0]], ["touch", RUNCMD_MARKER]]
    # Last: the agent marks the node Ready when this call arrives. The body (what the
    # guest applied: files and their modes, mounts, addresses, ...) is built by python3,
    # which cloud-init guests have, so it is valid JSON whatever the names.
    expected = {
        "role": ctx.role,
        "kubernetes_version": ctx.kubernetes_version,
        "health_interval_s": ctx.health_report_interval_s,
        "files": files.paths,
        "mounts": list(derived.mounts),
        "marker": RUNCMD_MARKER,
    }
    compact = json.dumps(expected, sort_keys=True, separators=(",", ":"))
    commands.append(["sh", "-c", PHONE_HOME_SCRIPT, "sh", PHONE_HOME_PROGRAM, compact])
    return commands


def dump(data: dict[str, Any]) -> str:
    """The #cloud-config text of data: keys in their order, one line per value (no
    folding), multi-line strings as blocks."""
    return "#cloud-config\n" + yamlio.dump_blocks(data)
