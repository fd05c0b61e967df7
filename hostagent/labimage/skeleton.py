"""What every image build shares: the lab images' (build.py, cloudinit.py) and the Vagrant
box's (vagrant/build_box.py).

A build is keyed by its recipe hash, kept in a small JSON file (``image.json``) in the
finished folder. Under a lock per target (between processes too) a cached target is
returned at once; otherwise the build fills a temp folder next to the target, which is
renamed into place, so a failed build never leaves half an image. Each builder keeps
only its recipe and its steps; the helpers here run tools, check for them, and write
the metadata.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from common.files import write_atomically

IMAGE_JSON = "image.json"
# The files image.json names (its keys), as the agent's image catalog reads them.
IMAGE_FILES: dict[str, str] = {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"}
SETUP_HINT = "run scripts/setup-host.sh (as root) to install it"

Progress = Callable[[str], None]


def build_in_place(
    target: Path,
    recipe: str,
    prepare: Callable[[], Callable[[Path], None]],
    *,
    label: str,
    force: bool,
    progress: Progress,
    meta: str = IMAGE_JSON,
    files: Sequence[str] | None = None,
    product: str = "",
) -> Path:
    """Build ``target`` unless it is cached for ``recipe``; ``target / product``.

    ``prepare()`` runs only when a build is due: it checks what the build needs (tools,
    mirror) and returns the step that fills the work folder. ``meta`` and ``files`` are
    as for ``is_cached``; ``label`` prefixes the progress lines.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent / f".{target.name}.lock"):
        if not force and is_cached(target, recipe, meta=meta, files=files):
            progress(f"{label}: cached in {target} (recipe {recipe[:12]})")
            return target / product
        fill = prepare()
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
        try:
            fill(work)
            swap_into_place(work, target)
        except BaseException:
            remove_work(work)
            raise
    progress(f"{label}: built {target / product} in {time.monotonic() - started:.1f} s")
    return target / product


def is_cached(
    target: Path, recipe: str, *, meta: str = IMAGE_JSON, files: Sequence[str] | None = None
) -> bool:
    """True if ``target`` is a finished build of ``recipe``: its ``meta`` file carries the
    recipe and every file is present (``files``, by default those image.json names)."""
    try:
        data = json.loads((target / meta).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("recipe") != recipe:
        return False
    names = [data.get(key) for key in IMAGE_FILES] if files is None else list(files)
    return all(isinstance(name, str) and (target / name).is_file() for name in names)


def write_image_json(work: Path, name: str, cmdline: str, recipe: str) -> None:
    """Make the finished image readable by all, then write image.json (last, atomically)."""
    for path in work.iterdir():
        path.chmod(0o644)
    work.chmod(0o755)
    meta = {
        "name": name,
        **IMAGE_FILES,
        "cmdline": cmdline,
        "recipe": recipe,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_atomically(work / IMAGE_JSON, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)


def require_tools(what: str, why_root: str, tools: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Absolute paths of the host tools (name, Debian package) a build runs; a clear error
    when not root or when one is missing."""
    if os.geteuid() != 0:
        raise RuntimeError(f"building {what} needs root ({why_root})")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
    paths: dict[str, str] = {}
    for tool, package in tools:
        path = shutil.which(tool, path=search)
        if path is None:
            raise RuntimeError(f"{tool} not found (Debian package {package}); {SETUP_HINT}")
        paths[tool] = path
    return paths


def run(cmd: list[str], env: dict[str, str] | None = None, input_text: str | None = None) -> None:
    """Run a build step; RuntimeError with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, input=input_text)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr).strip()}")


def timed(label: str, progress: Progress) -> Progress:
    """A progress function prefixing each line with ``label`` and the time since now."""
    started = time.monotonic()

    def report(line: str) -> None:
        progress(f"{label}: [{time.monotonic() - started:6.1f} s] {line}")

    return report


def kernel_release(root: Path, where: str) -> str:
    """The release of the one boot/vmlinuz-<release> under ``root`` (``where`` it is)."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one boot/vmlinuz-* in {where}, got {kernels}")
    return kernels[0].name.removeprefix("vmlinuz-")


# --- the work folder ------------------------------------------------------------------


def swap_into_place(work: Path, target: Path) -> None:
    """Rename the finished build to ``target``, replacing (then deleting) an old one."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}-old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    os.rename(work, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_work(path: Path) -> None:
    """Delete a build folder, unmounting first: rmtree must never reach the host's /dev
    (debootstrap mounts /proc, /sys, ... in its tree)."""
    if not path.exists():
        return
    _unmount_all(_mounts_under(path))
    if _mounts_under(path):
        raise RuntimeError(f"cannot unmount everything under {path}; not deleting it")
    shutil.rmtree(path, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``."""
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


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Serialise builds of one target (between processes too)."""
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
