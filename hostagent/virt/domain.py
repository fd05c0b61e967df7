"""Pure: the libvirt domain XML of a node, and reading our metadata back (DomainInfo).

Built with ElementTree so every user-supplied value is escaped by the serializer; no
string concatenation of user values.

The certificate directory is shared with 9p (virtio-9p), not virtiofs: virtiofs needs
shared memory backing for the whole guest (memfd, which changes the memory accounting
and rules out some overcommit setups) and one virtiofsd process per VM, and libvirt 9.0
(Debian 12) cannot make a virtiofs share read-only. 9p needs nothing on the host, honours
<readonly/>, and its slowness does not matter for a handful of small PEM files that are
read at start and on rotation.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

METADATA_NS = "https://hostagent.dev/xmlns/node/1"
METADATA_PREFIX = "hostagent"
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class DomainMeta:
    """What the agent records in every domain it owns."""

    cluster: str
    node: str
    host: str
    spec_hash: str


@dataclass(frozen=True)
class DomainInfo:
    """One of our domains as libvirt reports it: our metadata, whether it runs, its id."""

    name: str
    meta: DomainMeta
    running: bool
    domain_id: int | None


@dataclass(frozen=True)
class DataDisk:
    """A disk of its own beside the root overlay; the guest finds it by serial
    (/dev/disk/by-id/virtio-<serial>), whatever order the kernel probes disks in."""

    path: Path
    target: str
    serial: str


@dataclass(frozen=True)
class DomainParams:
    name: str
    domain_type: str
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path
    config_drive: Path
    pki_dir: Path
    pki_tag: str
    console_log: Path
    bridge: str
    tap: str
    mac: str
    mtu: int
    meta: DomainMeta
    data_disks: tuple[DataDisk, ...] = ()


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def domain_xml(p: DomainParams) -> str:
    root = ET.Element("domain", {"type": p.domain_type})
    _sub(root, "name", p.name)
    _metadata(root, p.meta)
    _sub(root, "memory", str(p.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(p.vcpus))
    _os(root, p)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if p.domain_type == "kvm":
        _sub(root, "cpu", mode="host-passthrough")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    _devices(root, p)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def _metadata(root: ET.Element, meta: DomainMeta) -> None:
    node = _sub(_sub(root, "metadata"), f"{{{METADATA_NS}}}node")
    for field in ("cluster", "node", "host", "spec_hash"):
        _sub(node, f"{{{METADATA_NS}}}{field.replace('_', '-')}", getattr(meta, field))


def _os(root: ET.Element, p: DomainParams) -> None:
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_el, "kernel", str(p.kernel))
    _sub(os_el, "initrd", str(p.initrd))
    _sub(os_el, "cmdline", p.cmdline)


def _devices(root: ET.Element, p: DomainParams) -> None:
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(disk, "source", file=str(p.disk))
    _sub(disk, "target", dev="vda", bus="virtio")
    for data in p.data_disks:
        element = _sub(devices, "disk", type="file", device="disk")
        _sub(element, "driver", name="qemu", type="qcow2", discard="unmap")
        _sub(element, "source", file=str(data.path))
        _sub(element, "target", dev=data.target, bus="virtio")
        _sub(element, "serial", data.serial)

    _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    cdrom = _sub(devices, "disk", type="file", device="cdrom")
    _sub(cdrom, "driver", name="qemu", type="raw")
    _sub(cdrom, "source", file=str(p.config_drive))
    _sub(cdrom, "target", dev="sda", bus="scsi")
    _sub(cdrom, "readonly")

    share = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
    _sub(share, "source", dir=str(p.pki_dir))
    _sub(share, "target", dir=p.pki_tag)
    _sub(share, "readonly")

    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "mac", address=p.mac)
    _sub(nic, "source", bridge=p.bridge)
    _sub(nic, "target", dev=p.tap)
    _sub(nic, "model", type="virtio")
    _sub(nic, "mtu", size=str(p.mtu))

    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(p.console_log), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")

    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")


def parse_meta(xml: str) -> DomainMeta | None:
    """Our metadata from a domain's XML; None for domains the agent does not own."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    node = root.find(f"metadata/{{{METADATA_NS}}}node")
    if node is None:
        return None
    values = {}
    for field in ("cluster", "node", "host", "spec_hash"):
        element = node.find(f"{{{METADATA_NS}}}{field.replace('_', '-')}")
        if element is None or not element.text:
            return None
        values[field] = element.text
    return DomainMeta(**values)
