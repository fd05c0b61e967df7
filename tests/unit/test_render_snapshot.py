"""user-data as cloud-init reads it, compared with a stored snapshot.

The snapshot (tests/unit/data/user_data.json) holds `yaml.safe_load` of the user-data
of a few representative nodes: master and worker, every shipped minor, operator
extensions, hostile SSH keys, a master with etcd as a unit and the cluster's VIP. A
change to how user-data is written must leave what cloud-init reads the same; a change
to what a node gets regenerates the snapshot:

    .venv/bin/python -m tests.unit.test_render_snapshot

and the diff of the JSON file is the review.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.context import Extensions, ExtraFile, ExtraUnit, MasterPeer, NodeContext
from cloudconfig.render import render_user_data

SNAPSHOT = Path(__file__).parent / "data" / "user_data.json"

MASTER = NodeContext(
    cluster="alpha",
    node="m1",
    role="master",
    hostname="m1",
    instance_id="alpha-m1-1a2b3c",
    mac="52:54:00:12:34:56",
    address="10.42.0.11/24",
    gateway="10.42.0.1",
    mtu=1450,
    kubernetes_version="1.31.2",
    ssh_authorized_keys=(
        "ssh-ed25519 AAAAC3Nza alice@example",
        'ssh-rsa AAAA command="echo {{ hi }}: #x" &anchor *alias',
    ),
    phone_home_url="http://10.42.0.1:8472/v1/phone-home/alpha/m1",
    phone_home_token="0123456789abcdef" * 4,
    masters=(
        MasterPeer("m0", "10.42.0.10"),
        MasterPeer("m1", "10.42.0.11"),
        MasterPeer("m2", "10.42.0.12"),
    ),
    pod_cidr="172.20.0.0/16",
    service_cidr="10.100.0.0/16",
    cluster_domain="alpha.internal",
    etcd_disk="/dev/disk/by-id/virtio-etcd",
    extensions=Extensions(
        files=(
            ExtraFile("/etc/motd", 'Welcome "{{ user }}" &a *b\n- x\nkey: value # c\n', "0640"),
            ExtraFile("/etc/site/trailing", "trailing space \n\ttab\n"),
            ExtraFile("/etc/site/no-newline", "one line"),
        ),
        units=(
            ExtraUnit("site-agent.service", "[Service]\nExecStart=/bin/true\n"),
            ExtraUnit("site-report.timer", "[Timer]\nOnBootSec=1h\n", enable=False),
        ),
        commands=("echo 'one: two' > /tmp/x", "{{ not jinja }} || true"),
    ),
)
WORKER = dataclasses.replace(
    MASTER,
    node="w1",
    role="worker",
    hostname="w1",
    instance_id="alpha-w1-4d5e6f",
    address="10.42.0.21/24",
    api_endpoint="api.alpha.example:443",
    etcd_disk=None,
    extensions=Extensions(
        units=(ExtraUnit("node-exporter.service", "[Service]\nExecStart=/bin/ne\n"),),
        commands=("echo worker",),
    ),
)
PLAIN_MASTER = dataclasses.replace(
    MASTER,
    ssh_authorized_keys=(),
    masters=(),
    pod_cidr="192.168.0.0/16",
    service_cidr="10.96.0.0/12",
    cluster_domain="cluster.local",
    etcd_disk=None,
    extensions=Extensions(),
)
# A lab master: etcd as a systemd unit, keepalived holding the cluster's VIP.
SYSTEMD_VIP_MASTER = dataclasses.replace(
    PLAIN_MASTER, masters=MASTER.masters, etcd_mode="systemd", vip="10.42.0.5", vni=4242
)
NODES = {
    f"{name}-{minor}": dataclasses.replace(ctx, kubernetes_version=f"{minor}.2")
    for minor in ("1.30", "1.31")
    for name, ctx in (
        ("master", MASTER),
        ("worker", WORKER),
        ("plain-master", PLAIN_MASTER),
        ("systemd-vip-master", SYSTEMD_VIP_MASTER),
    )
}


def parsed(ctx: NodeContext) -> Any:
    return yaml.safe_load(render_user_data(ctx))


@pytest.mark.parametrize("name", sorted(NODES))
def test_user_data_reads_as_the_snapshot(name: str) -> None:
    expected = json.loads(SNAPSHOT.read_text())[name]
    assert parsed(NODES[name]) == expected


def write_snapshot() -> None:
    data = {name: parsed(ctx) for name, ctx in sorted(NODES.items())}
    SNAPSHOT.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_snapshot()
