"""The domain XML of the image boot tests (tests/integration/test_labimage.py and
test_cloudinit_image.py): a transient TCG guest booting an image's kernel directly, with
its overlay disk, an optional cidata ISO, a read-only 9p share, one NIC on a test bridge
and its console in a file. Not the agent's domain (hostagent.virt.domain): these tests
check the images themselves, with nothing of the agent in between."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GuestXml:
    name: str
    memory_mib: int
    image: Path  # the image directory, with image.json's kernel, initrd and cmdline
    meta: dict[str, str]  # image.json
    overlay: Path
    iso: Path | None  # the cidata ISO; None boots without a config drive
    share: Path
    share_tag: str
    share_access: str  # libvirt's accessmode: squash or passthrough
    mac: str
    bridge: str
    console: Path


def guest_xml(g: GuestXml) -> str:
    cdrom = (
        f"""
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{g.iso}'/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>"""
        if g.iso is not None
        else ""
    )
    return f"""
<domain type='qemu'>
  <name>{g.name}</name>
  <memory unit='MiB'>{g.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{g.image / g.meta["kernel"]}</kernel>
    <initrd>{g.image / g.meta["initrd"]}</initrd>
    <cmdline>{g.meta["cmdline"]}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{g.overlay}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'/>{cdrom}
    <filesystem type='mount' accessmode='{g.share_access}'>
      <source dir='{g.share}'/>
      <target dir='{g.share_tag}'/>
      <readonly/>
    </filesystem>
    <interface type='bridge'>
      <mac address='{g.mac}'/>
      <source bridge='{g.bridge}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{g.console}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{g.console}'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"""
