"""A master's etcd as a static pod or a systemd unit (one list of flags for both), and the
cluster's VIP held by keepalived: rendered from the shipped templates and parsed back."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.context import MasterPeer
from cloudconfig.render import derive, render_user_data, unit_arg
from cloudconfig.versions import supported_minors
from tests.unit.test_render import context, files_by_path, user_data

MASTERS = (
    MasterPeer("m1", "10.42.0.11"),
    MasterPeer("m2", "10.42.0.12"),
    MasterPeer("m3", "10.42.0.13"),
)
VIP = "10.42.0.5"
ETCD_POD = "/etc/kubernetes/manifests/etcd.yaml"
ETCD_UNIT = "/etc/systemd/system/etcd.service"
KEEPALIVED_CONF = "/etc/keepalived/keepalived.conf"
KEEPALIVED_UNIT = "/etc/systemd/system/keepalived.service"
NONLOCAL_BIND = "/etc/sysctl.d/90-hostagent-vip.conf"


def pod_flags(data: dict[str, Any]) -> list[str]:
    pod = yaml.safe_load(files_by_path(data)[ETCD_POD]["content"])
    command: list[str] = pod["spec"]["containers"][0]["command"]
    assert command[0] == "etcd"
    return command[1:]


def unit_exec_start(data: dict[str, Any]) -> list[str]:
    """ExecStart of the etcd unit as systemd splits it (continuation lines joined)."""
    text = files_by_path(data)[ETCD_UNIT]["content"]
    joined = text.replace("\\\n", " ")
    [line] = [ln for ln in joined.splitlines() if ln.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def enabled_units(data: dict[str, Any]) -> list[str]:
    [enable] = [c for c in data["runcmd"] if c[:2] == ["systemctl", "enable"]]
    return list(enable[4:])


@pytest.mark.parametrize("minor", supported_minors())
@pytest.mark.parametrize("vip", ["", VIP])
def test_the_etcd_unit_runs_the_static_pods_flags(minor: str, vip: str) -> None:
    version = f"{minor}.3"
    pod = user_data(context(masters=MASTERS, vip=vip, kubernetes_version=version))
    unit = user_data(
        context(masters=MASTERS, vip=vip, kubernetes_version=version, etcd_mode="systemd")
    )
    argv = unit_exec_start(unit)
    assert argv[0] == "/usr/bin/etcd"
    assert argv[1:] == pod_flags(pod)
    assert len(argv) > 20
    initial = "m1=https://10.42.0.11:2380,m2=https://10.42.0.12:2380,m3=https://10.42.0.13:2380"
    assert f"--initial-cluster={initial}" in argv
    files = files_by_path(unit)
    assert ETCD_POD not in files and ETCD_UNIT not in files_by_path(pod)
    assert "etcd.service" in enabled_units(unit)
    assert "etcd.service" not in enabled_units(pod)
    text = files[ETCD_UNIT]["content"]
    # The certificates and etcd's own disk are mounted before it starts; quorum may take
    # minutes (the other masters boot later), so no start timeout.
    assert "RequiresMountsFor=/etc/kubernetes/pki /var/lib/etcd" in text
    assert "TimeoutStartSec=infinity" in text and "Restart=always" in text


def test_the_etcd_unit_keeps_the_other_control_plane_pods() -> None:
    files = files_by_path(user_data(context(etcd_mode="systemd")))
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert f"/etc/kubernetes/manifests/{name}.yaml" in files


def test_etcd_listens_on_the_vip_and_may_bind_it_before_holding_it() -> None:
    flags = pod_flags(user_data(context(masters=MASTERS, vip=VIP)))
    assert (
        "--listen-client-urls=https://127.0.0.1:2379,https://10.42.0.11:2379,https://10.42.0.5:2379"
    ) in flags
    assert "--advertise-client-urls=https://10.42.0.11:2379" in flags
    files = files_by_path(user_data(context(masters=MASTERS, vip=VIP)))
    assert files[NONLOCAL_BIND]["content"] == "net.ipv4.ip_nonlocal_bind = 1\n"
    plain = pod_flags(user_data(context(masters=MASTERS)))
    assert "--listen-client-urls=https://127.0.0.1:2379,https://10.42.0.11:2379" in plain


def keepalived(node: str, address: str, **changes: Any) -> str:
    ctx = context(node=node, hostname=node, address=f"{address}/24", masters=MASTERS, **changes)
    files = files_by_path(user_data(ctx))
    assert files[KEEPALIVED_CONF]["permissions"] == "0600"
    return files[KEEPALIVED_CONF]["content"]


def test_keepalived_holds_the_vip_with_the_other_masters() -> None:
    first = keepalived("m1", "10.42.0.11", vip=VIP, vni=4242)
    second = keepalived("m2", "10.42.0.12", vip=VIP, vni=4242)
    # VNI 4242: router id 4242 % 255 + 1, the same on every master of the cluster.
    for conf in (first, second):
        assert "virtual_router_id 163\n" in conf
        assert "state BACKUP\n" in conf and "nopreempt\n" in conf
        assert "10.42.0.5/24 dev eth0\n" in conf
        assert "authentication" not in conf
    assert "priority 200\n" in first and "priority 199\n" in second
    assert "unicast_src_ip 10.42.0.11\n" in first
    peers = re.search(r"unicast_peer \{\n(.*?)\n +\}", second, re.S)
    assert peers is not None
    assert peers.group(1).split() == ["10.42.0.11", "10.42.0.13"]


def test_keepalived_runs_only_on_masters_of_a_cluster_with_a_vip() -> None:
    master = user_data(context(masters=MASTERS, vip=VIP))
    assert "keepalived.service" in enabled_units(master)
    assert "[Service]" in files_by_path(master)[KEEPALIVED_UNIT]["content"]
    for data in (
        user_data(context(masters=MASTERS)),
        user_data(context("worker", address="10.42.0.21/24", masters=MASTERS, vip=VIP)),
    ):
        files = files_by_path(data)
        assert not {KEEPALIVED_CONF, KEEPALIVED_UNIT, NONLOCAL_BIND} & set(files)
        assert "keepalived.service" not in enabled_units(data)


def test_the_vip_is_the_default_api_endpoint() -> None:
    worker = context("worker", address="10.42.0.21/24", masters=MASTERS, vip=VIP)
    assert derive(worker).api_server == "https://10.42.0.5:6443"
    kubelet = yaml.safe_load(
        files_by_path(user_data(worker))["/etc/kubernetes/kubelet.conf"]["content"]
    )
    assert kubelet["clusters"][0]["cluster"]["server"] == "https://10.42.0.5:6443"
    explicit = context(masters=MASTERS, vip=VIP, api_endpoint="api.alpha.example:443")
    assert derive(explicit).api_endpoint == "api.alpha.example:443"
    # The masters' own components still talk to their own API server.
    assert derive(context(masters=MASTERS, vip=VIP)).local_api_server == "https://10.42.0.11:6443"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"vip": "10.43.0.5"}, "node subnet"),
        ({"vip": "10.42.0.12"}, "free address"),
        ({"vip": "10.42.0.11"}, "free address"),
        ({"vip": "10.42.0.1"}, "free address"),
        ({"vip": "10.42.0.255"}, "free address"),
        ({"vip": "10.42.0.0"}, "free address"),
        ({"vip": "fd00::5"}, "IPv4"),
        ({"vip": "10.42.0.5/24"}, "IPv4"),
        ({"etcd_mode": "docker"}, "etcd_mode"),
    ],
)
def test_bad_control_plane_values_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_user_data(context(masters=MASTERS, **changes))


@pytest.mark.parametrize("value", ["a b", "%n", "$HOME", "a'b", 'a"b', "a\\b", "", "x\ny"])
def test_unit_arguments_must_be_literal(value: str) -> None:
    with pytest.raises(ValueError, match="ExecStart"):
        unit_arg(value)


def test_a_hostile_cluster_name_cannot_reach_the_etcd_unit() -> None:
    with pytest.raises(ValueError, match="ExecStart"):
        render_user_data(context(cluster="a b%n", etcd_mode="systemd"))


def test_the_node_spec_reaches_the_templates(tmp_path: Path) -> None:
    """NodeSpec.cluster's etcd_mode and vip, and the network's VNI, as the agent passes
    them to the templates; the defaults keep a static pod and no VIP."""
    from hostagent.config import load_config
    from hostagent.nodecontext import node_context
    from tests.unit.test_render import record

    (tmp_path / "hostagent.toml").write_text("")
    config = load_config(tmp_path / "hostagent.toml")
    masters = [{"name": m.name, "address": m.address} for m in MASTERS]
    cluster = {"masters": masters, "etcd_mode": "systemd", "vip": VIP}
    ctx = node_context(config, record("m2", "master", 12, cluster=cluster))
    assert (ctx.etcd_mode, ctx.vip, ctx.vni) == ("systemd", VIP, 7)
    plain = node_context(config, record("m2", "master", 12, cluster={"masters": masters}))
    assert (plain.etcd_mode, plain.vip) == ("static-pod", "")
