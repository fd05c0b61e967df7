"""The serial console of a real domain (libvirtd, QEMU under TCG, the lab image's kernel):
the node's domain XML makes libvirt log the console through virtlogd (which rotates it by
size) into the node's folder; a kernel that panics at boot shows in GET .../console within
its bounds, and the boot timeout puts the panic into the node's Failed message.

Boots one small VM for a few seconds: run it under `flock /tmp/lab.lock`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hostagent import console
from hostagent.api import api_app
from hostagent.bootwatch import BootWatch
from hostagent.capacity import Resources
from hostagent.config import Config
from hostagent.images import ImageCatalog
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.nodes import NodeService
from hostagent.store import Store
from hostagent.virt.domain import DomainMeta, DomainParams, domain_xml
from tests.conftest import require_libvirt

pytestmark = pytest.mark.integration

TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# No init in the initramfs and no root disk: the kernel panics, and (panic=0) stays there.
PANIC = "console=ttyS0 rdinit=/no-such-init root=/dev/no-such-disk panic=0"
SPEC = NodeSpec.model_validate(
    {
        "role": "worker",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 1,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
    }
)


@pytest.fixture
def state() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="hostagent-console-", dir="/var/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder)


@dataclass
class Booted:
    key: NodeKey
    name: str
    log: Path
    store: Store
    config: Config


def node_xml(lab: Path, folder: Path, log: Path, name: str, key: NodeKey) -> str:
    """The agent's domain XML for the node, without its network interface (a cluster
    bridge is not what this test is about)."""
    disk = folder / "disk.qcow2"
    base = str(lab / "disk.qcow2")
    command = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(disk)]
    subprocess.run(command, check=True)
    (folder / "cidata.iso").touch()
    (folder / "pki").mkdir()
    params = DomainParams(
        name=name,
        domain_type="qemu",
        vcpus=1,
        memory_mib=256,
        kernel=lab / "vmlinuz",
        initrd=lab / "initrd.img",
        cmdline=PANIC,
        disk=disk,
        config_drive=folder / "cidata.iso",
        pki_dir=folder / "pki",
        pki_tag="pki",
        console_log=log,
        bridge="unused",
        tap="unused",
        mac="52:54:00:00:00:01",
        mtu=1450,
        meta=DomainMeta(key.cluster, key.name, "console-test", "0"),
    )
    root = ET.fromstring(domain_xml(params))
    devices = root.find("devices")
    assert devices is not None
    for interface in devices.findall("interface"):
        devices.remove(interface)
    return ET.tostring(root, encoding="unicode")


@pytest.fixture
async def booted(lab_image_dir: Path, state: Path) -> AsyncIterator[Booted]:
    require_libvirt()
    key = NodeKey(cluster="console", name=f"n{secrets.token_hex(4)}")
    config = Config.model_validate({"host_id": "console-test", "state_dir": str(state)})
    log = console.log_path(config.nodes_dir, key)
    folder = log.parent
    folder.mkdir(parents=True)
    for directory in (config.nodes_dir, folder.parent, folder):
        directory.chmod(0o711)
    name = f"images16-console-{key.name}"
    store = Store(config.database)
    conn = libvirt.open("qemu:///system")
    try:
        conn.createXML(node_xml(lab_image_dir / "lab", folder, log, name, key), 0)
        yield Booted(key, name, log, store, config)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).destroy()  # transient: destroyed is gone
        conn.close()
        store.close()


def qemu_command_line(name: str) -> str:
    pid = Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def test_a_kernel_panic_shows_in_the_console_and_the_failed_message(
    booted: Booted,
) -> None:
    # virtlogd, not QEMU, writes the file (QEMU gets it as a passed descriptor): it is
    # virtlogd that rotates it by size.
    assert "logfile=/dev/fdset/" in qemu_command_line(booted.name)
    deadline = time.monotonic() + 180
    while b"Kernel panic" not in console.tail(booted.log, console.MAX_TAIL_BYTES):
        assert time.monotonic() < deadline, console.tail(booted.log, 2000)
        await asyncio.sleep(0.5)

    await booted.store.create(booted.key, SPEC, "token")
    physical = Resources(vcpus=8, memory_mib=8192, disk_gib=100)
    catalog = ImageCatalog(booted.config.images)
    service = NodeService(booted.config, booted.store, catalog, physical, lambda _key: None)
    nothing: Any = None
    app = api_app(
        service,
        TOKEN,
        peers=nothing,
        host_info=nothing,
        healthy=nothing,
        metrics_text=nothing,
        images=nothing,
    )
    path = f"/v1/clusters/{booted.key.cluster}/nodes/{booted.key.name}/console"
    async with TestClient(TestServer(app)) as client:
        whole = await client.get(path, headers=AUTH)
        assert whole.status == 200
        assert "Linux version" in await whole.text()
        assert "Kernel panic" in await whole.text()
        tail = await client.get(path, params={"tail_bytes": "300"}, headers=AUTH)
        assert len(await tail.read()) == 300
        too_much = await client.get(
            path, params={"tail_bytes": str(console.MAX_TAIL_BYTES + 1)}, headers=AUTH
        )
        assert too_much.status == 400

    await booted.store.set_phase(booted.key, Phase.RUNNING, "")
    watch = BootWatch(booted.store, booted.config.nodes_dir, 60, 10, list, clock=lambda: 1e10)
    assert await watch.check() == [booted.key]
    record = booted.store.get(booted.key)
    assert record is not None and record.phase is Phase.FAILED
    assert "did not phone home within 60s" in record.message
    assert "Kernel panic - not syncing" in record.message
    assert "\x1b" not in record.message and "\r" not in record.message
    json.dumps(record.message)  # plain text, fit for any client
