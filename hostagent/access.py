"""Can QEMU's user reach the agent's files and /dev/kvm? Checked at start, so a wrong
mode is one clear message instead of every node failing with libvirt's 'Permission
denied', or every libvirt call taking tens of seconds (see kvm_device)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from hostagent.errors import ConfigError

KVM_DEVICE = Path("/dev/kvm")
# What Debian's udev rule (50-udev-default.rules) gives /dev/kvm.
KVM_GROUP = "kvm"
KVM_MODE = 0o660
UDEV_CONTROL = Path("/run/udev/control")


def allowed(info: os.stat_result, uid: int, gids: set[int], bits: int) -> bool:
    """Whether uid (with gids) has all `bits` (a mix of R_OK, W_OK, X_OK) on info."""
    if uid == 0:
        return True  # root passes permission checks (CAP_DAC_OVERRIDE)
    if info.st_uid == uid:
        shift = 6
    elif info.st_gid in gids:
        shift = 3
    else:
        shift = 0
    return (info.st_mode >> shift) & bits == bits


def untraversable(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first directory from / down to path that uid (with gids) may not enter."""
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            return None  # the agent creates the rest itself, traversable
        if not allowed(info, uid, gids, os.X_OK):
            return directory
    return None


def _user(qemu_user: str) -> tuple[int, set[int]]:
    try:
        user = pwd.getpwnam(qemu_user)
    except KeyError as exc:
        raise ConfigError(f"libvirt.qemu_user: no user {qemu_user!r} on this host") from exc
    return user.pw_uid, set(os.getgrouplist(user.pw_name, user.pw_gid))


def check_qemu_can_reach(qemu_user: str, **paths: Path) -> None:
    uid, gids = _user(qemu_user)
    for key, path in paths.items():
        blocked = untraversable(path.resolve(), uid, gids)
        if blocked is not None:
            mode = stat.filemode(blocked.stat().st_mode)
            raise ConfigError(
                f"{key}: QEMU runs as {qemu_user}, who cannot enter {blocked} ({mode}), so "
                f"it could not open the VMs' files under {path}; allow it "
                f"(chmod o+x {blocked}) or choose another {key}"
            )


@dataclass(frozen=True)
class KvmDevice:
    """/dev/kvm as QEMU's user sees it.

    libvirt (9.0) asks, on every lookup of its QEMU capabilities, whether QEMU's user
    may open /dev/kvm. When the device exists but that user may not (no udev applied
    Debian's rule), libvirt judges its cache stale and probes QEMU again each time:
    defines and starts take 20-150 s instead of milliseconds, whatever the domain type.
    """

    path: str
    present: bool
    mode: str = ""
    owner: str = ""
    qemu_user: str = ""
    usable: bool = False

    @property
    def problem(self) -> str | None:
        if not self.present or self.usable:
            return None
        return (
            f"{self.path} is {self.mode} {self.owner}: QEMU's user {self.qemu_user} cannot "
            "open it, so libvirt re-probes QEMU on every call (defines and starts take "
            "20-150 s, with domain_type qemu too)"
        )

    @property
    def fix(self) -> str | None:
        if self.problem is None:
            return None
        return (
            f"chgrp {KVM_GROUP} {self.path}; chmod {KVM_MODE:o} {self.path}; then restart "
            "libvirtd (udev's rule does this at boot where udev runs)"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "present": self.present,
            "mode": self.mode,
            "owner": self.owner,
            "qemu_user": self.qemu_user,
            "usable_by_qemu": self.usable,
            "problem": self.problem,
            "fix": self.fix,
        }


def _name(lookup: str, number: int) -> str:
    try:
        if lookup == "user":
            return pwd.getpwuid(number).pw_name
        return grp.getgrgid(number).gr_name
    except KeyError:
        return str(number)


def kvm_device(qemu_user: str, path: Path = KVM_DEVICE) -> KvmDevice:
    try:
        info = path.stat()
    except FileNotFoundError:
        return KvmDevice(str(path), present=False)
    uid, gids = _user(qemu_user)
    return KvmDevice(
        str(path),
        present=True,
        mode=stat.filemode(info.st_mode),
        owner=f"{_name('user', info.st_uid)}:{_name('group', info.st_gid)}",
        qemu_user=qemu_user,
        usable=allowed(info, uid, gids, os.R_OK | os.W_OK),
    )


def grant_udev_permissions(
    path: Path = KVM_DEVICE, udev_control: Path = UDEV_CONTROL
) -> str | None:
    """Give the device what udev's rule would (group kvm, 0660) when no udev runs.

    Returns what was done, for the caller to say, or None when nothing was needed.
    """
    if udev_control.exists() or not path.exists():
        return None
    info = path.stat()
    group = grp.getgrnam(KVM_GROUP).gr_gid
    if info.st_gid == group and stat.S_IMODE(info.st_mode) == KVM_MODE:
        return None
    before = f"{stat.filemode(info.st_mode)} {_name('group', info.st_gid)}"
    os.chown(path, -1, group)
    path.chmod(KVM_MODE)
    return (
        f"{path} was {before} and no udev runs: gave it udev's group {KVM_GROUP} and mode "
        f"{KVM_MODE:o}, so libvirt's QEMU user can use it (libvirt calls take milliseconds "
        "instead of tens of seconds)"
    )
