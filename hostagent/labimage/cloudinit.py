"""Builds the "lab-cloudinit" guest image: a real Debian 12 with cloud-init 22.4.

Where the "lab" image fakes a guest with a busybox /init, this one is a minimal Debian
tree made by debootstrap from the mirror this host's apt uses, so the config drive is
applied by the real cloud-init. The image folder (``<image_dir>/lab-cloudinit``) holds
``vmlinuz`` and ``initrd.img`` (Debian's kernel and the initramfs its install
generated), ``disk.qcow2`` (the tree as a whole-disk ext4 labelled ``root``, the base
of node overlays) and, written last and atomically, ``image.json``.

The tree is tuned to boot fast under TCG: the network is rendered for systemd-networkd
(static addresses are up as soon as the link is, no DHCP, no ifupdown scripts), and
timers and services useless in a disposable lab VM are masked.

As for "lab": the build runs in a temp folder next to the target and is renamed into
place, under a lock, and is skipped when image.json carries the same recipe hash. The
hash covers what decides the content (packages, suite, files written, units, cmdline,
recipe version) but not the mirror URL, which differs between hosts serving the same
packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from hostagent.labimage.build import _locked, _swap_into_place, _write_json_atomic, is_cached

RECIPE_VERSION = 1
IMAGE_NAME = "lab-cloudinit"
SUITE = "bookworm"
# Root is the whole disk (no partition table): cloud-init's resizefs grows it in place
# when a node's overlay is bigger than the base. net.ifnames=0 names the only NIC eth0,
# as the network-config's set-name does anyway, without waiting for a udev rename.
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 loglevel=4"
HEADROOM = 1.3  # free space in the base file system, as a factor of the tree's size
SIZE_STEP = 256 << 20  # the base disk's size is rounded up to this
SETUP_HINT = "run scripts/setup-host.sh (as root) to install it"

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

# Removed from the tree: downloaded .debs and package lists (apt-get update refetches).
REMOVED_GLOBS: tuple[str, ...] = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*")


def build_cloudinit_image(
    image_dir: Path, *, force: bool = False, progress: Callable[[str], None] = print
) -> Path:
    """Build (or reuse) the image ``lab-cloudinit`` in ``image_dir`` and return its folder."""
    image_dir.mkdir(parents=True, exist_ok=True)
    target = image_dir / IMAGE_NAME
    recipe = recipe_hash()
    with _locked(image_dir / f".{IMAGE_NAME}.lock"):
        if not force and is_cached(target, recipe):
            progress(f"{IMAGE_NAME}: cached in {target} (recipe {recipe[:12]})")
            return target
        tools = _require_tools()
        mirror = apt_mirror(SUITE)
        _probe_mirror(mirror, SUITE)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{IMAGE_NAME}-build-", dir=image_dir))
        try:
            _build(work, recipe, mirror, tools, _timed(progress))
            _swap_into_place(work, target)
        except BaseException:
            _remove_work(work)
            raise
    progress(f"{IMAGE_NAME}: built {target} in {time.monotonic() - started:.1f} s")
    return target


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
        "removed": list(REMOVED_GLOBS),
        "cmdline": CMDLINE,
        "headroom": HEADROOM,
        "size_step": SIZE_STEP,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# --- prerequisites --------------------------------------------------------------------


def _require_tools() -> dict[str, str]:
    """Absolute paths of the host tools the build runs; a clear error if one is missing."""
    if os.geteuid() != 0:
        raise RuntimeError(f"building {IMAGE_NAME} needs root (debootstrap chroots)")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    tools: dict[str, str] = {}
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("qemu-img", "qemu-utils")):  # fmt: skip
        path = shutil.which(tool, path=search)
        if path is None:
            raise RuntimeError(f"{tool} not found (Debian package {package}); {SETUP_HINT}")
        tools[tool] = path
    return tools


def apt_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The URI of the first apt source serving ``suite`` with component main."""
    for kind, uri, suites, components in _apt_sources(apt_dir):
        usable = re.match(r"(https?|file):/", uri) is not None
        if kind == "deb" and suite in suites and "main" in components and usable:
            return uri.rstrip("/")
    raise RuntimeError(
        f"no 'deb' source for {suite} main in {apt_dir}/sources.list(.d): "
        "cannot tell which Debian mirror to debootstrap from"
    )


def _apt_sources(apt_dir: Path) -> Iterator[tuple[str, str, list[str], list[str]]]:
    """(type, uri, suites, components) of each enabled source, both file formats."""
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if path.is_file():
            yield from _one_line_sources(path.read_text())
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        yield from _deb822_sources(path.read_text())


def _one_line_sources(text: str) -> Iterator[tuple[str, str, list[str], list[str]]]:
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0])  # drop [options]
        words = line.split()
        if len(words) >= 3:
            yield words[0], words[1], [words[2]], words[3:]


def _deb822_sources(text: str) -> Iterator[tuple[str, str, list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith(("#", " ", "\t")):
                fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for kind in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                suites, components = fields.get("suites", ""), fields.get("components", "")
                yield kind, uri, suites.split(), components.split()


def _probe_mirror(mirror: str, suite: str) -> None:
    """Fail fast and clearly when the mirror is unreachable (debootstrap says it late)."""
    url = f"{mirror}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"Debian mirror unreachable: {url}: {err}") from err


# --- build steps ----------------------------------------------------------------------


def _timed(progress: Callable[[str], None]) -> Callable[[str], None]:
    """A progress function prefixing each line with the image name and the build time."""
    started = time.monotonic()

    def report(line: str) -> None:
        progress(f"{IMAGE_NAME}: [{time.monotonic() - started:6.1f} s] {line}")

    return report


def _build(
    work: Path, recipe: str, mirror: str, tools: dict[str, str], progress: Callable[[str], None]
) -> None:
    """Fill ``work`` with a complete image; image.json last."""
    tree = work / ".tree"
    _debootstrap(tools["debootstrap"], tree, mirror, progress)
    progress("configuring the tree (cloud-init, networkd, fstab, masked units)")
    configure_tree(tree)
    release = _copy_boot_files(tree, work)
    progress(f"kernel {release}: copied vmlinuz and initrd.img")
    raw = work / ".root.raw"
    size = _make_filesystem(tools["mkfs.ext4"], tree, raw, progress)
    _remove_work(tree)
    progress(f"converting the {size >> 20} MiB root file system to disk.qcow2")
    _run([tools["qemu-img"], "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")])
    raw.unlink()
    for path in work.iterdir():
        path.chmod(0o644)
    work.chmod(0o755)
    progress("writing image.json")
    _write_json_atomic(work / "image.json", _image_meta(recipe))


def _debootstrap(command: str, tree: Path, mirror: str, progress: Callable[[str], None]) -> None:
    progress(f"debootstrap {SUITE} from {mirror} ({len(PACKAGES)} packages and their deps)")
    cmd = [command, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
           str(tree), mirror]  # fmt: skip
    # debootstrap runs maintainer scripts in the chroot: they want sbin on PATH and
    # must not ask questions.
    env = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
           "DEBIAN_FRONTEND": "noninteractive"}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {_debootstrap_error(proc, tree, mirror)}")
    progress("debootstrap done")


def _debootstrap_error(proc: subprocess.CompletedProcess[str], tree: Path, mirror: str) -> str:
    """The tail of debootstrap's output and log, with a hint when the mirror failed."""
    log = tree / "debootstrap" / "debootstrap.log"
    text = (proc.stdout + proc.stderr).strip()
    if log.is_file():
        text += "\n" + log.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-15:])
    if re.search(r"Failed getting release file|Couldn't download|Failed to connect", text):
        return f"Debian mirror {mirror} unreachable or incomplete:\n{tail}"
    return tail


def configure_tree(tree: Path) -> None:
    """Write the recipe's files, enable and mask its units, drop caches (no chroot)."""
    for relative, content in FILES.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # may be a symlink (resolv.conf) into the host
        path.write_text(content)
        path.chmod(0o644)
    units = tree / "etc/systemd/system"
    for wants, names in ENABLED.items():
        for name in names:
            _symlink(units / wants / name, f"/lib/systemd/system/{name}")
    for name in MASKED:
        for stale in units.glob(f"*.wants/{name}"):
            stale.unlink()
        _symlink(units / name, "/dev/null")
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for pattern in REMOVED_GLOBS:
        for path in tree.glob(pattern):
            path.unlink()


def _symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _copy_boot_files(tree: Path, work: Path) -> str:
    """Copy the tree's kernel and initramfs out; the kernel release."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one boot/vmlinuz-* in the tree, got {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = tree / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise RuntimeError(f"the kernel install generated no {initrd.name} (initramfs-tools?)")
    shutil.copyfile(kernels[0], work / "vmlinuz")
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
    _run([mkfs, "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(tree), str(raw)])
    return size


def _image_meta(recipe: str) -> dict[str, str]:
    return {
        "name": IMAGE_NAME,
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "cmdline": CMDLINE,
        "recipe": recipe,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr).strip()}")


# --- clean-up -------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (debootstrap mounts /proc, /sys, ... in the tree)."""
    prefix = str(path.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def _unmount_all(points: Iterable[str]) -> None:
    for point in sorted(points, key=len, reverse=True):  # deepest first
        subprocess.run(["umount", "-l", point], capture_output=True)


def _remove_work(path: Path) -> None:
    """Delete a build folder, unmounting first: rmtree must never reach the host's /dev."""
    if not path.exists():
        return
    _unmount_all(_mounts_under(path))
    if _mounts_under(path):
        raise RuntimeError(f"cannot unmount everything under {path}; not deleting it")
    shutil.rmtree(path, ignore_errors=True)
