"""Builds the Vagrant box ``hostagent/debian12`` (vagrant-libvirt) offline, from Debian's packages.

Run it through ``vagrant/build-box.sh`` (as root). The box is a plain tar of
``metadata.json``, ``box.img`` (qcow2) and ``Vagrantfile``; it is built in a cache
folder (default /var/cache/hostagent-test/vagrant, ``HOSTAGENT_VAGRANT_CACHE``) keyed by
the recipe hash, then linked (or copied) to ``vagrant/hostagent-debian12.box``.

box.img is a real bootable disk, as vagrant-libvirt expects: an MBR with Syslinux's
boot code and one ext4 partition holding the debootstrap tree, made bootable by the
tree's own ``extlinux --install``. Everything but that step is done without mounting
(``sfdisk`` on a file, ``mkfs.ext4 -d -E offset=``); extlinux must see a mounted file
system, so that one step mounts the partition through a loop device (``losetup
--offset``), the only privileged device the build uses.

The build's frame (lock, recipe cache, tool checks, temp folder + rename, clean-up)
is the lab images' (``hostagent.labimage.skeleton``), and so are the Debian tree's
steps (``hostagent.labimage.debian``: mirror detection and probe, debootstrap,
files and units); this file keeps only what is the box's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

from hostagent.labimage import debian, skeleton  # noqa: E402

RECIPE_VERSION = 1
BOX_NAME = "hostagent/debian12"
BOX_FILE = "hostagent-debian12.box"
SUITE = "bookworm"
CACHE_DIR = Path(os.environ.get("HOSTAGENT_VAGRANT_CACHE", "/var/cache/hostagent-test/vagrant"))
CACHE_NAME = "hostagent-debian12"
DISK_GIB = 16  # virtual size: sparse, the qcow2 holds only what the tree uses
PART_OFFSET = 1 << 20  # the root partition starts at 1 MiB
# Syslinux 6.04 cannot boot from ext4 with the 64bit feature (mke2fs's default).
MKFS_FEATURES = "^64bit,^metadata_csum"
CMDLINE = "root=/dev/vda1 rw console=tty0 console=ttyS0,115200 net.ifnames=0"
BUILD_JSON = "build.json"  # the recipe hash of the cached box

# Host tools the build runs: (name, Debian package).
TOOLS: tuple[tuple[str, str], ...] = (
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("sfdisk", "fdisk"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("tar", "tar"),
)

PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-amd64",
    "extlinux",  # the boot loader, installed from the tree itself
    "syslinux-common",  # mbr.bin
    "openssh-server",
    "sudo",
    "python3",
    "python3-venv",  # the install path: python3 -m venv /opt/hostagent
    "python3-pip",
    "rsync",  # vagrant's rsync synced folder
    "systemd-resolved",  # DNS from networkd's DHCP lease
    "dbus",  # resolved needs a system bus; debootstrap does not resolve the virtual one
    "iproute2",
    "ifupdown",  # not used for eth0 (networkd), present for Vagrant's fallbacks
    "isc-dhcp-client",
    "ca-certificates",
    "curl",
    "e2fsprogs",
)

# The well-known Vagrant insecure public key: vagrant replaces it on first `up`.
VAGRANT_PUBKEY = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+"
    "niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAM"
    "zF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJ"
    "nAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzR"
    "dK8jlqm8tehUc9c9WhQ== vagrant insecure public key\n"
)

_ETH0_NETWORK = """\
# The management NIC (vagrant-libvirt's NAT network): DHCP. Vagrant writes the
# private networks (eth1, ...) as further systemd-networkd files.
[Match]
Name=eth0

[Network]
DHCP=ipv4
IPv6AcceptRA=no
"""

_SSH_DROPIN = """\
# Every VM made from the box gets its own host keys (the box ships none).
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""

_WAIT_ONLINE_DROPIN = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60
"""

FILES: dict[str, str] = {
    "etc/fstab": "/dev/vda1 / ext4 rw,noatime,errors=remount-ro 0 1\n",
    "etc/machine-id": "",
    "etc/hostname": "debian12\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 debian12\n::1 localhost ip6-localhost\n",
    "etc/default/locale": "LANG=C.UTF-8\n",
    "etc/network/interfaces": "auto lo\niface lo inet loopback\n",
    "etc/systemd/network/10-eth0.network": _ETH0_NETWORK,
    "etc/systemd/system/ssh.service.d/10-hostkeys.conf": _SSH_DROPIN,
    "etc/systemd/system/systemd-networkd-wait-online.service.d/10-hostagent.conf": (
        _WAIT_ONLINE_DROPIN
    ),
    "etc/sudoers.d/vagrant": "Defaults:vagrant !requiretty\nvagrant ALL=(ALL) NOPASSWD: ALL\n",
    "etc/ssh/sshd_config.d/10-vagrant.conf": "UseDNS no\nPasswordAuthentication yes\n",
}

ENABLED: dict[str, tuple[str, ...]] = {
    "multi-user.target.wants": (
        "systemd-networkd.service",
        "systemd-resolved.service",
        "ssh.service",
    ),
    "sockets.target.wants": ("systemd-networkd.socket",),
    "network-online.target.wants": ("systemd-networkd-wait-online.service",),
}

MASKED: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "networking.service",  # ifupdown would race networkd for eth0
)

BOX_VAGRANTFILE = """\
# Box-level defaults of hostagent/debian12 (built by vagrant/build-box.sh).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
  end
end
"""


def recipe_hash() -> str:
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "suite": SUITE,
        "packages": list(PACKAGES),
        "files": FILES,
        "enabled": {k: list(v) for k, v in ENABLED.items()},
        "masked": list(MASKED),
        "pubkey": VAGRANT_PUBKEY,
        "cmdline": CMDLINE,
        "disk_gib": DISK_GIB,
        "mkfs": MKFS_FEATURES,
        "box_vagrantfile": BOX_VAGRANTFILE,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_box(
    cache_dir: Path = CACHE_DIR, *, force: bool = False, progress: Callable[[str], None] = print
) -> Path:
    """Build (or reuse) the box in ``cache_dir``; the path of the .box file."""
    recipe = recipe_hash()

    def prepare() -> Callable[[Path], None]:
        tools = skeleton.require_tools("the box", "debootstrap, loop device", TOOLS)
        mirror = debian.apt_mirror(SUITE)
        debian.probe_mirror(mirror, SUITE)
        return lambda work: _build(work, recipe, mirror, tools, skeleton.timed("box", progress))

    return skeleton.build_in_place(
        cache_dir / CACHE_NAME,
        recipe,
        prepare,
        label="box",
        force=force,
        progress=progress,
        meta=BUILD_JSON,
        files=[BOX_FILE],
        product=BOX_FILE,
    )


def _build(
    work: Path, recipe: str, mirror: str, tools: dict[str, str], progress: Callable[[str], None]
) -> None:
    tree = work / ".tree"
    progress(f"debootstrap {SUITE} from {mirror}")
    debian.debootstrap(tools["debootstrap"], tree, mirror, SUITE, PACKAGES)
    env = {**os.environ, **debian.CHROOT_ENV}
    progress("configuring the tree (vagrant user, ssh, networkd, extlinux.conf)")
    _configure_tree(tree, env)
    raw = work / ".disk.raw"
    _make_disk(tree, raw, tools, progress)
    skeleton.remove_work(tree)
    progress("qemu-img convert to box.img (qcow2)")
    skeleton.run([tools["qemu-img"], "convert", "-O", "qcow2", str(raw), str(work / "box.img")])
    raw.unlink()
    meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}
    (work / "metadata.json").write_text(json.dumps(meta) + "\n")
    (work / "Vagrantfile").write_text(BOX_VAGRANTFILE)
    progress("tar the box")
    skeleton.run(
        [
            tools["tar"],
            "-C",
            str(work),
            "-cf",
            str(work / BOX_FILE),
            "metadata.json",
            "Vagrantfile",
            "box.img",
        ]
    )
    (work / "box.img").unlink()  # the tar holds it; keep the cache at one copy
    (work / BUILD_JSON).write_text(json.dumps({"recipe": recipe}) + "\n")
    work.chmod(0o755)


def _configure_tree(tree: Path, env: dict[str, str]) -> None:
    debian.write_files(tree, FILES)
    for relative in FILES:
        if relative.startswith("etc/sudoers.d/"):
            (tree / relative).chmod(0o440)  # sudo's mode for its drop-ins
    # networkd's DHCP hands the DNS servers to resolved; debootstrap left the host's file.
    debian.symlink(tree / "etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf")
    debian.set_units(tree, ENABLED, MASKED)
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # The vagrant user: password "vagrant", the insecure key, passwordless sudo.
    skeleton.run(
        ["chroot", str(tree), "useradd", "-m", "-s", "/bin/bash", "-G", "sudo", "vagrant"], env
    )
    subprocess.run(
        ["chroot", str(tree), "chpasswd"], input="vagrant:vagrant\n", text=True, check=True, env=env
    )
    ssh_dir = tree / "home/vagrant/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(VAGRANT_PUBKEY)
    (ssh_dir / "authorized_keys").chmod(0o600)
    skeleton.run(["chroot", str(tree), "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"], env)
    release = skeleton.kernel_release(tree, "the tree")
    conf = tree / "boot/extlinux/extlinux.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "DEFAULT debian\nTIMEOUT 1\nPROMPT 0\nSERIAL 0 115200\n"
        f"LABEL debian\n  LINUX /boot/vmlinuz-{release}\n"
        f"  INITRD /boot/initrd.img-{release}\n  APPEND {CMDLINE}\n"
    )
    debian.remove_globs(tree, debian.APT_CACHES)


def _make_disk(
    tree: Path, raw: Path, tools: dict[str, str], progress: Callable[[str], None]
) -> None:
    """An MBR disk: Syslinux boot code, one bootable ext4 partition from ``tree``."""
    size = DISK_GIB << 30
    part = size - PART_OFFSET
    with raw.open("wb") as f:
        f.truncate(size)
    layout = f"label: dos\nstart={PART_OFFSET // 512}, type=83, bootable\n"
    skeleton.run([tools["sfdisk"], "-q", str(raw)], input_text=layout)
    progress(f"mkfs.ext4 -d into the partition ({part >> 20} MiB, sparse)")
    skeleton.run(
        [
            tools["mkfs.ext4"],
            "-q",
            "-F",
            "-L",
            "root",
            "-O",
            MKFS_FEATURES,
            "-E",
            f"offset={PART_OFFSET}",
            "-d",
            str(tree),
            str(raw),
            f"{part // 1024}k",
        ]
    )
    mbr = (tree / "usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    with raw.open("r+b") as f:
        f.write(mbr[:440])  # boot code only: the partition table stays
    progress("extlinux --install (loop device at the partition's offset)")
    loop = subprocess.run(
        [
            tools["losetup"],
            "--find",
            "--show",
            "--offset",
            str(PART_OFFSET),
            "--sizelimit",
            str(part),
            str(raw),
        ],
        capture_output=True,
        text=True,
    )
    if loop.returncode != 0:
        raise RuntimeError(f"losetup failed (loop devices needed for extlinux): {loop.stderr}")
    device = loop.stdout.strip()
    mnt = Path(tempfile.mkdtemp(prefix=".mnt-", dir=raw.parent))
    try:
        skeleton.run([tools["mount"], device, str(mnt)])
        try:
            skeleton.run([str(tree / "usr/bin/extlinux"), "--install", str(mnt / "boot/extlinux")])
        finally:
            skeleton.run([tools["umount"], str(mnt)])
    finally:
        subprocess.run([tools["losetup"], "-d", device], capture_output=True)
        mnt.rmdir()


def install_box(box: Path, dest: Path) -> None:
    """Hard-link (same file system) or copy the cached box to ``dest``, atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(box, tmp)
    except OSError:
        shutil.copyfile(box, tmp)
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / BOX_FILE)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        box = build_box(
            args.cache_dir, force=args.force, progress=lambda line: print(line, flush=True)
        )
    except RuntimeError as err:
        print(f"build-box: {err}", file=sys.stderr)
        return 1
    install_box(box, args.output)
    print(f"box: {args.output} (vagrant box add --name {BOX_NAME} {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
