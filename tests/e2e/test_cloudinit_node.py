"""A master rendered from the real templates, applied by real cloud-init in a real guest.

The `lab-cloudinit` image is Debian 12 with cloud-init 22.4, built offline with
debootstrap. The agent boots it through libvirt with the master's config drive; the
guest's cloud-init writes the files, formats and mounts etcd's disk, mounts the
certificate share, runs the commands and phones home with what it applied.

Kubernetes binaries cannot be had from the registries here: this proves that the
configuration is applied (files, modes, mounts, hostname, address, commands), not that
a kube-apiserver runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.configdrive import read_config_drive
from hostagent.client import Client
from network.names import bridge_name
from tests.conftest import require_libvirt
from tests.e2e.agent import Agent, cleanup

pytestmark = pytest.mark.e2e

CLUSTER = f"ci-{secrets.token_hex(3)}"
VNI = 300_000 + secrets.randbelow(100_000)
SUBNET = f"10.253.{secrets.randbelow(250)}"


def master_spec() -> dict[str, Any]:
    return {
        "role": "master",
        "vcpus": 1,
        "memory_mib": 768,
        "disk_gib": 4,
        "etcd_disk_gib": 1,
        "image": "lab-cloudinit",
        "kubernetes_version": "1.31.2",
        "network": {
            "vni": VNI,
            "address": f"{SUBNET}.11/24",
            "gateway": f"{SUBNET}.1",
            "mtu": 1450,
        },
        "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2e2etestkey test@ci"],
    }


@pytest.fixture(scope="module")
def agent(cloudinit_image_dir: Path) -> Iterator[Agent]:
    require_libvirt()
    agent = Agent(state_dir=Path("/var/lib/hostagent-e2e") / CLUSTER, image_dir=cloudinit_image_dir)
    try:
        yield agent
    finally:
        print(agent.log_tail())
        console = agent.state_dir / "nodes" / CLUSTER / "m1" / "console.log"
        if console.exists():
            print(console.read_text(errors="replace")[-6000:])
        cleanup(agent, [bridge_name(VNI)])


def test_cloud_init_applies_the_master_config(agent: Agent) -> None:
    client: Client = agent.start()
    pki = agent.state_dir / "nodes" / CLUSTER / "m1" / "pki"
    pki.mkdir(parents=True)
    (pki / "ca.crt").write_text("placed by the test\n")
    client.put_node(CLUSTER, "m1", master_spec())
    client.wait([(CLUSTER, "m1")], timeout_s=900, progress=print)
    guest = client.get_node(CLUSTER, "m1")["status"]["guest"]

    assert guest["hostname"] == "m1"
    assert any(a.startswith(f"{SUBNET}.11/24") for a in guest["addresses"]), guest["addresses"]
    assert guest["commands_ran"] is True
    assert guest["mounts"]["/etc/kubernetes/pki"] is True
    assert guest["mounts"]["/var/lib/etcd"] is True

    drive = read_config_drive(agent.state_dir / "nodes" / CLUSTER / "m1" / "cidata.iso")
    user_data = yaml.safe_load(drive["user-data"])
    wanted = {f["path"]: f.get("permissions", "0644") for f in user_data["write_files"]}
    assert len(wanted) > 10, "a master writes its manifests, kubeconfigs and units"
    reported = guest["files"]
    missing = sorted(set(wanted) - set(reported))
    assert not missing, f"files cloud-init did not write: {missing}"
    for path, mode in wanted.items():
        assert int(str(reported[path]), 8) == int(mode, 8), (path, reported[path], mode)
