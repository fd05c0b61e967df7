"""pki.files: the manifest, set writes (modes, order, temporaries), expiries."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki import files

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def manifest(**certs: files.CertRecord) -> files.Manifest:
    return files.Manifest("c1", "w1", "worker", "ecdsa", dict(certs))


def record(serial: str = "0a:0b") -> files.CertRecord:
    return files.CertRecord(serial, NOW, NOW + timedelta(days=90), "fp")


def test_manifest_round_trip() -> None:
    original = manifest(**{"kube-proxy": record(), "ca": files.CertRecord("01", NOW, NOW)})
    assert files.Manifest.from_json(original.to_json()) == original


def test_write_set_modes_and_expiries(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    content = {"ca.crt": "CA\n", "etcd/peer.crt": "CRT\n", "etcd/peer.key": "KEY\n"}
    files.write_set(directory, content, manifest(**{"etcd/peer": record()}))
    assert (directory / "etcd/peer.key").read_text() == "KEY\n"
    assert (directory / "etcd/peer.key").stat().st_mode & 0o777 == 0o600
    assert (directory / "etcd/peer.crt").stat().st_mode & 0o777 == 0o644
    assert (directory / "etcd").stat().st_mode & 0o777 == 0o700
    assert files.read_expiries(directory) == {"etcd/peer": NOW + timedelta(days=90)}
    assert not (directory / files.ROTATED).exists()
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]


def test_rotated_is_touched_with_the_renewed_names(tmp_path: Path) -> None:
    files.write_set(tmp_path, {"a.crt": "x"}, manifest(), rotated=["b", "a"])
    stamp, names = (tmp_path / files.ROTATED).read_text().split(" ", 1)
    assert names == "a b\n"
    assert datetime.fromisoformat(stamp) <= datetime.now(UTC)


def test_certificates_are_renamed_before_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        order.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    files.write_set(tmp_path, {"a.key": "k", "a.crt": "c", "b.key": "k", "b.crt": "c"}, manifest())
    assert order.index("a.crt") < order.index("a.key")
    assert order.index("b.crt") < order.index("b.key")
    assert order[-1] == files.MANIFEST


def test_a_failed_staging_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.crt").write_text("old")
    calls = 0
    real = os.fsync

    def failing_fsync(fd: int) -> None:  # failure injection: the disk fills up at file 2
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        files.write_set(tmp_path, {"a.crt": "new", "b.crt": "new"}, manifest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.crt"]
    assert (tmp_path / "a.crt").read_text() == "old"


def test_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / "etcd").mkdir()
    (tmp_path / "etcd" / ".peer.key.tmp-0123abcd").write_text("stale")
    files.write_set(tmp_path, {"ca.crt": "x"}, manifest())
    assert not (tmp_path / "etcd" / ".peer.key.tmp-0123abcd").exists()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.crt", "etcd/../../x", ".manifest.json"])
def test_paths_must_stay_inside(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="inside"):
        files.write_set(tmp_path, {bad: "x"}, manifest())
    assert list(tmp_path.iterdir()) == []


def test_missing_or_broken_manifest(tmp_path: Path) -> None:
    assert files.read_manifest(tmp_path / "nowhere") is None
    assert files.read_expiries(tmp_path / "nowhere") == {}
    (tmp_path / files.MANIFEST).write_text('{"version": 99}')
    assert files.read_manifest(tmp_path) is None
    (tmp_path / files.MANIFEST).write_text("{not json")
    assert files.read_manifest(tmp_path) is None
