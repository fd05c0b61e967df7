"""domain_type = "auto" against real libvirtd: the probe's detection and its cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hostagent.config import Config
from hostagent.images import ImageCatalog
from hostagent.kvmprobe import kernel_boots, resolve_domain_type
from hostagent.virt.libvirt import Libvirt
from tests.conftest import require_libvirt

pytestmark = pytest.mark.integration


@pytest.fixture
def config(lab_image_dir: Path) -> Iterator[Config]:
    require_libvirt()
    state = Path(tempfile.mkdtemp(prefix="hostagent-probe-", dir="/var/tmp"))
    state.chmod(0o711)
    yield Config.model_validate(
        {
            "state_dir": str(state),
            "image_dir": str(lab_image_dir),
            "libvirt": {"kvm_probe_timeout_s": 12},
        }
    )
    shutil.rmtree(state)


@pytest.fixture
async def virt() -> AsyncIterator[Libvirt]:
    virt = Libvirt(
        "qemu:///system", workers=2, on_lifecycle=lambda _: None, on_reconnect=lambda: None
    )
    await virt.connect()
    yield virt
    await virt.close()


async def test_a_kernel_that_boots_is_detected(config: Config, virt: Libvirt) -> None:
    """The detection itself, under TCG, where a kernel is known to boot here."""
    image = ImageCatalog(config.images).get("lab")
    assert image is not None
    assert await kernel_boots(config, virt, image.kernel, "qemu")
    assert "Kernel panic" in (config.state_dir / "probe" / "console.log").read_text()


async def test_auto_resolves_and_caches_per_boot(config: Config, virt: Libvirt) -> None:
    first = (await resolve_domain_type(config, virt, ImageCatalog(config.images))).domain_type
    assert first in ("kvm", "qemu")
    if Path("/dev/kvm").exists():
        assert (config.state_dir / "kvm-probe.json").exists()
    started = time.monotonic()
    again = await resolve_domain_type(config, virt, ImageCatalog(config.images))
    assert again.domain_type == first
    if Path("/dev/kvm").exists():
        assert again.reason.startswith("auto: probed")
    assert time.monotonic() - started < 1.0, "the second answer must come from the cache"
    assert not await virt.is_active(f"hostagent-probe-{os.getpid()}"), "probe domain left"
