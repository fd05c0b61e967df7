"""common.files: atomic replacement and secrets made once, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from common.files import ensure_secret, same_secret, write_atomically


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def test_content_and_mode_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    target = tmp_path / "drive.iso"
    write_atomically(target, b"first", 0o640)
    write_atomically(target, lambda out: out.write(b"second"), 0o640)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["drive.iso"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "context.json"
    write_atomically(target, b"old", 0o600)

    def half(out: BinaryIO) -> None:
        out.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half, 0o600)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["context.json"]


def test_a_secret_is_made_once_with_mode_0600(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "state" / "api-token"
    first = ensure_secret(path, lambda: "abc123")
    assert first == "abc123"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_secret(path, lambda: "other") == "abc123", "never replaced"


def test_a_secret_is_never_left_empty_or_half_made(tmp_path: Path) -> None:
    """Killed while making it (here make() fails), nothing is at the path; an empty file an
    older version left that way is made again; the first whole secret is never replaced."""
    path = tmp_path / "api-token"

    def killed() -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_secret(path, killed)
    assert list(tmp_path.iterdir()) == []
    path.write_text("")
    assert ensure_secret(path, lambda: "fresh") == "fresh"
    assert ensure_secret(path, lambda: "other") == "fresh"
    assert [p.name for p in tmp_path.iterdir()] == ["api-token"]


def test_the_default_secret_is_long_and_random(tmp_path: Path) -> None:
    one, two = ensure_secret(tmp_path / "a"), ensure_secret(tmp_path / "b")
    assert one != two and len(one) >= 40


@pytest.mark.parametrize(
    ("given", "same"),
    [("s3cret", True), ("s3cre", False), ("wröng", False), ("wr\udcf6ng", False), ("", False)],
)
def test_any_string_compares_with_a_secret(given: str, same: bool) -> None:
    assert same_secret(given, "s3cret") is same
    assert same_secret(given, given)
