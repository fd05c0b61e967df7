"""Builds the "lab" guest image offline from Debian's packages.

The image folder (``<image_dir>/lab``) holds ``vmlinuz`` (Debian 12's kernel),
``initrd.img`` (gzip'ed newc cpio: busybox-static, init.sh as /init and the kernel
modules the guest needs), ``disk.qcow2`` (a small empty base disk that nodes get a
qcow2 overlay on) and, written last and atomically, ``image.json``. A folder without
image.json is an unfinished build.

The build runs in a temp folder next to the target and is renamed into place, so a
failed build never leaves half an image. It is skipped when image.json already
carries the same recipe hash (kernel and busybox package versions, init.sh, module
list, recipe version) and every file is present. That frame, shared with the other
image builds, is skeleton.py's.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hostagent.labimage.skeleton import build_in_place, kernel_release, run, write_image_json

RECIPE_VERSION = 1
IMAGE_NAME = "lab"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
CMDLINE = "console=ttyS0 loglevel=4 panic=0"
DISK_SIZE = "1G"
INIT_SH = Path(__file__).with_name("init.sh")
MODULE_LIST_PATH = "etc/hostagent-lab/modules"

# Kernel modules the guest loads (their dependencies are added by the build).
MODULES: tuple[str, ...] = (
    "virtio_pci",  # all virtio devices are PCI devices
    "virtio_blk",  # root overlay disk /dev/vda
    "virtio_net",  # the NIC
    "virtio_scsi",  # controller of the config drive cdrom
    "sr_mod",  # SCSI cdrom -> /dev/sr0 (pulls in cdrom)
    "isofs",  # ISO9660 + Joliet + Rock Ridge config drive
    "9pnet_virtio",  # 9p transport for the PKI share
    "9p",  # 9p file system
    "button",  # ACPI power button -> input event
    "evdev",  # /dev/input/event* for busybox acpid
)

# Busybox applets /init and the acpid handler use (symlinked in /bin).
APPLETS: tuple[str, ...] = (
    "acpid", "ash", "awk", "basename", "cat", "chmod", "dd", "dirname", "dmesg", "find",
    "grep", "head", "hostname", "insmod", "ip", "ls", "lsmod", "mkdir", "mount",
    "ping", "poweroff", "ps", "reboot", "sed", "sh", "sleep", "sort", "sync", "tail", "timeout",
    "touch", "tr", "umount", "uname", "wc", "wget",
)  # fmt: skip

_UPDATE_HINT = "apt package lists look missing or stale: run `apt-get update` (as root) and retry"
_APT_MISSING = ("Unable to locate package", "has no installation candidate", "No packages found",
                "Can't select", "not found")  # fmt: skip
_INITRD_DIRS = ("bin", "dev", "etc", "etc/hostagent-lab", "lib", "lib/modules", "mnt", "proc",
                "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin")  # fmt: skip


@dataclass(frozen=True)
class Package:
    """One exact Debian package version."""

    name: str
    version: str

    def spec(self) -> str:
        return f"{self.name}={self.version}"


def build_lab_image(
    image_dir: Path, *, force: bool = False, progress: Callable[[str], None] = print
) -> Path:
    """Build (or reuse) the image ``lab`` in ``image_dir / "lab"`` and return that folder."""
    progress("lab image: resolving kernel and busybox package versions")
    kernel, busybox = resolve_packages()
    init_sh = INIT_SH.read_bytes()
    recipe = recipe_hash(init_sh, kernel, busybox)

    def prepare() -> Callable[[Path], None]:
        return lambda work: _build(work, recipe, kernel, busybox, init_sh, progress)

    return build_in_place(
        image_dir / IMAGE_NAME, recipe, prepare, label="lab image", force=force, progress=progress
    )


def recipe_hash(init_sh: bytes, kernel: Package, busybox: Package) -> str:
    """The sha256 (hex) of everything that determines the image's content."""
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "init_sh_sha256": hashlib.sha256(init_sh).hexdigest(),
        "modules": list(MODULES),
        "applets": list(APPLETS),
        "kernel": kernel.spec(),
        "busybox": busybox.spec(),
        "cmdline": CMDLINE,
        "disk_size": DISK_SIZE,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# --- packages -------------------------------------------------------------------------


def resolve_packages() -> tuple[Package, Package]:
    """The exact kernel package (the one linux-image-amd64 depends on) and busybox."""
    meta = _apt_show(KERNEL_META_PACKAGE)
    match = re.search(r"(linux-image-[0-9][^\s,(|]*)(?:\s*\(=\s*([^)\s]+)\))?", meta["Depends"])
    if match is None:
        raise RuntimeError(f"{KERNEL_META_PACKAGE} depends on no kernel: {meta['Depends']!r}")
    name, version = match.group(1), match.group(2)
    kernel = Package(name, version or _apt_show(name)["Version"])
    return kernel, Package(BUSYBOX_PACKAGE, _apt_show(BUSYBOX_PACKAGE)["Version"])


def _apt_show(package: str) -> dict[str, str]:
    """The candidate version's control fields (``apt-cache show --no-all-versions``)."""
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True
    )
    fields: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and line[:1].strip():
            fields.setdefault(key, value.strip())
    if proc.returncode != 0 or "Version" not in fields:
        raise RuntimeError(f"apt-cache knows no package {package}; {_UPDATE_HINT}")
    fields.setdefault("Depends", "")
    return fields


def _download(package: Package, dest: Path) -> Path:
    """``apt-get download`` one exact package version into ``dest``; its .deb path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", package.spec()]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        hint = f"; {_UPDATE_HINT}" if any(s in detail for s in _APT_MISSING) else ""
        raise RuntimeError(f"apt-get download {package.spec()} failed{hint}: {detail}")
    debs = list(dest.glob(f"{package.name}_{package.version.replace(':', '%3a')}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download {package.spec()} left no single .deb in {dest}")
    return debs[0]


def _fetch(package: Package, scratch: Path, progress: Callable[[str], None]) -> Path:
    """Download and extract a package (never installed); the extracted tree."""
    progress(f"lab image: downloading {package.name} {package.version}")
    deb = _download(package, scratch / "debs")
    progress(f"lab image: extracting {deb.name}")
    root = scratch / package.name
    run(["dpkg-deb", "-x", str(deb), str(root)])
    return root


# --- kernel modules -------------------------------------------------------------------


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing ``.ko.xz`` / ``.ko.gz``."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if not path.name.endswith(".ko"):
        raise RuntimeError(f"unsupported kernel module compression: {path}")
    return data


def elf_modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a 64-bit little-endian module's .modinfo section."""
    if data[:6] != b"\x7fELF\x02\x01":
        raise RuntimeError("not a 64-bit little-endian ELF kernel module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        start = names_at + name
        if data[start : data.index(b"\0", start)] == b".modinfo":
            entries = data[offset : offset + size].split(b"\0")
            pairs = (e.decode(errors="replace").partition("=") for e in entries if b"=" in e)
            info: dict[str, str] = {}
            for key, _, value in pairs:
                info.setdefault(key, value)
            return info
    return {}


def resolve_modules(moddir: Path, roots: Sequence[str]) -> list[Path]:
    """``roots`` plus their dependencies (from each module's ``depends=``), in load order.

    Debian's kernel package ships no modules.dep (depmod runs at install time), so the
    dependencies are read from the modules themselves, as depmod does. Modules built
    into the kernel (modules.builtin) are skipped.
    """
    index = {_module_name(p): p for p in moddir.rglob("*.ko*") if ".ko" in p.name}
    builtin_file = moddir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.exists() else []
    builtin_names = {_module_name(Path(b)) for b in builtin}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin_names:
            return
        if name in chain or name not in index:
            raise RuntimeError(f"kernel module {name} is missing or cyclic ({' -> '.join(chain)})")
        depends = elf_modinfo(read_module(index[name])).get("depends", "")
        for dep in filter(None, depends.split(",")):
            visit(dep.replace("-", "_"), (*chain, name))
        order.append(name)

    for root in roots:
        visit(root.replace("-", "_"), ())
    return [index[name] for name in order]


# --- initramfs ------------------------------------------------------------------------


class Cpio:
    """A minimal writer of newc ("070701") cpio archives, all entries owned by root."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        self._out.write(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
        self._out.write(name.encode() + b"\0")
        self._pad()
        self._out.write(data)
        self._pad()

    def add_dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def make_initramfs(busybox: bytes, init_sh: bytes, moddir: Path, modules: list[Path]) -> bytes:
    """The gzip'ed initramfs: busybox + applet links, /init, modules and their load order."""
    kdir = f"lib/modules/{moddir.name}"
    cpio = Cpio()
    for directory in (*_INITRD_DIRS, kdir):
        cpio.add_dir(directory)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3)
    cpio.add_file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_file("init", init_sh, 0o755)
    load_order = []
    for module in modules:
        dest = f"{kdir}/{_module_name(module)}.ko"
        cpio.add_file(dest, read_module(module))
        load_order.append(f"/{dest}\n")
    cpio.add_file(MODULE_LIST_PATH, "".join(load_order).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# --- build steps ----------------------------------------------------------------------


def _kernel_release(kernel_root: Path) -> str:
    """The ``uname -r`` of the extracted kernel package (from boot/vmlinuz-<release>)."""
    release = kernel_release(kernel_root, "the kernel package")
    if not (kernel_root / "lib/modules" / release).is_dir():
        raise RuntimeError(f"the kernel package has no lib/modules/{release}")
    return release


def _build(
    work: Path,
    recipe: str,
    kernel: Package,
    busybox: Package,
    init_sh: bytes,
    progress: Callable[[str], None],
) -> None:
    """Fill ``work`` with a complete image; image.json last."""
    scratch = work / ".scratch"
    kernel_root = _fetch(kernel, scratch, progress)
    busybox_root = _fetch(busybox, scratch, progress)
    release = _kernel_release(kernel_root)
    shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
    moddir = kernel_root / "lib/modules" / release
    modules = resolve_modules(moddir, MODULES)
    progress(f"lab image: modules in load order: {' '.join(_module_name(m) for m in modules)}")
    progress(f"lab image: making initramfs (kernel {release}, {len(modules)} modules)")
    busybox_bin = (busybox_root / "bin/busybox").read_bytes()
    initrd = make_initramfs(busybox_bin, init_sh, moddir, modules)
    (work / "initrd.img").write_bytes(initrd)
    shutil.rmtree(scratch)
    progress(f"lab image: creating base disk disk.qcow2 ({DISK_SIZE})")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "disk.qcow2"), DISK_SIZE])
    progress("lab image: writing image.json")
    write_image_json(work, IMAGE_NAME, CMDLINE, recipe)
