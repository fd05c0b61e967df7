"""cloudconfig.configdrive: a real ISO written to tmp_path and read back with pycdlib."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pycdlib
import pytest

from cloudconfig.configdrive import build_config_drive, config_drive_files, read_config_drive
from cloudconfig.context import MasterPeer, NodeContext

FILES = {
    "meta-data": b"instance-id: alpha-m1-1\nlocal-hostname: m1\n",
    "network-config": b"version: 2\n",
    "user-data": b"#cloud-config\n" + bytes(range(256)) * 40,  # binary-safe, > 1 block
}


def open_iso(path: Path) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    return iso


def extract(iso: pycdlib.PyCdlib, **where: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **where)
    return out.getvalue()


def test_round_trip(tmp_path: Path) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, FILES)
    assert read_config_drive(drive) == FILES


def test_empty_file_round_trips(tmp_path: Path) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, {"user-data": b""})
    assert read_config_drive(drive) == {"user-data": b""}


def test_volume_identifier_is_cidata(tmp_path: Path) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, FILES)
    iso = open_iso(drive)
    try:
        # The field is space-padded to 32 bytes on disk.
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
    finally:
        iso.close()


def test_iso9660_joliet_and_rock_ridge_names(tmp_path: Path) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, FILES)
    iso = open_iso(drive)
    try:
        assert extract(iso, iso_path="/USERDATA.;1") == FILES["user-data"]
        assert extract(iso, iso_path="/NETWORKCONFIG.;1") == FILES["network-config"]
        for name, content in FILES.items():
            assert extract(iso, joliet_path=f"/{name}") == content
            assert extract(iso, rr_path=f"/{name}") == content
    finally:
        iso.close()


def test_replaced_atomically_without_leftovers(tmp_path: Path) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, {"user-data": b"old"})
    old_inode = drive.stat().st_ino
    build_config_drive(drive, {"user-data": b"new"})
    # A new inode: the old file was replaced by rename, never rewritten in place.
    assert drive.stat().st_ino != old_inode
    assert read_config_drive(drive) == {"user-data": b"new"}
    assert os.listdir(tmp_path) == ["cidata.iso"]


def test_readable_by_qemu_user(tmp_path: Path) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, FILES)
    assert stat.S_IMODE(drive.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "files",
    [
        {"../user-data": b""},
        {"User-Data": b""},
        {"": b""},
        {"a" * 31: b""},
        {"user-data": b"", "userdata": b""},  # both USERDATA in ISO 9660
    ],
)
def test_bad_names_are_refused_and_nothing_is_written(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, {"user-data": b"old"})
    with pytest.raises(ValueError):
        build_config_drive(drive, files)
    assert read_config_drive(drive) == {"user-data": b"old"}
    assert os.listdir(tmp_path) == ["cidata.iso"]


def test_failed_replace_leaves_no_temp_file(tmp_path: Path) -> None:
    # A non-empty directory where the drive should go makes os.replace fail for real.
    drive = tmp_path / "cidata.iso"
    drive.mkdir()
    (drive / "keep").write_bytes(b"")
    with pytest.raises(OSError):
        build_config_drive(drive, FILES)
    assert os.listdir(tmp_path) == ["cidata.iso"]


@pytest.mark.parametrize("role", ["master", "worker"])
def test_rendered_node_round_trips(tmp_path: Path, role: str) -> None:
    # A full master's user-data (manifests, Calico) is tens of kB: many ISO blocks.
    ctx = NodeContext(
        cluster="alpha",
        node="m1",
        role=role,
        hostname="m1",
        instance_id="alpha-m1-1",
        mac="52:54:00:12:34:56",
        address="10.42.0.11/24",
        gateway="10.42.0.1",
        mtu=1450,
        kubernetes_version="1.31.2",
        ssh_authorized_keys=(),
        phone_home_url="http://10.42.0.1:8472/v1/phone-home/alpha/m1",
        phone_home_token="00ff",
        masters=(MasterPeer("m1", "10.42.0.11"),),
    )
    files = config_drive_files(ctx)
    assert set(files) == {"user-data", "meta-data", "network-config"}
    drive = tmp_path / "cidata.iso"
    build_config_drive(drive, files)
    assert read_config_drive(drive) == files
