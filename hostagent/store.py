"""Desired and observed node state, and the pulled images, in SQLite; nothing else in the
agent touches SQL.

Every accepted change is one transaction, committed before the reconciler acts on it.
The database is opened as hostagent/sqlite.py does for the zone too (WAL,
synchronous=FULL: a lost PUT is worse than a millisecond), its writes in a writer thread.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hostagent.errors import StoreFull
from hostagent.imagesource import ImagePhase, ImageSource
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.sqlite import Connection, Database, Row
from network.model import Peer

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS node_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    name    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL,
    at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS node_events_node ON node_events (cluster, name, id);
CREATE TABLE IF NOT EXISTS peers (
    cluster    TEXT PRIMARY KEY,
    peers      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    name         TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    digest       TEXT NOT NULL,
    phase        TEXT NOT NULL,
    message      TEXT NOT NULL DEFAULT '',
    bytes_total  INTEGER,
    updated_at   TEXT NOT NULL,
    unused_since TEXT
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


MAX_NODE_EVENTS = 50  # a node keeps its last this many events


@dataclass(frozen=True)
class NodeEvent:
    """Something that happened to a node: created, spec-changed, started, restarted (after
    its VM stopped by itself), phoned-home, certificate-renewed, failed (why), deleting."""

    kind: str
    message: str
    at: str


class Store:
    """The agent's nodes, their transitions and peer lists.

    Reads are synchronous (WAL: cheap, and they never wait for a writer); every write is
    a coroutine whose transaction runs in the database's writer thread
    (hostagent/sqlite.py), so an fsync never holds the event loop. A write that depends
    on what is stored reads it inside its own transaction."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path, SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get(self, key: NodeKey) -> NodeRecord | None:
        return _get(self._db.reader, key)

    def all(self) -> list[NodeRecord]:
        return _all(self._db.reader)

    async def put(self, key: NodeKey, spec: NodeSpec, token: str, check: Check) -> Put:
        """Create the node, or change its spec, or retry it when Failed: after
        ``check(current, others)`` (raises to refuse) passed in the same transaction."""
        return await self._db.write(lambda db: _put(db, key, spec, token, check))

    async def create(self, key: NodeKey, spec: NodeSpec, token: str) -> NodeRecord:
        """A new node (IntegrityError when the key is taken)."""
        return await self._db.write(lambda db: _create(db, key, spec, token, now()))

    async def update_spec(self, key: NodeKey, spec: NodeSpec) -> None:
        await self._db.write(lambda db: _update_spec(db, key, spec, now()))

    async def mark_deleting(self, key: NodeKey) -> None:
        def work(db: Connection) -> None:
            stamp = now()
            db.execute(
                "UPDATE nodes SET deleting = 1, phase = ?, message = '', updated_at = ? "
                "WHERE cluster = ? AND name = ?",
                (Phase.DELETING, stamp, key.cluster, key.name),
            )
            _log(db, key, Phase.DELETING, "delete requested", stamp)
            _event(db, key, "deleting", "delete requested", stamp)

        await self._db.write(work)

    async def set_phase(
        self,
        key: NodeKey,
        phase: Phase,
        message: str = "",
        *,
        domain_id: int | None = None,
        event: str | None = None,
    ) -> bool:
        """Record a phase; returns False (and writes nothing) when nothing changed. A node
        being deleted reads Deleting until it is gone or its deletion Failed: a pass that
        began before the DELETE (and says Running at its end) does not hide it. event: a
        node event of this kind with the message, in the same write (when it changed)."""

        def work(db: Connection, with_event: bool = True) -> bool:
            changed = _set_phase(db, key, phase, message, domain_id)
            if changed and event is not None and with_event:
                _event(db, key, event, message, now())
            return changed

        try:
            return await self._db.write(work)
        except StoreFull:
            if event is None:
                raise
        # The phase matters more than its event: on a disk too full for both (a Failed
        # that names the full disk), record the phase alone.
        log.warning(
            "%s: the disk is too full for the %r event; recording the phase only", key, event
        )
        return await self._db.write(lambda db: work(db, with_event=False))

    async def set_ready(self, key: NodeKey, guest: dict[str, Any]) -> None:
        def work(db: Connection) -> None:
            stamp = now()
            db.execute(
                "UPDATE nodes SET phase = ?, message = '', guest = ?, updated_at = ? "
                "WHERE cluster = ? AND name = ?",
                (Phase.READY, json.dumps(guest), stamp, key.cluster, key.name),
            )
            _log(db, key, Phase.READY, "guest phoned home", stamp)
            _event(db, key, "phoned-home", "the guest booted and phoned home", stamp)

        await self._db.write(work)

    async def remove(self, key: NodeKey) -> None:
        def work(db: Connection) -> None:
            db.execute("DELETE FROM nodes WHERE cluster = ? AND name = ?", (key.cluster, key.name))
            db.execute(
                "DELETE FROM transitions WHERE cluster = ? AND name = ?", (key.cluster, key.name)
            )
            db.execute(
                "DELETE FROM node_events WHERE cluster = ? AND name = ?", (key.cluster, key.name)
            )

        await self._db.write(work)

    async def add_event(self, key: NodeKey, kind: str, message: str) -> None:
        await self._db.write(lambda db: _event(db, key, kind, message, now()))

    def events(self, key: NodeKey) -> list[NodeEvent]:
        """The node's last MAX_NODE_EVENTS events, oldest first."""
        rows = self._db.reader.execute(
            "SELECT kind, message, at FROM node_events WHERE cluster = ? AND name = ? ORDER BY id",
            (key.cluster, key.name),
        ).fetchall()
        return [NodeEvent(row["kind"], row["message"], row["at"]) for row in rows]

    def transitions(self, key: NodeKey) -> list[Transition]:
        rows = self._db.reader.execute(
            "SELECT phase, message, at FROM transitions WHERE cluster = ? AND name = ? ORDER BY id",
            (key.cluster, key.name),
        ).fetchall()
        return [Transition(Phase(row["phase"]), row["message"], row["at"]) for row in rows]

    # --- peers: the other hosts of a cluster, as the zone last delivered them -----------

    async def set_peers(self, cluster: str, peers: Iterable[Peer]) -> None:
        """Replace the cluster's peer list (one row per cluster, sorted for stable output)."""
        rows = [
            {"address": peer.address, "macs": sorted(peer.macs)}
            for peer in sorted(peers, key=lambda p: ipaddress.IPv4Address(p.address))
        ]
        stamp = now()
        await self._db.write(
            lambda db: db.execute(
                "INSERT INTO peers (cluster, peers, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (cluster) DO UPDATE SET peers = excluded.peers, "
                "updated_at = excluded.updated_at",
                (cluster, json.dumps(rows), stamp),
            )
        )

    def peers(self, cluster: str) -> list[Peer] | None:
        """The cluster's stored peers in address order; None when none were stored."""
        row = self._db.reader.execute(
            "SELECT peers FROM peers WHERE cluster = ?", (cluster,)
        ).fetchone()
        return _peers(row["peers"]) if row else None

    def all_peers(self) -> dict[str, list[Peer]]:
        rows = self._db.reader.execute(
            "SELECT cluster, peers FROM peers ORDER BY cluster"
        ).fetchall()
        return {row["cluster"]: _peers(row["peers"]) for row in rows}

    async def delete_peers(self, cluster: str) -> bool:
        """Forget the cluster's peer list; False when there was none."""
        return await self._db.write(
            lambda db: db.execute("DELETE FROM peers WHERE cluster = ?", (cluster,)).rowcount > 0
        )

    # --- pulled images: name -> source and digest, and how the pull goes ---------------

    def image(self, name: str) -> ImageRecord | None:
        return _image(self._db.reader, name)

    def images(self) -> list[ImageRecord]:
        rows = self._db.reader.execute("SELECT * FROM images ORDER BY name").fetchall()
        return [_image_record(row) for row in rows]

    async def put_image(self, name: str, source: ImageSource, check: ImageCheck) -> ImagePut:
        """Record the image's source after ``check(current, users)`` passed (raises to
        refuse), in one transaction with the nodes it reads: a new digest (or a Failed
        pull) starts Downloading, the same digest from another URL changes no content."""
        return await self._db.write(lambda db: _put_image(db, name, source, check))

    async def set_image_phase(
        self, name: str, digest: str, phase: ImagePhase, message: str, bytes_total: int | None
    ) -> bool:
        """Record how the pull of ``digest`` ended; False (nothing written) when the image
        was deleted or replaced meanwhile."""

        def work(db: Connection) -> bool:
            stamp = now()
            cursor = db.execute(
                "UPDATE images SET phase = ?, message = ?, bytes_total = ?, updated_at = ? "
                "WHERE name = ? AND digest = ?",
                (phase, message, bytes_total, stamp, name, digest),
            )
            return cursor.rowcount > 0

        return bool(await self._db.write(work))

    async def delete_image(self, name: str, check: ImageCheck) -> ImageRecord:
        """Forget the image after ``check(current, users)`` passed; the removed record."""

        def work(db: Connection) -> ImageRecord:
            current = _image(db, name)
            check(current, _users(db, name))
            assert current is not None  # check refuses an unknown image
            db.execute("DELETE FROM images WHERE name = ?", (name,))
            return current

        return await self._db.write(work)

    async def collect_images(self, unused_before: str) -> list[ImageRecord]:
        """Note which images nodes name (unused_since: cleared while one does, set when
        none does any more) and forget the Ready ones unused since before
        ``unused_before``; the forgotten records."""
        return await self._db.write(lambda db: _collect_images(db, unused_before))


@dataclass(frozen=True)
class ImageRecord:
    name: str
    source: ImageSource
    digest: str
    phase: ImagePhase
    message: str
    bytes_total: int | None
    updated_at: str
    unused_since: str | None


@dataclass(frozen=True)
class ImagePut:
    record: ImageRecord
    change: str | None  # "accepted", "replaced", "retry requested", "source moved"; None


# (the image as stored or None, the nodes naming it): raises to refuse the change
ImageCheck = Callable[[ImageRecord | None, list[NodeKey]], None]


@dataclass(frozen=True)
class Put:
    record: NodeRecord
    change: str | None  # "accepted", "spec changed", "retry requested"; None: nothing changed


Check = Callable[[NodeRecord | None, list[NodeRecord]], None]


def _get(db: Connection, key: NodeKey) -> NodeRecord | None:
    row = db.execute(
        "SELECT * FROM nodes WHERE cluster = ? AND name = ?", (key.cluster, key.name)
    ).fetchone()
    return _record(row) if row else None


def _all(db: Connection) -> list[NodeRecord]:
    rows = db.execute("SELECT * FROM nodes ORDER BY cluster, name").fetchall()
    return [_record(row) for row in rows]


def _put(db: Connection, key: NodeKey, spec: NodeSpec, token: str, check: Check) -> Put:
    current = _get(db, key)
    check(current, [r for r in _all(db) if r.key != key])
    stamp = now()
    change: str | None = None
    if current is None:
        change = "accepted"
        _create(db, key, spec, token, stamp)
    elif current.spec != spec:
        change = "spec changed"
        _update_spec(db, key, spec, stamp)
    elif current.phase is Phase.FAILED:
        change = "retry requested"
        _set_phase(db, key, Phase.PENDING, change, None)
    record = _get(db, key)
    assert record is not None
    return Put(record, change)


def _create(db: Connection, key: NodeKey, spec: NodeSpec, token: str, stamp: str) -> NodeRecord:
    db.execute(
        "INSERT INTO nodes (cluster, name, spec, token, phase, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (key.cluster, key.name, spec.model_dump_json(), token, Phase.PENDING, stamp),
    )
    _log(db, key, Phase.PENDING, "accepted", stamp)
    _event(db, key, "created", f"accepted: image {spec.image}, {spec.kubernetes_version}", stamp)
    record = _get(db, key)
    assert record is not None
    return record


def _update_spec(db: Connection, key: NodeKey, spec: NodeSpec, stamp: str) -> None:
    db.execute(
        "UPDATE nodes SET spec = ?, phase = ?, message = ?, updated_at = ? "
        "WHERE cluster = ? AND name = ?",
        (spec.model_dump_json(), Phase.PENDING, "spec changed", stamp, key.cluster, key.name),
    )
    _log(db, key, Phase.PENDING, "spec changed", stamp)
    _event(db, key, "spec-changed", "the node is created again at the new spec", stamp)


def _set_phase(
    db: Connection, key: NodeKey, phase: Phase, message: str, domain_id: int | None
) -> bool:
    current = _get(db, key)
    if current is None or (current.deleting and phase not in (Phase.DELETING, Phase.FAILED)):
        return False
    new_id = domain_id if domain_id is not None else current.domain_id
    if (current.phase, current.message, current.domain_id) == (phase, message, new_id):
        return False
    stamp = now()
    db.execute(
        "UPDATE nodes SET phase = ?, message = ?, domain_id = ?, updated_at = ? "
        "WHERE cluster = ? AND name = ?",
        (phase, message, new_id, stamp, key.cluster, key.name),
    )
    if (current.phase, current.message) != (phase, message):
        _log(db, key, phase, message, stamp)
    return True


def _image(db: Connection, name: str) -> ImageRecord | None:
    row = db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
    return _image_record(row) if row else None


def _users(db: Connection, image: str) -> list[NodeKey]:
    return [record.key for record in _all(db) if record.spec.image == image]


def _put_image(db: Connection, name: str, source: ImageSource, check: ImageCheck) -> ImagePut:
    current = _image(db, name)
    check(current, _users(db, name))
    stamp, digest = now(), source.digest()
    if current is None:
        change: str | None = "accepted"
        db.execute(
            "INSERT INTO images (name, source, digest, phase, updated_at) VALUES (?, ?, ?, ?, ?)",
            (name, source.model_dump_json(), digest, ImagePhase.DOWNLOADING, stamp),
        )
    elif current.digest != digest or current.phase is ImagePhase.FAILED:
        change = "replaced" if current.digest != digest else "retry requested"
        db.execute(
            "UPDATE images SET source = ?, digest = ?, phase = ?, message = '', "
            "bytes_total = NULL, updated_at = ?, unused_since = NULL WHERE name = ?",
            (source.model_dump_json(), digest, ImagePhase.DOWNLOADING, stamp, name),
        )
    elif current.source != source:
        change = "source moved"
        db.execute(
            "UPDATE images SET source = ?, updated_at = ? WHERE name = ?",
            (source.model_dump_json(), stamp, name),
        )
    else:
        change = None
    record = _image(db, name)
    assert record is not None
    return ImagePut(record, change)


def _collect_images(db: Connection, unused_before: str) -> list[ImageRecord]:
    used = {record.spec.image for record in _all(db)}
    stamp = now()
    db.execute(
        f"UPDATE images SET unused_since = NULL WHERE name IN ({', '.join('?' * len(used))})",
        tuple(used),
    )
    db.execute(
        "UPDATE images SET unused_since = ? WHERE unused_since IS NULL AND phase = ? AND name "
        f"NOT IN ({', '.join('?' * len(used))})",
        (stamp, ImagePhase.READY, *used),
    )
    rows = db.execute(
        "SELECT * FROM images WHERE phase = ? AND unused_since < ?",
        (ImagePhase.READY, unused_before),
    ).fetchall()
    expired = [_image_record(row) for row in rows if row["name"] not in used]
    for record in expired:
        db.execute("DELETE FROM images WHERE name = ?", (record.name,))
    return expired


def _image_record(row: Row) -> ImageRecord:
    return ImageRecord(
        name=row["name"],
        source=ImageSource.model_validate_json(row["source"]),
        digest=row["digest"],
        phase=ImagePhase(row["phase"]),
        message=row["message"],
        bytes_total=row["bytes_total"],
        updated_at=row["updated_at"],
        unused_since=row["unused_since"],
    )


def _peers(text: str) -> list[Peer]:
    return [Peer(item["address"], frozenset(item["macs"])) for item in json.loads(text)]


def _event(db: Connection, key: NodeKey, kind: str, message: str, stamp: str) -> None:
    """Keep the event as the node's latest; the oldest beyond MAX_NODE_EVENTS go."""
    db.execute(
        "INSERT INTO node_events (cluster, name, kind, message, at) VALUES (?, ?, ?, ?, ?)",
        (key.cluster, key.name, kind, message, stamp),
    )
    db.execute(
        "DELETE FROM node_events WHERE cluster = ? AND name = ? AND id <= (SELECT id FROM "
        "node_events WHERE cluster = ? AND name = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (key.cluster, key.name, key.cluster, key.name, MAX_NODE_EVENTS),
    )


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
