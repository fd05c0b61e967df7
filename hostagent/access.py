"""Can QEMU's user reach the agent's files? Checked at start, so a wrong mode is one clear
error instead of every node failing with libvirt's 'Permission denied'."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from hostagent.errors import ConfigError


def untraversable(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first directory from / down to path that uid (with gids) may not enter."""
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            return None  # the agent creates the rest itself, traversable
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in gids:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def check_qemu_can_reach(qemu_user: str, **paths: Path) -> None:
    try:
        user = pwd.getpwnam(qemu_user)
    except KeyError as exc:
        raise ConfigError(f"libvirt.qemu_user: no user {qemu_user!r} on this host") from exc
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for key, path in paths.items():
        blocked = untraversable(path.resolve(), user.pw_uid, gids)
        if blocked is not None:
            mode = stat.filemode(blocked.stat().st_mode)
            raise ConfigError(
                f"{key}: QEMU runs as {qemu_user}, who cannot enter {blocked} ({mode}), so "
                f"it could not open the VMs' files under {path}; allow it "
                f"(chmod o+x {blocked}) or choose another {key}"
            )
