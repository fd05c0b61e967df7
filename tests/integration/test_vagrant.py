"""The Vagrant lab: the Vagrantfile validates with vagrant-libvirt, the box builds.

The box build (debootstrap + disk, a few minutes) is cached by its recipe hash under
/var/cache/hostagent-test/vagrant (HOSTAGENT_VAGRANT_CACHE), so CI rebuilds it only
when vagrant/build_box.py's recipe changes. Bringing the lab up is not tested here (no
KVM on these machines: see docs/vagrant.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import require

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def _vagrant_env(home: Path) -> dict[str, str]:
    # A private VAGRANT_HOME: no boxes or state of the user's; the Debian package's
    # vagrant-libvirt is a system plugin and is found all the same.
    return {**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_HOME": str(home)}


def _require_vagrant_libvirt(home: Path) -> None:
    require(shutil.which("vagrant") is not None, "needs vagrant (Debian package vagrant)")
    plugins = subprocess.run(
        ["vagrant", "plugin", "list"], capture_output=True, text=True, env=_vagrant_env(home)
    )
    require(
        "vagrant-libvirt" in plugins.stdout,
        f"needs the vagrant-libvirt plugin (Debian package vagrant-libvirt): {plugins.stdout}",
    )


def test_vagrantfile_validates(tmp_path: Path) -> None:
    _require_vagrant_libvirt(tmp_path)
    proc = subprocess.run(
        ["vagrant", "validate"],
        cwd=VAGRANT_DIR,
        capture_output=True,
        text=True,
        env=_vagrant_env(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


def test_vagrantfile_defines_the_lab(tmp_path: Path) -> None:
    _require_vagrant_libvirt(tmp_path)
    proc = subprocess.run(
        ["vagrant", "status", "--machine-readable"],
        cwd=VAGRANT_DIR,
        capture_output=True,
        text=True,
        env=_vagrant_env(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    machines = {line.split(",")[1] for line in proc.stdout.splitlines() if ",state," in line}
    assert machines == {"zone", "host1", "host2"}


def test_scripts_parse() -> None:
    for script in ("build-box.sh", "provision.sh"):
        subprocess.run(["bash", "-n", str(VAGRANT_DIR / script)], check=True)


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_box", VAGRANT_DIR / "build_box.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def box_file() -> Path:
    require(os.geteuid() == 0, "needs root (debootstrap, loop device)")
    for tool in ("debootstrap", "qemu-img", "mkfs.ext4", "sfdisk", "losetup"):
        require(shutil.which(tool) is not None, f"needs {tool}: run scripts/setup-host.sh")
    builder = _builder()
    box: Path = builder.build_box(progress=lambda line: print(line, flush=True))
    return box


@pytest.mark.timeout(1800)
def test_box_is_valid(box_file: Path, tmp_path: Path) -> None:
    with tarfile.open(box_file) as tar:
        assert sorted(tar.getnames()) == ["Vagrantfile", "box.img", "metadata.json"]
        tar.extractall(tmp_path, filter="data")
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["provider"] == "libvirt"
    assert meta["format"] == "qcow2"
    assert isinstance(meta["virtual_size"], int) and meta["virtual_size"] > 0
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(tmp_path / "box.img")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == meta["virtual_size"] << 30
    # Bootable: the MBR's signature and a bootable (0x80) Linux (0x83) partition.
    raw = tmp_path / "head.raw"
    subprocess.run(
        ["qemu-img", "dd", "-O", "raw", "bs=512", "count=1",
         f"if={tmp_path / 'box.img'}", f"of={raw}"],
        check=True,
    )  # fmt: skip
    mbr = raw.read_bytes()
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[446] == 0x80 and mbr[446 + 4] == 0x83
