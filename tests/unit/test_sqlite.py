"""hostagent.sqlite: the database and its -wal/-shm files are 0600 whatever the umask
(they hold node tokens, and the zone's agent tokens)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.errors import StoreFull
from hostagent.sqlite import Database

SCHEMA = "CREATE TABLE IF NOT EXISTS t (v TEXT);"


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def modes(path: Path) -> dict[str, int]:
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.exists()}


def write(path: Path) -> dict[str, int]:
    """Open, write once and report the modes while the connections are open."""

    async def once() -> dict[str, int]:
        db = Database(path, SCHEMA)
        try:
            await db.write(lambda c: c.execute("INSERT INTO t VALUES ('secret')"))
            return modes(path)
        finally:
            db.close()

    return asyncio.run(once())


def test_database_wal_and_shm_are_0600_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "state" / "state.db"
    first = write(path)
    assert first == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    assert write(path) == first  # reopened
    assert set(modes(path).values()) == {0o600}


def test_files_an_earlier_version_left_open_are_made_0600(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "zone.db"
    for name in ("zone.db", "zone.db-shm"):
        (tmp_path / name).touch(mode=0o644)
    assert write(path) == {"zone.db": 0o600, "zone.db-wal": 0o600, "zone.db-shm": 0o600}


async def test_a_full_database_refuses_the_write_clearly_and_stays_usable(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full" (here its page limit: the same error as a
    full disk) becomes StoreFull, changes nothing, and the next write that fits works."""
    path = tmp_path / "state.db"
    db = Database(path, SCHEMA)
    try:
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('kept')"))
        pages = db.reader.execute("PRAGMA page_count").fetchone()[0]
        await db.write(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}"))
        with pytest.raises(StoreFull, match=f"state store {path} cannot be written, its disk"):
            await db.write(lambda c: c.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,)))
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('small')"))
        rows = [row[0] for row in db.reader.execute("SELECT v FROM t").fetchall()]
        assert rows == ["kept", "small"]
    finally:
        db.close()
