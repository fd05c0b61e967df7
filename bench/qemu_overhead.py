"""QEMU's memory overhead per VM: resident memory beyond the guest's own RAM.

Boots lab VMs with their memory preallocated (so all guest RAM is resident), waits until
the guest is up and QEMU's RSS has settled, and prints RSS - memory for several sizes
with a least-squares line through them: the figures behind capacity.qemu_overhead_*.
Run as root with libvirtd up:  .venv/bin/python -m bench.qemu_overhead
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import psutil

from cloudconfig.configdrive import build_config_drive
from hostagent.images import ImageCatalog
from hostagent.labimage.build import build_lab_image
from hostagent.virt import disk
from hostagent.virt.domain import DomainMeta, DomainParams, domain_xml
from tests.conftest import IMAGE_CACHE

MIB = 2**20


def preallocated_xml(params: DomainParams) -> str:
    root = ET.fromstring(domain_xml(params))
    backing = ET.Element("memoryBacking")
    ET.SubElement(backing, "allocation", {"mode": "immediate"})
    root.insert(3, backing)
    devices = root.find("devices")
    assert devices is not None
    for tag in ("interface", "filesystem"):  # not needed to measure memory
        for element in devices.findall(tag):
            devices.remove(element)
    return ET.tostring(root, encoding="unicode")


def settled_rss(pid: int, console: Path, timeout_s: float = 120) -> int:
    """RSS once the guest's init runs and RSS moved less than 1 MiB over 3 s."""
    process = psutil.Process(pid)
    samples: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples.append(process.memory_info().rss)
        booted = console.exists() and "hostagent-lab: starting" in console.read_text(
            "utf-8", "replace"
        )
        if booted and len(samples) >= 7 and max(samples[-7:]) - min(samples[-7:]) < MIB:
            return samples[-1]
        time.sleep(0.5)
    raise TimeoutError("QEMU's RSS did not settle")


def measure(conn: libvirt.virConnect, memory_mib: int, work: Path, domain_type: str) -> int:
    image = ImageCatalog(IMAGE_CACHE).get("lab")
    assert image is not None
    name = f"overhead-{secrets.token_hex(3)}"
    folder = work / name
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    build_config_drive(folder / "cidata.iso", {"meta-data": b"instance-id: x\n"})
    import asyncio

    asyncio.run(disk.ensure_overlay(folder / "disk.qcow2", image.disk, 2, timeout_s=120.0))
    params = DomainParams(name, domain_type, 1, memory_mib, image.kernel, image.initrd,
                          image.cmdline, folder / "disk.qcow2", folder / "cidata.iso", folder,
                          "none", folder / "console.log", "none", "none", "52:54:00:00:00:01",
                          1500, DomainMeta("bench", name, "bench", "x"))  # fmt: skip
    dom = conn.createXML(preallocated_xml(params), 0)
    try:
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        return settled_rss(pid, folder / "console.log") // MIB - memory_mib
    finally:
        dom.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,512,1024,2048,4096")
    parser.add_argument("--domain-type", default="qemu", choices=["qemu", "kvm"])
    args = parser.parse_args()
    build_lab_image(IMAGE_CACHE, progress=lambda _: None)
    sizes = [int(s) for s in args.sizes.split(",")]
    conn = libvirt.open("qemu:///system")
    with tempfile.TemporaryDirectory(prefix="hostagent-overhead-", dir="/var/tmp") as tmp:
        Path(tmp).chmod(0o755)
        overheads = [measure(conn, size, Path(tmp), args.domain_type) for size in sizes]
    conn.close()
    print(f"QEMU overhead ({args.domain_type}): resident memory beyond the guest's RAM")
    for size, overhead in zip(sizes, overheads, strict=True):
        print(f"  memory_mib {size:6d}: overhead {overhead:5d} MiB")
    slope, intercept = statistics.linear_regression([s / 1024 for s in sizes], overheads)
    print(f"  fit: {intercept:.0f} MiB + {slope:.1f} MiB per GiB of guest memory")
    print(f"  max observed: {max(overheads)} MiB")


if __name__ == "__main__":
    main()
