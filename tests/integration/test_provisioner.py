"""Provisioner.prepare_files with the real parts it drives (local CA, qemu-img, pycdlib):
certificates, config drive and disks are made at once, and when one part fails the
others still run to their end before the error is raised (a retry never meets a part
still writing). Provisioner.ensure_networks with netlink and nft in a namespace: the
bridges, then the table that guards them."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from common.errors import ProvisioningError
from hostagent.certificates import make_backend
from hostagent.config import Config
from hostagent.images import ImageCatalog
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.networks import StaticPeers
from hostagent.provisioner import Provisioner
from hostagent.store import NodeRecord
from network.model import ClusterNetworkWanted
from network.netlink import Netlink
from network.nftables import NfTables
from pki import layout
from tests.conftest import require

pytestmark = pytest.mark.integration

SPEC = {
    "role": "master",
    "vcpus": 1,
    "memory_mib": 256,
    "disk_gib": 2,
    "image": "lab",
    "kubernetes_version": "1.31.2",
    "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
}


@pytest.fixture
def state() -> Iterator[Path]:
    require(os.geteuid() == 0, "needs root (the certificates are chowned to QEMU's user)")
    require(shutil.which("qemu-img") is not None, "needs qemu-utils")
    folder = Path(tempfile.mkdtemp(prefix="hostagent-prepare-", dir="/var/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


def provisioner(state: Path, image_dir: Path, template_dir: Path | None = None) -> Provisioner:
    settings: dict[str, object] = {"state_dir": str(state), "image_dir": str(image_dir)}
    if template_dir is not None:
        settings["cloudconfig"] = {"template_dir": str(template_dir)}
    config = Config.model_validate(settings)
    # Only files are made here: no libvirt, netlink, nft or peers are called.
    return Provisioner(
        config, ImageCatalog(image_dir), None, None, None, "qemu", None, make_backend(config), None
    )  # type: ignore[arg-type]


def record() -> NodeRecord:
    return NodeRecord(
        NodeKey(cluster="alpha", name="m1"),
        NodeSpec.model_validate(SPEC),
        "0123456789abcdef",
        Phase.PROVISIONING,
        "",
        "2026-12-02T00:00:00Z",
        False,
        None,
        None,
    )


async def test_every_part_is_made(state: Path, lab_image_dir: Path) -> None:
    p = provisioner(state, lab_image_dir)
    await p.prepare_files(record(), [])
    files = p.files(record().key)
    assert files.disk.exists() and files.etcd_disk.exists() and files.config_drive.exists()
    assert all((files.pki / name).is_file() for name in layout.files_for("master"))


async def test_a_failing_part_lets_the_others_finish(state: Path, lab_image_dir: Path) -> None:
    templates = state / "templates"
    (templates / "manifests").mkdir(parents=True)
    (templates / "manifests" / "etcd.yaml.j2").write_text("a: [unclosed\n")  # broken
    p = provisioner(state, lab_image_dir, templates)
    with pytest.raises(ProvisioningError, match="rendering the cloud-config failed"):
        await p.prepare_files(record(), [])
    files = p.files(record().key)
    assert not files.config_drive.exists()
    assert files.disk.exists() and files.etcd_disk.exists()
    assert not list(files.root.glob("*.partial")), "a disk was left half made"
    assert all((files.pki / name).is_file() for name in layout.files_for("master"))


async def test_ensure_networks_wires_the_bridge_then_its_table(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root (a network namespace)")
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    config = Config.model_validate({"state_dir": str(tmp_path), "host_id": "h1"})
    told: list[list[ClusterNetworkWanted]] = []

    async def on_networks(wanted: list[ClusterNetworkWanted]) -> None:
        told.append(wanted)

    name = f"hostagent-test-{uuid.uuid4().hex[:12]}"
    netns.create(name)
    try:
        tables = NfTables(netns=name)
        p = Provisioner(
            config,
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            Netlink(netns=name),
            tables,
            "qemu",
            on_networks,
            None,  # type: ignore[arg-type]
            StaticPeers(config.network),
        )
        await p.ensure_networks([record()])
        assert [c.bridge for c in told[-1]] == ["habr4242"]
        listing = tables.listing("h1") or ""
        port = config.phone_home.port
        assert f'iifname "habr4242" ip daddr 10.42.0.1 tcp dport {port} accept' in listing
        await p.ensure_networks([])  # the last node left: no bridge, no table
        assert told[-1] == [] and tables.listing("h1") is None
    finally:
        netns.remove(name)
