"""How the agent's and the zone's stores open SQLite and write to it; the only module
that imports sqlite3.

WAL keeps readers (the API) off the writers' lock; synchronous=FULL because a lost
decision is worse than a millisecond; foreign keys are enforced where a schema declares
them. Connections are in autocommit mode: every write goes through ``transaction``.

A ``Database`` has two connections: reads run on the caller's thread (cheap under WAL:
they never wait for a writer and see only committed state), and every write transaction
runs in the database's one writer thread, so the commit's fsync never holds the event
loop and transactions stay serialised (a check and the write it allows, in one
transaction, stay atomic). A write that finds the disk full raises StoreFull (rolled
back; the agent and the zone go on serving reads and answer 503 to writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hostagent.errors import StoreFull

# The types the stores name, so that no other module imports sqlite3.
Connection = sqlite3.Connection
Row = sqlite3.Row

T = TypeVar("T")


class Database:
    """One SQLite file: ``reader`` for reads on any thread, ``write`` for transactions."""

    def __init__(self, path: Path, schema: str) -> None:
        """Open (creating folder and file if needed) the database at ``path`` with
        ``schema``; the file and its -wal/-shm are 0600 whatever the umask (they hold
        tokens)."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _private(path)
        self._writer = _connect(path)
        self._writer.executescript(schema)
        self.reader = _connect(path)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{path.stem}")

    def add_column(self, table: str, column: str, declaration: str) -> None:
        """Add a column that a newer schema has to a table made by an older one; nothing
        when it is there. For the opening store, before any write (runs in the caller's
        thread)."""
        names = {row["name"] for row in self._writer.execute(f"PRAGMA table_info({table})")}
        if column not in names:
            with transaction(self._writer) as db:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one transaction in the writer thread; rolled back if it raises.
        Once started it commits even if the awaiting caller is cancelled."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._transaction, work)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with transaction(self._writer) as db:
                return work(db)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            raise StoreFull(
                f"the state store {self.path} cannot be written, its disk is full ({exc}); "
                "nothing was changed: free space on that filesystem"
            ) from exc

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # what was submitted is committed first
        self._writer.close()
        self.reader.close()


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an existing database that another process may be
    writing (a command beside a running daemon): it creates nothing and changes no mode."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
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
    """One write transaction, taken at once (BEGIN IMMEDIATE); rolled back on any error.
    Some errors (a full disk, out of memory) roll it back themselves, in the statement or
    in COMMIT: the error then surfaces, not a failing ROLLBACK, and no transaction stays
    open to break every later write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
