"""Pure: the /etc/libvirt of a lab host (bind-mounted over the shared one inside it).

/etc is shared by every host on the machine, and libvirt keeps persistent domains, networks
and storage pools under /etc/libvirt: without a directory of its own, a domain defined in
h1 would be written where the root namespace's libvirtd and every other host read it.

Where a setting differs from libvirt's default, the reason is that the hosts share one
kernel and one filesystem:
- cgroup_controllers = []: every libvirtd would put its QEMUs in the same cgroup tree,
  under machine/qemu-<id>-<name>, and ids restart at 1 in every daemon, so two hosts
  would share (and remove) each other's cgroups. The lab does not need the limits.
- remember_owner = 0: libvirt counts the users of an image in trusted.libvirt.security.*
  xattrs of the file. The hosts share the base images with each other and with the root
  namespace's libvirtd, and a host killed mid-run never decrements its counts, which
  later fails domain starts elsewhere ("Setting different DAC user or group ... already in
  use", see docs/operations.md). The files are still chowned to the QEMU user.
The logs go to /var/log/libvirt, which is the host's log directory inside the host.
"""

from __future__ import annotations

QEMU_CONF = """\
# Written by hostagent lab for this host; rewritten at every start.
cgroup_controllers = [ ]
remember_owner = 0
"""

LIBVIRTD_CONF = """\
# Written by hostagent lab for this host; rewritten at every start.
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

VIRTLOGD_CONF = """\
# Written by hostagent lab for this host; rewritten at every start.
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"""

# The directories libvirtd keeps persistent objects in; made so it never has to.
DIRECTORIES = ("qemu", "qemu/networks", "storage", "secrets", "nwfilter")


def libvirt_files() -> dict[str, str]:
    """File name (relative to /etc/libvirt) -> content."""
    return {"qemu.conf": QEMU_CONF, "libvirtd.conf": LIBVIRTD_CONF, "virtlogd.conf": VIRTLOGD_CONF}
