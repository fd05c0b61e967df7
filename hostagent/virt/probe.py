"""Pure: the domain that proves a KVM guest really runs.

/dev/kvm can exist while KVM guests hang (on this project's CI machines a boot sector
runs under KVM but a Linux kernel never gets through its boot), so `domain_type = "auto"`
boots a real kernel as a KVM guest with no root filesystem. A kernel that runs to the
end of its boot panics ("VFS: Unable to mount root fs"), and with panic=-1 reboots at
once, which on_reboot=destroy turns into the domain stopping by itself. Stopping within
the probe's timeout with the panic line in the serial log proves KVM works.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

MARKER = "Kernel panic"


def probe_xml(name: str, kernel: Path, log: Path, domain_type: str = "kvm") -> str:
    root = ET.Element("domain", {"type": domain_type})
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", {"unit": "MiB"}).text = "128"
    ET.SubElement(root, "vcpu").text = "1"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64"}).text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1"
    ET.SubElement(root, "on_reboot").text = "destroy"
    devices = ET.SubElement(root, "devices")
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": str(log)})
    return ET.tostring(root, encoding="unicode")
