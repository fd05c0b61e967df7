"""How the agent's and the zone's stores open SQLite and write to it; the only module
that imports sqlite3.

WAL keeps readers (the API) off the writers' lock; synchronous=FULL because a lost
decision is worse than a millisecond; foreign keys are enforced where a schema declares
them. The connection is in autocommit mode: every write goes through ``transaction``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The types the stores name, so that no other module imports sqlite3.
Connection = sqlite3.Connection
Row = sqlite3.Row


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating folder and file if needed) the database at ``path`` with ``schema``;
    the file and its -wal/-shm are 0600 whatever the umask (they hold tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    return db


def _private(path: Path) -> None:
    """Make the database file 0600 before SQLite opens it, and what an earlier run left
    beside it: SQLite gives the -wal and -shm it creates the database file's mode."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            file.chmod(0o600)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (BEGIN IMMEDIATE); rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
