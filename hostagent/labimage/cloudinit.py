"""Builds the "lab-cloudinit" guest image: a real Debian 12 with cloud-init 22.4.

Where the "lab" image fakes a guest with a busybox /init, this one is a minimal Debian
tree made by debootstrap from the mirror this host's apt uses, so the config drive is
applied by the real cloud-init. The image folder (``<image_dir>/lab-cloudinit``) holds
``vmlinuz`` and ``initrd.img`` (Debian's kernel and the initramfs its install
generated), ``disk.qcow2`` (the tree as a whole-disk ext4 labelled ``root``, the base
of node overlays) and, written last and atomically, ``image.json``.

The tree is tuned to boot fast under TCG: the network is rendered for systemd-networkd
(static addresses are up as soon as the link is, no DHCP, no ifupdown scripts), and
timers and services useless in a disposable lab VM are masked. Debian's etcd-server and
keepalived are installed but disabled: a master's cloud-config runs them (etcd_mode
"systemd", the cluster's VIP).

As for "lab" (skeleton.py): the build runs in a temp folder next to the target and is
renamed into place, under a lock, and is skipped when image.json carries the same recipe
hash. The hash covers what decides the content (packages, suite, files written, units,
cmdline, recipe version) but not the mirror URL, which differs between hosts serving the
same packages. The tree's steps (mirror, debootstrap, units) are debian.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hostagent.labimage.debian import (
    APT_CACHES,
    apt_mirror,
    debootstrap,
    probe_mirror,
    remove_globs,
    set_units,
    write_files,
)
from hostagent.labimage.skeleton import (
    build_in_place,
    kernel_release,
    remove_work,
    require_tools,
    run,
    timed,
    write_image_json,
)

RECIPE_VERSION = 3
IMAGE_NAME = "lab-cloudinit"
SUITE = "bookworm"
# Root is the whole disk (no partition table): cloud-init's resizefs grows it in place
# when a node's overlay is bigger than the base. net.ifnames=0 names the only NIC eth0,
# as the network-config's set-name does anyway, without waiting for a udev rename.
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 loglevel=4"
HEADROOM = 1.3  # free space in the base file system, as a factor of the tree's size
SIZE_STEP = 256 << 20  # the base disk's size is rounded up to this

PACKAGES: tuple[str, ...] = (
    "systemd-sysv",  # init
    "udev",  # device nodes, module autoloading (9p, cdrom, NIC)
    "kmod",  # modprobe for udev and the initramfs hooks
    "linux-image-amd64",  # the kernel; its install generates the initramfs
    "cloud-init",
    "python3-cffi-backend",  # debootstrap does not resolve python3-cryptography's virtual dep
    "iproute2",  # `ip`; also what cloud-init's networkd renderer checks for
    "e2fsprogs",  # resize2fs for cloud-init's resizefs
    "curl",  # phone-home from runcmd
    "ca-certificates",
    # A master's control plane without a container runtime (docs/cloudconfig.md, "etcd
    # as a systemd unit"): Debian's etcd (3.4) and keepalived for the cluster's VIP.
    "etcd-server",
    "keepalived",
)

_CLOUD_CFG = """\
# hostagent lab image: the config drive is the only data source.
datasource_list: [NoCloud, None]
system_info:
  network:
    # systemd-networkd brings static addresses up without any DHCP or ifupdown
    # scripts: the fastest renderer under TCG (ifupdown is not even installed).
    renderers: [networkd]
# The root file system is the whole disk /dev/vda: there is no partition to grow,
# resizefs alone grows the file system to the size of the node's overlay.
growpart:
  mode: "off"
resize_rootfs: true
# No SSH server is installed: generating host keys only fails, four times.
ssh_genkeytypes: []
"""

_WAIT_ONLINE_DROPIN = """\
# Only eth0 is managed: be online as soon as any link is, and never block the boot
# for the default two minutes when the network-config is wrong.
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
"""

# The lab networks are IPv4 only: without this networkd keeps eth0 "configuring" until
# its router solicitations time out (12 s), and wait-online with it. cloud-init's
# networkd renderer writes 10-cloud-init-<name>.network; the network-config names the
# node's NIC eth0 (set-name).
_NO_IPV6_RA_DROPIN = """\
[Network]
IPv6AcceptRA=no
"""

# Files written into the tree, relative to its root.
FILES: dict[str, str] = {
    "etc/cloud/cloud.cfg.d/90-hostagent.cfg": _CLOUD_CFG,
    "etc/fstab": "# The root file system is the whole disk; VMs are disposable: no fsck.\n"
    "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 0\n",
    "etc/machine-id": "",  # empty: systemd makes a new one on each VM's first boot
    "etc/hostname": "localhost\n",  # cloud-init sets the node's
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",  # debootstrap copied the build host's
    # A locale that needs no locale-gen, which takes minutes under TCG.
    "etc/default/locale": "LANG=C.UTF-8\n",
    "etc/systemd/system/systemd-networkd-wait-online.service.d/10-hostagent.conf": (
        _WAIT_ONLINE_DROPIN
    ),
    "etc/systemd/network/10-cloud-init-eth0.network.d/10-hostagent.conf": _NO_IPV6_RA_DROPIN,
}

# Units enabled by symlinks in the tree (no chroot, no systemctl): "wants dir" -> units.
ENABLED: dict[str, tuple[str, ...]] = {
    "multi-user.target.wants": ("systemd-networkd.service",),
    "sockets.target.wants": ("systemd-networkd.socket",),
    "network-online.target.wants": ("systemd-networkd-wait-online.service",),
}

# Units masked (symlinked to /dev/null): slow or useless in a disposable lab VM.
MASKED: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",  # nobody looks at the VGA console; the serial getty stays
    "systemd-pstore.service",
    "cloud-init-hotplugd.socket",  # NICs are never hot-plugged into node VMs
    "getty-static.service",  # starts gettys on tty2-6 when there is no dbus (none here)
    "systemd-binfmt.service",  # no foreign binary formats
    "proc-sys-fs-binfmt_misc.automount",
)

# Units their packages enable that must not start on every boot: a master's cloud-config
# writes its own etcd.service and keepalived.service (same names, so they replace
# Debian's) and enables them; a worker runs neither. Disabling also drops etcd's alias
# etcd2.service, which would name Debian's unit beside the master's.
DISABLED: tuple[str, ...] = ("etcd.service", "keepalived.service")

# Host tools the build runs: (name, Debian package).
TOOLS: tuple[tuple[str, str], ...] = (
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
)

# Removed from the tree: downloaded .debs and package lists (apt-get update refetches).
REMOVED_GLOBS: tuple[str, ...] = APT_CACHES


def build_cloudinit_image(
    image_dir: Path, *, force: bool = False, progress: Callable[[str], None] = print
) -> Path:
    """Build (or reuse) the image ``lab-cloudinit`` in ``image_dir`` and return its folder."""
    recipe = recipe_hash()

    def prepare() -> Callable[[Path], None]:
        tools = require_tools(IMAGE_NAME, "debootstrap chroots", TOOLS)
        mirror = apt_mirror(SUITE)
        probe_mirror(mirror, SUITE)
        return lambda work: _build(work, recipe, mirror, tools, timed(IMAGE_NAME, progress))

    return build_in_place(
        image_dir / IMAGE_NAME, recipe, prepare, label=IMAGE_NAME, force=force, progress=progress
    )


def recipe_hash() -> str:
    """The sha256 (hex) of everything that determines the image's content."""
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "packages": list(PACKAGES),
        "files": FILES,
        "enabled": {wants: list(units) for wants, units in ENABLED.items()},
        "masked": list(MASKED),
        "disabled": list(DISABLED),
        "removed": list(REMOVED_GLOBS),
        "cmdline": CMDLINE,
        "headroom": HEADROOM,
        "size_step": SIZE_STEP,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# --- build steps ----------------------------------------------------------------------


def _build(
    work: Path, recipe: str, mirror: str, tools: dict[str, str], progress: Callable[[str], None]
) -> None:
    """Fill ``work`` with a complete image; image.json last."""
    tree = work / ".tree"
    progress(f"debootstrap {SUITE} from {mirror} ({len(PACKAGES)} packages and their deps)")
    debootstrap(tools["debootstrap"], tree, mirror, SUITE, PACKAGES)
    progress("debootstrap done")
    progress("configuring the tree (cloud-init, networkd, fstab, masked units)")
    configure_tree(tree)
    release = _copy_boot_files(tree, work)
    progress(f"kernel {release}: copied vmlinuz and initrd.img")
    raw = work / ".root.raw"
    size = _make_filesystem(tools["mkfs.ext4"], tree, raw, progress)
    remove_work(tree)
    progress(f"converting the {size >> 20} MiB root file system to disk.qcow2")
    run([tools["qemu-img"], "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
    raw.unlink()
    progress("writing image.json")
    write_image_json(work, IMAGE_NAME, CMDLINE, recipe)


def configure_tree(tree: Path) -> None:
    """Write the recipe's files, enable and mask its units, drop caches (no chroot)."""
    write_files(tree, FILES)
    set_units(tree, ENABLED, MASKED, DISABLED)
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    remove_globs(tree, REMOVED_GLOBS)


def _copy_boot_files(tree: Path, work: Path) -> str:
    """Copy the tree's kernel and initramfs out; the kernel release."""
    release = kernel_release(tree, "the tree")
    initrd = tree / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise RuntimeError(f"the kernel install generated no {initrd.name} (initramfs-tools?)")
    shutil.copyfile(tree / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")
    return release


def tree_bytes(tree: Path) -> int:
    """The space the tree's files take (allocated blocks, hard links counted once)."""
    seen: set[int] = set()
    total = 0
    for root, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(root, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def filesystem_size(used: int) -> int:
    """The base file system's size: ``used`` plus headroom, rounded up to SIZE_STEP."""
    wanted = int(used * HEADROOM)
    return -(-wanted // SIZE_STEP) * SIZE_STEP


def _make_filesystem(mkfs: str, tree: Path, raw: Path, progress: Callable[[str], None]) -> int:
    """``mkfs.ext4 -d tree`` into a sparse raw file; its size in bytes."""
    used = tree_bytes(tree)
    size = filesystem_size(used)
    progress(f"mkfs.ext4 -d: tree {used >> 20} MiB, file system {size >> 20} MiB")
    with raw.open("wb") as f:
        f.truncate(size)
    run([mkfs, "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(tree), str(raw)])
    return size
