"""hostagent.virt.domain: the domain XML of a node, escaping, and reading our metadata back."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hostagent.virt.domain import METADATA_NS, DomainMeta, DomainParams, domain_xml, parse_meta

NS = {"h": METADATA_NS}
META = DomainMeta(cluster="alpha", node="m1", host="host-1", spec_hash="0123456789abcdef")
NODE = Path("/var/lib/hostagent/nodes/alpha/m1")
PARAMS = DomainParams(
    name="alpha-m1",
    domain_type="kvm",
    vcpus=2,
    memory_mib=2048,
    kernel=Path("/var/lib/hostagent/images/lab/vmlinuz"),
    initrd=Path("/var/lib/hostagent/images/lab/initrd.img"),
    cmdline="console=ttyS0 root=/dev/vda1",
    disk=NODE / "disk.qcow2",
    config_drive=NODE / "cidata.iso",
    pki_dir=NODE / "pki",
    pki_tag="hostagent-pki",
    console_log=NODE / "console.log",
    bridge="hak-4242",
    tap="hat-0123abcd",
    mac="52:54:00:12:34:56",
    mtu=1450,
    meta=META,
)
HOSTILE = "a\"b'c <d> & e ]]> f <!-- g --> <![CDATA[ h ]]> &amp; i"


def parsed(params: DomainParams = PARAMS) -> ET.Element:
    return ET.fromstring(domain_xml(params))


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path, NS)
    assert len(found) == 1, f"{path}: {len(found)} matches"
    return found[0]


def test_basic_shape() -> None:
    root = parsed()
    assert root.tag == "domain"
    assert root.get("type") == "kvm"
    assert one(root, "name").text == "alpha-m1"
    memory = one(root, "memory")
    assert (memory.text, memory.get("unit")) == ("2048", "MiB")
    assert one(root, "vcpu").text == "2"
    assert one(root, "on_poweroff").text == "destroy"


def test_direct_kernel_boot() -> None:
    os_el = one(parsed(), "os")
    assert one(os_el, "type").text == "hvm"
    assert one(os_el, "type").get("machine") == "q35"
    assert one(os_el, "kernel").text == str(PARAMS.kernel)
    assert one(os_el, "initrd").text == str(PARAMS.initrd)
    assert one(os_el, "cmdline").text == PARAMS.cmdline


def test_root_disk_is_virtio_vda_qcow2() -> None:
    disk = one(parsed(), "devices/disk[@device='disk']")
    assert disk.get("type") == "file"
    assert one(disk, "driver").get("type") == "qcow2"
    assert one(disk, "source").get("file") == str(PARAMS.disk)
    target = one(disk, "target")
    assert (target.get("dev"), target.get("bus")) == ("vda", "virtio")
    assert disk.find("readonly") is None


def test_config_drive_is_a_readonly_scsi_cdrom() -> None:
    root = parsed()
    cdrom = one(root, "devices/disk[@device='cdrom']")
    assert one(cdrom, "driver").get("type") == "raw"
    assert one(cdrom, "source").get("file") == str(PARAMS.config_drive)
    assert one(cdrom, "target").get("bus") == "scsi"
    one(cdrom, "readonly")
    assert one(root, "devices/controller[@type='scsi']").get("model") == "virtio-scsi"


def test_pki_share_is_a_readonly_9p_filesystem_with_the_tag() -> None:
    share = one(parsed(), "devices/filesystem")
    assert share.get("type") == "mount"
    assert share.get("accessmode") == "passthrough"
    # 9p is libvirt's default driver: no virtiofs driver element.
    driver = share.find("driver")
    assert driver is None or driver.get("type") != "virtiofs"
    assert one(share, "source").get("dir") == str(PARAMS.pki_dir)
    assert one(share, "target").get("dir") == "hostagent-pki"
    one(share, "readonly")


def test_bridge_interface() -> None:
    nic = one(parsed(), "devices/interface")
    assert nic.get("type") == "bridge"
    assert one(nic, "mac").get("address") == "52:54:00:12:34:56"
    assert one(nic, "source").get("bridge") == "hak-4242"
    assert one(nic, "target").get("dev") == "hat-0123abcd"
    assert one(nic, "model").get("type") == "virtio"
    assert one(nic, "mtu").get("size") == "1450"


def test_serial_console_is_logged() -> None:
    root = parsed()
    serial = one(root, "devices/serial")
    log = one(serial, "log")
    assert log.get("file") == str(PARAMS.console_log)
    assert log.get("append") == "on"
    assert one(root, "devices/console/target").get("type") == "serial"


def test_kvm_passes_the_host_cpu_through() -> None:
    assert one(parsed(), "cpu").get("mode") == "host-passthrough"


def test_qemu_has_no_host_passthrough_cpu() -> None:
    root = parsed(dataclasses.replace(PARAMS, domain_type="qemu"))
    assert root.get("type") == "qemu"
    assert root.find("cpu") is None
    assert "host-passthrough" not in domain_xml(dataclasses.replace(PARAMS, domain_type="qemu"))


# --- metadata ---------------------------------------------------------------------------------


def test_metadata_is_in_our_namespace() -> None:
    node = one(parsed(), "metadata/h:node")
    assert one(node, "h:cluster").text == "alpha"
    assert one(node, "h:node").text == "m1"
    assert one(node, "h:host").text == "host-1"
    assert one(node, "h:spec-hash").text == "0123456789abcdef"


def test_metadata_round_trips() -> None:
    assert parse_meta(domain_xml(PARAMS)) == META


def test_metadata_round_trips_after_libvirt_reformats_it() -> None:
    """libvirt re-serialises metadata with its own prefix and whitespace."""
    xml = f"""<domain type='kvm'>
      <name>alpha-m1</name>
      <metadata>
        <other:thing xmlns:other="https://example.org/other"><other:x>1</other:x></other:thing>
        <ha:node xmlns:ha="{METADATA_NS}">
          <ha:cluster>alpha</ha:cluster>
          <ha:node>m1</ha:node>
          <ha:host>host-1</ha:host>
          <ha:spec-hash>0123456789abcdef</ha:spec-hash>
        </ha:node>
      </metadata>
    </domain>"""
    assert parse_meta(xml) == META


@pytest.mark.parametrize("field", ["cmdline", "host"])
def test_hostile_values_are_escaped_and_round_trip(field: str) -> None:
    if field == "cmdline":
        params = dataclasses.replace(PARAMS, cmdline=HOSTILE)
    else:
        params = dataclasses.replace(PARAMS, meta=dataclasses.replace(META, host=HOSTILE))
    xml = domain_xml(params)
    assert HOSTILE not in xml  # escaped, not pasted
    assert "]]>" not in xml
    root = ET.fromstring(xml)  # still well-formed
    assert one(root, "os/cmdline").text == params.cmdline
    assert parse_meta(xml) == params.meta
    # Nothing leaked out as structure.
    assert root.find(".//d") is None
    assert len(root.findall("os/cmdline")) == 1


def test_hostile_values_in_paths_round_trip() -> None:
    weird = Path("/srv/a\"b'<c>&d")
    params = dataclasses.replace(PARAMS, disk=weird, pki_tag='t"<&>')
    root = parsed(params)
    assert one(root, "devices/disk[@device='disk']/source").get("file") == str(weird)
    assert one(root, "devices/filesystem/target").get("dir") == 't"<&>'


# --- foreign domains --------------------------------------------------------------------------

FOREIGN = [
    "<domain type='kvm'><name>theirs</name></domain>",
    "<domain type='kvm'><name>theirs</name><metadata/></domain>",
    "<domain><metadata><node xmlns='https://example.org/other'><cluster>a</cluster>"
    "<node>b</node><host>h</host><spec-hash>x</spec-hash></node></metadata></domain>",
    # ours, but a field is missing or empty
    f"<domain><metadata><h:node xmlns:h='{METADATA_NS}'><h:cluster>a</h:cluster>"
    "<h:node>b</h:node><h:host>h</h:host></h:node></metadata></domain>",
    f"<domain><metadata><h:node xmlns:h='{METADATA_NS}'><h:cluster>a</h:cluster>"
    "<h:node>b</h:node><h:host></h:host><h:spec-hash>x</h:spec-hash></h:node></metadata>"
    "</domain>",
    # ours, but not under <metadata>
    f"<domain><h:node xmlns:h='{METADATA_NS}'><h:cluster>a</h:cluster>"
    "<h:node>b</h:node><h:host>h</h:host><h:spec-hash>x</h:spec-hash></h:node></domain>",
    "<domain><metadata>",
    "not xml at all",
    "",
]


@pytest.mark.parametrize("xml", FOREIGN)
def test_parse_meta_ignores_foreign_domains(xml: str) -> None:
    assert parse_meta(xml) is None


def test_data_disks_are_virtio_with_their_serial() -> None:
    from dataclasses import replace

    from hostagent.virt.domain import DataDisk

    params = replace(PARAMS, data_disks=(DataDisk(Path("/n/etcd.qcow2"), "vdb", "etcd"),))
    root = ET.fromstring(domain_xml(params))
    disks = root.findall("devices/disk[@device='disk']")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    etcd = disks[1]
    assert etcd.find("source").get("file") == "/n/etcd.qcow2"  # type: ignore[union-attr]
    assert etcd.findtext("serial") == "etcd"
    assert etcd.find("backingStore") is None
    assert ET.fromstring(domain_xml(PARAMS)).findall("devices/disk[@device='disk']")[1:] == []
