"""A node's certificate directory on disk: atomic set writes, the manifest, expiries.

The directory is shared read-only into the VM over 9p, where QEMU's user reads it: every
file and subdirectory is owned by `uid`/`gid` (the agent, as root, passes QEMU's user),
keys 0600, certificates 0644, subdirectories 0700.

A set is written in two phases so that a crash never mixes generations silently:
1. every new file is written to a temporary file beside its target (same directory,
   same filesystem), chowned, chmodded and fsynced;
2. the temporaries are renamed over their targets, each certificate before its key,
   then the manifest, then each touched directory is fsynced.
Renames are atomic one by one, not as a group: a crash inside phase 2 (microseconds
long) can leave some files new and some old. The manifest, renamed last, then still
names the old serials, and a certificate's serial on disk differs from it (a
certificate is renamed before its key, so a torn pair always shows as a changed
certificate); `stale_names` finds those, and provisioning re-issues them. Leftover
temporaries from a crash are removed on the next write.

Beside the layout's files the directory holds two hidden files: `.manifest.json`
(serials, validity and request fingerprints: renewal and the agent's GET read it) and
`.rotated` (touched after a renewal replaced files, for the guest to watch).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from common.files import fsync_dir
from pki import layout
from pki.keys import format_serial

MANIFEST = ".manifest.json"
ROTATED = layout.ROTATED_FILE
KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
_TEMP = ".tmp-"
_VERSION = 1


@dataclass(frozen=True)
class CertRecord:
    """What the manifest remembers of one certificate (a leaf or a CA)."""

    serial: str
    not_before: datetime
    not_after: datetime
    fingerprint: str = ""  # certset.CertRequest.fingerprint(); empty for CAs

    @classmethod
    def of(cls, cert_pem: str, fingerprint: str = "") -> CertRecord:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        return cls(
            serial=format_serial(cert.serial_number),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=fingerprint,
        )


@dataclass(frozen=True)
class Manifest:
    cluster: str
    node: str
    role: str
    key_type: str
    certs: dict[str, CertRecord] = field(default_factory=dict)  # by layout.Cert name

    def to_json(self) -> str:
        certs = {
            name: {
                "serial": record.serial,
                "not_before": record.not_before.isoformat(),
                "not_after": record.not_after.isoformat(),
                "fingerprint": record.fingerprint,
            }
            for name, record in sorted(self.certs.items())
        }
        data = {
            "version": _VERSION,
            "cluster": self.cluster,
            "node": self.node,
            "role": self.role,
            "key_type": self.key_type,
            "written_at": datetime.now(UTC).isoformat(),
            "certs": certs,
        }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("version") != _VERSION:
            raise ValueError(f"manifest version {data.get('version')!r} is not {_VERSION}")
        certs = {
            name: CertRecord(
                serial=entry["serial"],
                not_before=datetime.fromisoformat(entry["not_before"]),
                not_after=datetime.fromisoformat(entry["not_after"]),
                fingerprint=entry.get("fingerprint", ""),
            )
            for name, entry in data["certs"].items()
        }
        return cls(data["cluster"], data["node"], data["role"], data["key_type"], certs)


def read_manifest(directory: Path) -> Manifest | None:
    """The directory's manifest; None when there is none or it is unreadable (a set that
    was never completed: provisioning starts over)."""
    try:
        return Manifest.from_json((directory / MANIFEST).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_expiries(directory: Path) -> dict[str, datetime]:
    """Each certificate's expiry (layout.Cert name -> notAfter, UTC), CAs included; empty
    when the directory holds no complete set."""
    manifest = read_manifest(directory)
    if manifest is None:
        return {}
    return {name: record.not_after for name, record in manifest.certs.items()}


def stale_names(directory: Path, manifest: Manifest) -> set[str]:
    """Certificates whose file is missing, unreadable or not the one the manifest names
    (a torn write), or whose key file is missing."""
    stale = set()
    for name, record in manifest.certs.items():
        try:
            pem = (directory / f"{name}.crt").read_bytes()
            serial = format_serial(x509.load_pem_x509_certificate(pem).serial_number)
        except (OSError, ValueError):
            serial = None
        if serial != record.serial:
            stale.add(name)
        elif record.fingerprint and not (directory / f"{name}.key").exists():
            stale.add(name)  # a leaf's key is gone; CAs have no key here
    return stale


def write_set(
    directory: Path,
    files: Mapping[str, str],
    manifest: Manifest,
    *,
    uid: int | None = None,
    gid: int | None = None,
    rotated: Iterable[str] = (),
) -> None:
    """Write `files` (relative path -> PEM) and the manifest into `directory` as one set;
    then, if `rotated` names replaced certificates, touch `.rotated` for the guest."""
    for relative in files:
        _check_relative(relative)
    _make_dir(directory, uid, gid)
    remove_temps(directory)
    # Certificates before keys (see the module docstring), the manifest last.
    ordered = {name: files[name] for name in sorted(files, key=lambda n: n.endswith(".key"))}
    staged = _stage_all(directory, {**ordered, MANIFEST: manifest.to_json()}, uid, gid)
    for temp, target in staged:
        os.replace(temp, target)
    for parent in sorted({target.parent for _, target in staged}):
        fsync_dir(parent)
    names = sorted(rotated)
    if names:
        stamp = datetime.now(UTC).isoformat()
        write_file(directory / ROTATED, f"{stamp} {' '.join(names)}\n", CERT_MODE, uid, gid)


def remove_temps(directory: Path) -> None:
    """Delete temporaries a crashed write left behind."""
    if not directory.is_dir():
        return
    for path in directory.rglob(f".*{_TEMP}*"):
        path.unlink(missing_ok=True)


def mode_for(relative: str) -> int:
    return KEY_MODE if relative.endswith(".key") else CERT_MODE


def _check_relative(relative: str) -> None:
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or relative.startswith("."):
        raise ValueError(f"{relative!r} is not a file name inside the node's directory")


def _stage_all(
    directory: Path, files: Mapping[str, str], uid: int | None, gid: int | None
) -> list[tuple[Path, Path]]:
    """Phase 1: every file as a synced temporary. On any failure none is left behind."""
    staged: list[tuple[Path, Path]] = []
    try:
        for relative, content in files.items():
            target = directory / relative
            _make_dir(target.parent, uid, gid)
            staged.append((_stage(target, content, mode_for(relative), uid, gid), target))
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return staged


def _stage(target: Path, content: str, mode: int, uid: int | None, gid: int | None) -> Path:
    temp = target.with_name(f".{target.name}{_TEMP}{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        os.fchmod(fd, mode)  # the final mode, regardless of the umask
        os.write(fd, content.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def write_file(
    target: Path, content: str, mode: int, uid: int | None = None, gid: int | None = None
) -> None:
    """Replace one file atomically (temporary, fsync, rename, fsync of the directory)."""
    temp = _stage(target, content, mode, uid, gid)
    os.replace(temp, target)
    fsync_dir(target.parent)


def _make_dir(path: Path, uid: int | None, gid: int | None) -> None:
    if path.is_dir():
        return
    path.mkdir(mode=DIR_MODE)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
