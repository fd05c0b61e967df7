from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.access import check_qemu_can_reach, untraversable
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
