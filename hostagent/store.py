"""Desired and observed node state in SQLite; nothing else in the agent touches SQL.

Every accepted change is one transaction, committed before the reconciler acts on it.
The database is opened as hostagent/sqlite.py does for the zone too (WAL,
synchronous=FULL: a lost PUT is worse than a millisecond).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.sqlite import Connection, Row, open_database, transaction
from network.model import Peer

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    cluster    TEXT NOT NULL,
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    token      TEXT NOT NULL,
    phase      TEXT NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    deleting   INTEGER NOT NULL DEFAULT 0,
    guest      TEXT,
    domain_id  INTEGER,
    PRIMARY KEY (cluster, name)
);
CREATE TABLE IF NOT EXISTS transitions (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    name    TEXT NOT NULL,
    phase   TEXT NOT NULL,
    message TEXT NOT NULL,
    at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_node ON transitions (cluster, name, id);
CREATE TABLE IF NOT EXISTS peers (
    cluster    TEXT PRIMARY KEY,
    peers      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class NodeRecord:
    key: NodeKey
    spec: NodeSpec
    token: str
    phase: Phase
    message: str
    updated_at: str
    deleting: bool
    guest: dict[str, Any] | None
    domain_id: int | None


@dataclass(frozen=True)
class Transition:
    phase: Phase
    message: str
    at: str


class Store:
    def __init__(self, path: Path) -> None:
        self._db = open_database(path, SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get(self, key: NodeKey) -> NodeRecord | None:
        row = self._db.execute(
            "SELECT * FROM nodes WHERE cluster = ? AND name = ?", (key.cluster, key.name)
        ).fetchone()
        return _record(row) if row else None

    def all(self) -> list[NodeRecord]:
        rows = self._db.execute("SELECT * FROM nodes ORDER BY cluster, name").fetchall()
        return [_record(row) for row in rows]

    def create(self, key: NodeKey, spec: NodeSpec, token: str) -> NodeRecord:
        stamp = now()
        with transaction(self._db) as db:
            db.execute(
                "INSERT INTO nodes (cluster, name, spec, token, phase, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key.cluster, key.name, spec.model_dump_json(), token, Phase.PENDING, stamp),
            )
            _log(db, key, Phase.PENDING, "accepted", stamp)
        record = self.get(key)
        assert record is not None
        return record

    def update_spec(self, key: NodeKey, spec: NodeSpec) -> None:
        stamp = now()
        with transaction(self._db) as db:
            db.execute(
                "UPDATE nodes SET spec = ?, phase = ?, message = ?, updated_at = ? "
                "WHERE cluster = ? AND name = ?",
                (
                    spec.model_dump_json(),
                    Phase.PENDING,
                    "spec changed",
                    stamp,
                    key.cluster,
                    key.name,
                ),
            )
            _log(db, key, Phase.PENDING, "spec changed", stamp)

    def mark_deleting(self, key: NodeKey) -> None:
        stamp = now()
        with transaction(self._db) as db:
            db.execute(
                "UPDATE nodes SET deleting = 1, phase = ?, message = '', updated_at = ? "
                "WHERE cluster = ? AND name = ?",
                (Phase.DELETING, stamp, key.cluster, key.name),
            )
            _log(db, key, Phase.DELETING, "delete requested", stamp)

    def set_phase(
        self, key: NodeKey, phase: Phase, message: str = "", *, domain_id: int | None = None
    ) -> bool:
        """Record a phase; returns False (and writes nothing) when nothing changed."""
        current = self.get(key)
        if current is None:
            return False
        new_id = domain_id if domain_id is not None else current.domain_id
        if (current.phase, current.message, current.domain_id) == (phase, message, new_id):
            return False
        stamp = now()
        with transaction(self._db) as db:
            db.execute(
                "UPDATE nodes SET phase = ?, message = ?, domain_id = ?, updated_at = ? "
                "WHERE cluster = ? AND name = ?",
                (phase, message, new_id, stamp, key.cluster, key.name),
            )
            if (current.phase, current.message) != (phase, message):
                _log(db, key, phase, message, stamp)
        return True

    def set_ready(self, key: NodeKey, guest: dict[str, Any]) -> None:
        stamp = now()
        with transaction(self._db) as db:
            db.execute(
                "UPDATE nodes SET phase = ?, message = '', guest = ?, updated_at = ? "
                "WHERE cluster = ? AND name = ?",
                (Phase.READY, json.dumps(guest), stamp, key.cluster, key.name),
            )
            _log(db, key, Phase.READY, "guest phoned home", stamp)

    def remove(self, key: NodeKey) -> None:
        with transaction(self._db) as db:
            db.execute("DELETE FROM nodes WHERE cluster = ? AND name = ?", (key.cluster, key.name))
            db.execute(
                "DELETE FROM transitions WHERE cluster = ? AND name = ?", (key.cluster, key.name)
            )

    def transitions(self, key: NodeKey) -> list[Transition]:
        rows = self._db.execute(
            "SELECT phase, message, at FROM transitions WHERE cluster = ? AND name = ? ORDER BY id",
            (key.cluster, key.name),
        ).fetchall()
        return [Transition(Phase(row["phase"]), row["message"], row["at"]) for row in rows]

    # --- peers: the other hosts of a cluster, as the zone last delivered them -----------

    def set_peers(self, cluster: str, peers: Iterable[Peer]) -> None:
        """Replace the cluster's peer list (one row per cluster, sorted for stable output)."""
        rows = [
            {"address": peer.address, "macs": sorted(peer.macs)}
            for peer in sorted(peers, key=lambda p: ipaddress.IPv4Address(p.address))
        ]
        with transaction(self._db) as db:
            db.execute(
                "INSERT INTO peers (cluster, peers, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (cluster) DO UPDATE SET peers = excluded.peers, "
                "updated_at = excluded.updated_at",
                (cluster, json.dumps(rows), now()),
            )

    def peers(self, cluster: str) -> list[Peer] | None:
        """The cluster's stored peers in address order; None when none were stored."""
        row = self._db.execute("SELECT peers FROM peers WHERE cluster = ?", (cluster,)).fetchone()
        return _peers(row["peers"]) if row else None

    def all_peers(self) -> dict[str, list[Peer]]:
        rows = self._db.execute("SELECT cluster, peers FROM peers ORDER BY cluster").fetchall()
        return {row["cluster"]: _peers(row["peers"]) for row in rows}

    def delete_peers(self, cluster: str) -> bool:
        """Forget the cluster's peer list; False when there was none."""
        with transaction(self._db) as db:
            cursor = db.execute("DELETE FROM peers WHERE cluster = ?", (cluster,))
        return cursor.rowcount > 0


def _peers(text: str) -> list[Peer]:
    return [Peer(item["address"], frozenset(item["macs"])) for item in json.loads(text)]


def _log(db: Connection, key: NodeKey, phase: Phase, message: str, stamp: str) -> None:
    db.execute(
        "INSERT INTO transitions (cluster, name, phase, message, at) VALUES (?, ?, ?, ?, ?)",
        (key.cluster, key.name, phase, message, stamp),
    )


def _record(row: Row) -> NodeRecord:
    return NodeRecord(
        key=NodeKey(cluster=row["cluster"], name=row["name"]),
        spec=NodeSpec.model_validate_json(row["spec"]),
        token=row["token"],
        phase=Phase(row["phase"]),
        message=row["message"],
        updated_at=row["updated_at"],
        deleting=bool(row["deleting"]),
        guest=json.loads(row["guest"]) if row["guest"] else None,
        domain_id=row["domain_id"],
    )
