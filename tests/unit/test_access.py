from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.access import (
    allowed,
    check_qemu_can_reach,
    grant_udev_permissions,
    kvm_device,
    untraversable,
)
from hostagent.errors import ConfigError
from tests.conftest import require

NOBODY = 65534


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A folder whose every ancestor anyone may enter (pytest's own tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="hostagent-access-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_closed_parent_is_found(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    inner = closed / "state"
    inner.mkdir(parents=True)
    tmp_path.chmod(0o755)
    closed.chmod(0o700)
    assert untraversable(inner, NOBODY, {NOBODY}) == closed
    closed.chmod(0o711)
    assert untraversable(inner, NOBODY, {NOBODY}) is None


def test_owner_and_group_bits_count(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    folder = tmp_path / "f"
    folder.mkdir(mode=0o710)
    require(os.geteuid() == 0, "chown to another group needs root")
    os.chown(folder, 0, 4242)
    assert untraversable(folder, NOBODY, {4242}) is None
    assert untraversable(folder, NOBODY, {NOBODY}) == folder


def test_missing_tail_is_fine(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    assert untraversable(tmp_path / "not" / "yet", NOBODY, {NOBODY}) is None


def test_error_names_the_key_and_the_directory(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    tmp_path.chmod(0o755)
    with pytest.raises(ConfigError, match=rf"^state_dir: .*cannot enter {closed}"):
        check_qemu_can_reach("nobody", state_dir=closed / "state")


def test_unknown_user(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"libvirt\.qemu_user"):
        check_qemu_can_reach("no-such-user-here", state_dir=tmp_path)


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFCHR | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


RW = os.R_OK | os.W_OK


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "user_gids", "usable"),
    [
        (0o600, 0, 0, {107, 64055}, False),  # no udev: root only
        (0o660, 0, 107, {107, 64055}, True),  # Debian's rule: root:kvm 0660
        (0o640, 0, 107, {107, 64055}, False),  # group may read, not write
        (0o660, 0, 107, {64055}, False),  # the user is not in group kvm
        (0o666, 0, 0, {64055}, True),  # world read-write
        (0o600, 64055, 0, {64055}, True),  # the user owns it
    ],
)
def test_kvm_permission_bits(
    mode: int, uid: int, gid: int, user_gids: set[int], usable: bool
) -> None:
    assert allowed(_stat(mode, uid, gid), 64055, user_gids, RW) is usable


def test_root_passes_every_check() -> None:
    assert allowed(_stat(0o000, 1, 1), 0, {0}, RW)


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A character device node like /dev/kvm but harmless (/dev/null's numbers)."""
    require(os.geteuid() == 0, "mknod needs root")
    require(_group_exists("kvm"), "needs group kvm (Debian's qemu/udev packages make it)")
    path = tmp_path / "kvm"
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return path


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_a_root_only_device_is_reported_with_its_fix(device: Path) -> None:
    seen = kvm_device("nobody", device)
    assert seen.present and not seen.usable
    assert seen.mode == "crw-------" and seen.owner == "root:root"
    assert seen.problem is not None and "nobody cannot open it" in seen.problem
    assert seen.fix == f"chgrp kvm {device}; chmod 660 {device}; then restart libvirtd " + (
        "(udev's rule does this at boot where udev runs)"
    )
    assert seen.as_dict()["usable_by_qemu"] is False


def test_no_device_is_no_problem(tmp_path: Path) -> None:
    seen = kvm_device("nobody", tmp_path / "kvm")
    assert not seen.present and seen.problem is None and seen.fix is None


def test_udev_permissions_are_granted_once(device: Path, tmp_path: Path) -> None:
    no_udev = tmp_path / "no-udev-control"
    said = grant_udev_permissions(device, no_udev)
    assert said is not None and "was crw------- root" in said
    info = device.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("kvm").gr_gid
    assert grant_udev_permissions(device, no_udev) is None, "already right: nothing to do"
    libvirt_qemu = _user_exists("libvirt-qemu")
    if libvirt_qemu:
        assert kvm_device("libvirt-qemu", device).usable


def test_a_host_with_udev_is_left_alone(device: Path, tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.touch()
    assert grant_udev_permissions(device, control) is None
    assert stat.S_IMODE(device.stat().st_mode) == 0o600


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
