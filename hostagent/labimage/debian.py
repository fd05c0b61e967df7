"""A Debian tree made by debootstrap, for the builds that need a real Debian: the
lab-cloudinit image (cloudinit.py) and the Vagrant box (vagrant/build_box.py).

The mirror is the one this host's apt uses (both source file formats), probed before a
long build; the tree is configured without a chroot: files written, units enabled and
masked by symlinks, apt's caches dropped.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

# Downloaded .debs and package lists (apt-get update refetches them).
APT_CACHES: tuple[str, ...] = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*")

# debootstrap runs maintainer scripts in the chroot: they want sbin on PATH and must
# not ask questions. Commands run in the tree later get the same environment.
CHROOT_ENV: dict[str, str] = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}


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


def probe_mirror(mirror: str, suite: str) -> None:
    """Fail fast and clearly when the mirror is unreachable (debootstrap says it late)."""
    url = f"{mirror}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"Debian mirror unreachable: {url}: {err}") from err


def debootstrap(command: str, tree: Path, mirror: str, suite: str, packages: Iterable[str]) -> None:
    """``debootstrap --variant=minbase`` ``suite`` with ``packages`` into ``tree``."""
    cmd = [command, "--variant=minbase", f"--include={','.join(packages)}", suite,
           str(tree), mirror]  # fmt: skip
    env = {**os.environ, **CHROOT_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {_debootstrap_error(proc, tree, mirror)}")


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


# --- configuring the tree (no chroot) -------------------------------------------------


def write_files(tree: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` (path relative to the tree -> content), mode 0644."""
    for relative, content in files.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # may be a symlink (resolv.conf) into the host
        path.write_text(content)
        path.chmod(0o644)


def set_units(
    tree: Path,
    enabled: Mapping[str, Iterable[str]],
    masked: Iterable[str],
    disabled: Iterable[str] = (),
) -> None:
    """Enable units by symlinks ("wants dir" -> units), disable units (their packages'
    "wants" symlinks removed: installed, started only when something enables them) and
    mask units (-> /dev/null)."""
    units = tree / "etc/systemd/system"
    for wants, names in enabled.items():
        for name in names:
            symlink(units / wants / name, f"/lib/systemd/system/{name}")
    for name in (*disabled, *masked):
        disable(units, name)
    for name in masked:
        symlink(units / name, "/dev/null")


def disable(units: Path, name: str) -> None:
    """What `systemctl disable` removes: the unit's links in the "wants" and "requires"
    folders and its aliases (links in ``units`` pointing at it). The links point into
    the tree's /lib, absolute: on the build host they may dangle, so they are found by
    listing, never by a lookup that follows them."""
    folders = [units] + [
        d for d in units.iterdir() if d.is_dir() and d.name.endswith((".wants", ".requires"))
    ]
    for folder in folders:
        for link in folder.iterdir():
            if link.is_symlink() and name in (link.name, Path(os.readlink(link)).name):
                link.unlink()


def remove_globs(tree: Path, patterns: Iterable[str]) -> None:
    for pattern in patterns:
        for path in tree.glob(pattern):
            path.unlink()


def symlink(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)
