"""/dev/kvm's permissions against a real libvirtd.

Where no udev gave /dev/kvm its group and mode, libvirt re-probes QEMU on every call
(20-150 s per define, docs/operations.md). scripts/setup-host.sh fixes that on the
machines the suite runs on; the first test shows the result. The others make this
machine such a host again for a moment (/dev/kvm root-only, restored afterwards, even on
failure) and show that the agent with the default domain_type = "auto" still starts on
qemu, says what is wrong and how to fix it, and that a kvm guest libvirt refuses for real
means qemu too.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import libvirt
import pytest

from hostagent.access import KVM_DEVICE, kvm_device
from hostagent.config import Config
from hostagent.images import ImageCatalog
from hostagent.kvmprobe import resolve_domain_type
from hostagent.virt.libvirt import Libvirt
from hostagent.virt.probe import probe_xml
from tests.conftest import require, require_libvirt
from tests.e2e.agent import Agent, cleanup, poll

pytestmark = pytest.mark.integration
QEMU_USER = "libvirt-qemu"


@pytest.fixture
async def virt() -> AsyncIterator[Libvirt]:
    require_libvirt()
    virt = Libvirt(
        "qemu:///system", workers=2, on_lifecycle=lambda _: None, on_reconnect=lambda: None
    )
    await virt.connect()
    yield virt
    await virt.close()


async def test_a_domain_is_defined_in_well_under_a_second(virt: Libvirt, tmp_path: Path) -> None:
    device = kvm_device(QEMU_USER)
    assert device.problem is None, f"the set-up left {device.problem}"
    await virt.offers_kvm()  # a libvirtd just restarted may probe QEMU once, here
    names = [f"hostagent-define-{os.getpid()}-{i}" for i in range(3)]
    timings = []
    try:
        for name in names:
            started = time.monotonic()
            await virt.define(probe_xml(name, tmp_path / "vmlinuz", tmp_path / "log", "qemu"))
            timings.append(time.monotonic() - started)
    finally:
        for name in names:
            if not await virt.is_active(name) and await _defined(virt, name):
                await virt.undefine(name)
    print("define took", ", ".join(f"{t * 1000:.0f} ms" for t in timings))
    assert max(timings) < 0.5, f"defines took {timings} s"


async def _defined(virt: Libvirt, name: str) -> bool:
    conn = libvirt.open(virt.uri)
    try:
        return name in conn.listDefinedDomains()
    finally:
        conn.close()


@pytest.fixture
def root_only_kvm() -> Iterator[None]:
    """/dev/kvm as a host without udev has it (root:root 0600), for the test's length."""
    require_libvirt()
    require(KVM_DEVICE.exists(), "needs /dev/kvm")
    info = KVM_DEVICE.stat()
    os.chown(KVM_DEVICE, 0, 0)
    KVM_DEVICE.chmod(0o600)
    try:
        yield
    finally:
        os.chown(KVM_DEVICE, info.st_uid, info.st_gid)
        KVM_DEVICE.chmod(stat.S_IMODE(info.st_mode))
        conn = libvirt.open("qemu:///system")
        try:  # libvirt probes QEMU once more now, not in the next test
            conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)
        finally:
            conn.close()


def test_serve_starts_with_auto_where_qemu_cannot_open_kvm(
    root_only_kvm: None, lab_image_dir: Path, tmp_path: Path
) -> None:
    """The default domain_type (auto), and a kernel to probe with: the agent starts on qemu."""
    state = Path("/var/lib/hostagent-e2e") / f"kvm-{tmp_path.name}"
    agent = Agent(state_dir=state, image_dir=lab_image_dir)
    agent.write_config(domain_type="auto")
    try:
        client = agent.start(timeout_s=300)
        host = poll(lambda: _decided(client.host()), 300, "the domain type to be decided")
        assert host["domain_type"] == "qemu"
        assert host["domain_type_reason"].startswith("auto: /dev/kvm is crw------- root:root")
        kvm = host["kvm_device"]
        assert kvm["present"] and not kvm["usable_by_qemu"]
        assert kvm["mode"] == "crw-------" and kvm["owner"] == "root:root"
        assert "cannot open it" in kvm["problem"]
        assert kvm["fix"].startswith("chgrp kvm /dev/kvm; chmod 660 /dev/kvm")
        metrics = httpx.get(f"http://127.0.0.1:{agent.api_port}/metrics").text
        assert "hostagent_kvm_device_unusable 1.0" in metrics
        assert 'hostagent_libvirt_call_duration_seconds_count{call="list"}' in (metrics)
        log = agent.log_path.read_text()
        assert "QEMU's user libvirt-qemu cannot open it" in log
        assert "domain type: qemu (auto: /dev/kvm is crw------- root:root" in log
        assert "libvirt:" not in log, "libvirt's own stderr copy of an error"
        assert "Traceback" not in log
        assert not (state / "kvm-probe.json").exists(), "a refusal must not be cached"
    finally:
        cleanup(agent, [])


def _decided(host: dict[str, object]) -> dict[str, object] | None:
    return host if host["domain_type"] is not None else None


async def test_a_kvm_guest_libvirt_cannot_create_means_qemu(
    root_only_kvm: None, virt: Libvirt, lab_image_dir: Path, tmp_path: Path
) -> None:
    """qemu_user set to root where libvirt really runs QEMU as libvirt-qemu (a configuration
    that disagrees with qemu.conf): the permission check passes, libvirt's kvm guest is
    refused for real, and the agent still decides on qemu without caching it."""
    config = Config.model_validate(
        {
            "state_dir": str(tmp_path),
            "image_dir": str(lab_image_dir),
            "libvirt": {"qemu_user": "root", "kvm_probe_timeout_s": 5},
        }
    )
    tmp_path.chmod(0o755)
    found = await resolve_domain_type(config, virt, ImageCatalog(config.images))
    assert found.domain_type == "qemu"
    assert found.reason.startswith("auto: a kvm guest cannot even be created: start probe domain")
    assert not (tmp_path / "kvm-probe.json").exists()
    assert not await virt.is_active(f"hostagent-probe-{os.getpid()}"), "probe domain left"
