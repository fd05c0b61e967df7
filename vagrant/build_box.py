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

Helpers (mirror detection, lock, temp folder + rename, clean-up) come from
``hostagent.labimage.cloudinit``/``build``: the same conventions as the lab images.
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
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

from hostagent.labimage.build import _locked, _swap_into_place  # noqa: E402
from hostagent.labimage.cloudinit import (  # noqa: E402
    _debootstrap_error,
    _probe_mirror,
    _remove_work,
    _symlink,
    apt_mirror,
)

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
SETUP_HINT = "run scripts/setup-host.sh (as root) to install it"

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


def is_cached(target: Path, recipe: str) -> bool:
    try:
        meta = json.loads((target / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("recipe") == recipe and (target / BOX_FILE).is_file()


def build_box(
    cache_dir: Path = CACHE_DIR, *, force: bool = False, progress: Callable[[str], None] = print
) -> Path:
    """Build (or reuse) the box in ``cache_dir``; the path of the .box file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / CACHE_NAME
    recipe = recipe_hash()
    with _locked(cache_dir / f".{CACHE_NAME}.lock"):
        if not force and is_cached(target, recipe):
            progress(f"box: cached in {target} (recipe {recipe[:12]})")
            return target / BOX_FILE
        tools = _require_tools()
        mirror = apt_mirror(SUITE)
        _probe_mirror(mirror, SUITE)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-build-", dir=cache_dir))
        try:
            _build(work, mirror, tools, _timed(progress, started))
            (work / "build.json").write_text(json.dumps({"recipe": recipe}) + "\n")
            work.chmod(0o755)
            _swap_into_place(work, target)
        except BaseException:
            _remove_work(work)
            raise
    progress(f"box: built {target / BOX_FILE} in {time.monotonic() - started:.1f} s")
    return target / BOX_FILE


def _timed(progress: Callable[[str], None], started: float) -> Callable[[str], None]:
    return lambda line: progress(f"box: [{time.monotonic() - started:6.1f} s] {line}")


def _require_tools() -> dict[str, str]:
    if os.geteuid() != 0:
        raise RuntimeError("building the box needs root (debootstrap, loop device)")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    tools: dict[str, str] = {}
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
        ("sfdisk", "fdisk"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("tar", "tar"),
    ):
        path = shutil.which(tool, path=search)
        if path is None:
            raise RuntimeError(f"{tool} not found (Debian package {package}); {SETUP_HINT}")
        tools[tool] = path
    return tools


def _build(work: Path, mirror: str, tools: dict[str, str], progress: Callable[[str], None]) -> None:
    tree = work / ".tree"
    progress(f"debootstrap {SUITE} from {mirror}")
    env = {
        **os.environ,
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    cmd = [
        tools["debootstrap"],
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(tree),
        mirror,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {_debootstrap_error(proc, tree, mirror)}")
    progress("configuring the tree (vagrant user, ssh, networkd, extlinux.conf)")
    _configure_tree(tree, env)
    raw = work / ".disk.raw"
    _make_disk(tree, raw, tools, progress)
    _remove_work(tree)
    progress("qemu-img convert to box.img (qcow2)")
    _run([tools["qemu-img"], "convert", "-O", "qcow2", str(raw), str(work / "box.img")])
    raw.unlink()
    meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}
    (work / "metadata.json").write_text(json.dumps(meta) + "\n")
    (work / "Vagrantfile").write_text(BOX_VAGRANTFILE)
    progress("tar the box")
    _run(
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


def _configure_tree(tree: Path, env: dict[str, str]) -> None:
    for relative, content in FILES.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(content)
        path.chmod(0o440 if relative.startswith("etc/sudoers.d/") else 0o644)
    # networkd's DHCP hands the DNS servers to resolved; debootstrap left the host's file.
    _symlink(tree / "etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf")
    units = tree / "etc/systemd/system"
    for wants, names in ENABLED.items():
        for name in names:
            _symlink(units / wants / name, f"/lib/systemd/system/{name}")
    for name in MASKED:
        for stale in units.glob(f"*.wants/{name}"):
            stale.unlink()
        _symlink(units / name, "/dev/null")
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # The vagrant user: password "vagrant", the insecure key, passwordless sudo.
    _run(["chroot", str(tree), "useradd", "-m", "-s", "/bin/bash", "-G", "sudo", "vagrant"], env)
    subprocess.run(
        ["chroot", str(tree), "chpasswd"], input="vagrant:vagrant\n", text=True, check=True, env=env
    )
    ssh_dir = tree / "home/vagrant/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(VAGRANT_PUBKEY)
    (ssh_dir / "authorized_keys").chmod(0o600)
    _run(["chroot", str(tree), "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"], env)
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one boot/vmlinuz-* in the tree, got {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    conf = tree / "boot/extlinux/extlinux.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "DEFAULT debian\nTIMEOUT 1\nPROMPT 0\nSERIAL 0 115200\n"
        f"LABEL debian\n  LINUX /boot/vmlinuz-{release}\n"
        f"  INITRD /boot/initrd.img-{release}\n  APPEND {CMDLINE}\n"
    )
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*"):
        for path in tree.glob(pattern):
            path.unlink()


def _make_disk(
    tree: Path, raw: Path, tools: dict[str, str], progress: Callable[[str], None]
) -> None:
    """An MBR disk: Syslinux boot code, one bootable ext4 partition from ``tree``."""
    size = DISK_GIB << 30
    part = size - PART_OFFSET
    with raw.open("wb") as f:
        f.truncate(size)
    layout = f"label: dos\nstart={PART_OFFSET // 512}, type=83, bootable\n"
    _run([tools["sfdisk"], "-q", str(raw)], input_text=layout)
    progress(f"mkfs.ext4 -d into the partition ({part >> 20} MiB, sparse)")
    _run(
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
        _run([tools["mount"], device, str(mnt)])
        try:
            _run([str(tree / "usr/bin/extlinux"), "--install", str(mnt / "boot/extlinux")])
        finally:
            _run([tools["umount"], str(mnt)])
    finally:
        subprocess.run([tools["losetup"], "-d", device], capture_output=True)
        mnt.rmdir()


def _run(cmd: list[str], env: dict[str, str] | None = None, input_text: str | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, input=input_text)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr).strip()}")


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
