"""domain_type = "auto": prove KVM works by booting a kernel under it (see virt/probe.py).

The answer is cached per boot of the host (keyed by /proc/sys/kernel/random/boot_id),
since whether KVM works does not change while the host runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import ProvisioningError
from hostagent.access import KVM_DEVICE, kvm_device
from hostagent.config import Config
from hostagent.errors import LibvirtUnavailable
from hostagent.images import ImageCatalog
from hostagent.virt.libvirt import Libvirt
from hostagent.virt.probe import MARKER, probe_xml

log = logging.getLogger(__name__)
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _probe_kernel(images: ImageCatalog) -> Path | None:
    image = images.get("lab")
    if image is not None:
        return image.kernel
    candidates = sorted(Path("/boot").glob("vmlinuz-*"))
    return candidates[-1] if candidates else None


@dataclass(frozen=True)
class DomainTypeChoice:
    domain_type: str
    reason: str  # for a person: GET /v1/host shows it, the log says it once


async def resolve_domain_type(
    config: Config, virt: Libvirt, images: ImageCatalog
) -> DomainTypeChoice:
    """kvm only when QEMU's user may open /dev/kvm, libvirt offers kvm and a kernel really
    boots under it; else qemu.

    Never raises for a KVM that does not work: that is what qemu is for. Only a proven
    answer is cached (per boot); a refusal may be gone after a fix and a libvirtd restart.
    """
    choice = await _choose(config, virt, images)
    level = (
        logging.WARNING if choice.domain_type == "qemu" and KVM_DEVICE.exists() else logging.INFO
    )
    log.log(level, "domain type: %s (%s)", choice.domain_type, choice.reason)
    return choice


async def _choose(config: Config, virt: Libvirt, images: ImageCatalog) -> DomainTypeChoice:
    wanted = config.libvirt.domain_type
    if wanted != "auto":
        return DomainTypeChoice(wanted, "configured")
    if not KVM_DEVICE.exists():
        return DomainTypeChoice("qemu", f"auto: no {KVM_DEVICE}")
    cache = config.state_dir / "kvm-probe.json"
    boot_id = BOOT_ID.read_text().strip()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id:
            return DomainTypeChoice(str(cached["domain_type"]), f"auto: probed ({cache})")
    except (OSError, ValueError):
        pass
    device = kvm_device(config.libvirt.qemu_user, KVM_DEVICE)
    if device.problem is not None:
        return DomainTypeChoice("qemu", f"auto: {device.problem}")
    refusal = await virt.offers_kvm()
    if refusal is not None:
        return DomainTypeChoice("qemu", f"auto: libvirt offers no kvm domain: {refusal}")
    kernel = _probe_kernel(images)
    if kernel is None:
        return DomainTypeChoice("qemu", "auto: no kernel to prove KVM with; build the lab image")
    try:
        booted = await kernel_boots(config, virt, kernel, "kvm")
    except LibvirtUnavailable:
        raise
    except ProvisioningError as exc:
        return DomainTypeChoice("qemu", f"auto: a kvm guest cannot even be created: {exc}")
    result = "kvm" if booted else "qemu"
    cache.write_text(json.dumps({"boot_id": boot_id, "domain_type": result}))
    verdict = "booted" if booted else "did not finish booting"
    return DomainTypeChoice(result, f"auto: a kernel under kvm {verdict}; cached until reboot")


async def kernel_boots(config: Config, virt: Libvirt, kernel: Path, domain_type: str) -> bool:
    """Whether kernel boots to its end as a `domain_type` guest within the probe timeout."""
    folder = config.state_dir / "probe"
    folder.mkdir(mode=0o711, exist_ok=True)
    console = folder / "console.log"
    console.unlink(missing_ok=True)
    name = await virt.run_transient(
        probe_xml(f"hostagent-probe-{os.getpid()}", kernel, console, domain_type)
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.libvirt.kvm_probe_timeout_s
    stopped = False
    while loop.time() < deadline and not stopped:
        stopped = not await virt.is_active(name)
        if not stopped:
            await asyncio.sleep(0.5)
    if not stopped:
        await virt.destroy(name)
    booted = stopped and console.exists() and MARKER in console.read_text(errors="replace")
    log.info(
        "probe: a kernel under %s %s within %.0fs",
        domain_type,
        "booted" if booted else "did not finish booting",
        config.libvirt.kvm_probe_timeout_s,
    )
    return booted
