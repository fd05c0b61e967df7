"""hostagent.virt.disk: a qemu-img that hangs is killed at its timeout, and reaped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.errors import ProvisioningError
from hostagent.virt import disk

HUNG_QEMU_IMG = """#!/bin/sh
# A stand-in for a hung qemu-img (an image on a dead NFS mount): it never answers.
echo $$ > "{pidfile}"
exec sleep 600
"""


@pytest.fixture
def hung_qemu_img_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `qemu-img` first on PATH that records its pid and then hangs; returns the pid file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pidfile = tmp_path / "qemu-img.pid"
    script = bin_dir / "qemu-img"
    script.write_text(HUNG_QEMU_IMG.format(pidfile=pidfile))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return pidfile


async def test_a_hung_qemu_img_is_killed_at_its_timeout(
    hung_qemu_img_stand_in: Path, tmp_path: Path
) -> None:
    with pytest.raises(ProvisioningError) as caught:
        await disk.ensure_blank(tmp_path / "etcd.qcow2", 1, timeout_s=0.5)
    assert "qemu-img create" in str(caught.value)
    assert "0.5s" in str(caught.value)
    pid = int(hung_qemu_img_stand_in.read_text())
    with pytest.raises(ProcessLookupError):  # killed and waited for: not even a zombie
        os.kill(pid, 0)
    assert not (tmp_path / "etcd.qcow2").exists()
