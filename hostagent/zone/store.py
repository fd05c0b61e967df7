"""The zone's state behind a small interface (ZoneStore) with SQLite as the embedded default.

Everything the zone decides is written here first, in one transaction per decision, and
everything it does afterwards (deliveries to agents) is re-derived from it, so a restart
loses nothing and re-drives what was in flight. The replicated backend, etcd
(zone/etcdstore.py), implements the same protocol; the store's tests run against both.

Reads are synchronous (cheap under WAL); writes are coroutines whose transactions run in
the store's writer thread, so an fsync never holds the event loop. As other writes can
commit between a decision and its own write, a write re-checks inside its transaction what
the decision assumed (the hosts are still there, the cluster is not being deleted) and
raises Stale when it no longer holds: the caller decides again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hostagent.imagesource import ImageSource
from hostagent.model import Role
from hostagent.sqlite import Connection, Database, Row, read_only
from hostagent.store import now
from hostagent.zone.liveness import DEFAULT_REPORT_INTERVAL_S, report_due
from hostagent.zone.model import STORED, ClusterSpec, HostReport
from hostagent.zone.rollout import Shape

MAX_EVENTS = 50  # a cluster keeps its last this many events


@dataclass(frozen=True)
class HostRecord:
    id: str
    report: HostReport
    registered_at: str
    last_heartbeat: float  # seconds since the epoch: survives a restart of the zone
    # etcd: whether the host's lease is alive (its state); None (SQLite): judged by the
    # time of the last heartbeat
    alive: bool | None = None


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    spec: ClusterSpec
    vni: int
    node_subnet: str
    pod_cidr: str
    service_cidr: str
    created_at: str
    deleting: bool = False
    vip: str | None = None  # the masters' VRRP address; None for clusters made before it


@dataclass(frozen=True)
class NodeRecord:
    cluster: str
    name: str
    role: Role
    host: str
    address: str
    created_at: str  # of its current incarnation: a re-creation in place sets it anew
    deleting: bool = False
    # What it runs (was last sent); None: its cluster's spec (a record from before rollouts)
    shape: Shape | None = None
    generation: int = 0  # bumped to have its agent re-create it in place (remediation)


@dataclass(frozen=True)
class ClusterEvent:
    """Something that happened to a cluster or the zone did to one of its nodes (created,
    scaled, deleted; a remediation, a drain hook's answer, a rollout that stopped); the
    cluster keeps its last MAX_EVENTS."""

    at: float  # seconds since the epoch
    kind: str  # "created", "scaled", "deleted", "remediation", "drain" or "rollout"
    node: str  # "" for an event of the whole cluster
    role: Role | None
    message: str


@dataclass(frozen=True)
class CatalogueImage:
    """An image of the zone's catalogue: the agent's ImageSource under a name."""

    name: str
    source: ImageSource
    created_at: str

    @property
    def digest(self) -> str:
        """As the agents show it: sha256:<the source's digest>."""
        return f"sha256:{self.source.digest()}"


# Decides, inside a catalogue write, on the image as stored (None: absent) and the clusters
# naming it; raises (Conflict, NotFound) to write nothing.
ImageCheck = Callable[[CatalogueImage | None, list[str]], None]


def naming(image: str, clusters: Iterable[ClusterRecord], nodes: Iterable[NodeRecord]) -> list[str]:
    """The clusters whose spec, or one of whose nodes (a rollout under way), names image."""
    names = {c.name for c in clusters if c.spec.image == image}
    names |= {n.cluster for n in nodes if n.shape is not None and n.shape.image == image}
    return sorted(names)


@dataclass(frozen=True)
class Gateway:
    cluster: str
    host: str
    address: str


@dataclass(frozen=True)
class HostRemoval:
    """What remove_host did: nothing while ``live`` names nodes the zone still wants;
    otherwise the host is gone with ``forgotten``, the nodes it held that were being
    removed."""

    live: list[NodeRecord]
    forgotten: list[NodeRecord]


@dataclass(frozen=True)
class HostCertificate:
    """The last client certificate the zone issued to a host."""

    not_after: str
    token_generation: int  # of the host token that last bootstrapped it


class Stale(Exception):
    """The state a decision was made on changed before it was written; nothing was."""


class ZoneStore(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def put_host(self, host: str, report: HostReport, at: float) -> bool: ...
    def hosts(self) -> list[HostRecord]: ...
    def host(self, host: str) -> HostRecord | None: ...
    async def remove_host(self, host: str) -> HostRemoval: ...
    def clusters(self) -> list[ClusterRecord]: ...
    def cluster(self, name: str) -> ClusterRecord | None: ...
    def nodes(self, cluster: str | None = None) -> list[NodeRecord]: ...
    def gateways(self, cluster: str | None = None) -> list[Gateway]: ...
    def nodes_near(self, host: str) -> list[NodeRecord]: ...
    async def create_cluster(
        self, cluster: ClusterRecord, nodes: Iterable[NodeRecord], gateways: Iterable[Gateway]
    ) -> None: ...
    async def scale(
        self,
        name: str,
        spec: ClusterSpec,
        add: Iterable[NodeRecord],
        gateways: Iterable[Gateway],
        remove: Iterable[str],
    ) -> None: ...
    async def mark_cluster_deleting(self, name: str) -> None: ...
    async def remove_node(self, cluster: str, name: str) -> None: ...
    async def remove_cluster(self, name: str) -> None: ...
    async def replace_node(self, node: NodeRecord) -> None: ...
    def events(self, cluster: str) -> list[ClusterEvent]: ...
    async def add_event(self, cluster: str, event: ClusterEvent) -> None: ...
    def deliveries(self, host: str) -> dict[tuple[str, str], str]: ...
    async def set_delivery(self, host: str, kind: str, key: str, digest: str | None) -> None: ...
    def images(self) -> list[CatalogueImage]: ...
    def image(self, name: str) -> CatalogueImage | None: ...
    async def put_image(self, image: CatalogueImage, check: ImageCheck) -> bool: ...
    async def delete_image(self, name: str, check: ImageCheck) -> None: ...
    def token_generation(self, host: str) -> int: ...
    def certificates(self) -> dict[str, HostCertificate]: ...
    async def record_certificate(
        self, host: str, generation: int | None, not_after: str
    ) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    id             TEXT PRIMARY KEY,
    report         TEXT NOT NULL,
    registered_at  TEXT NOT NULL,
    last_heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clusters (
    name         TEXT PRIMARY KEY,
    spec         TEXT NOT NULL,
    vni          INTEGER NOT NULL UNIQUE,
    node_subnet  TEXT NOT NULL UNIQUE,
    pod_cidr     TEXT NOT NULL UNIQUE,
    service_cidr TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    deleting     INTEGER NOT NULL DEFAULT 0,
    vip          TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    cluster    TEXT NOT NULL REFERENCES clusters (name),
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    host       TEXT NOT NULL,
    address    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    deleting   INTEGER NOT NULL DEFAULT 0,
    shape      TEXT,
    generation INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, name),
    UNIQUE (cluster, address)
);
CREATE INDEX IF NOT EXISTS nodes_by_host ON nodes (host);
CREATE TABLE IF NOT EXISTS gateways (
    cluster TEXT NOT NULL REFERENCES clusters (name),
    host    TEXT NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (cluster, host),
    UNIQUE (cluster, address)
);
CREATE TABLE IF NOT EXISTS deliveries (
    host   TEXT NOT NULL,
    kind   TEXT NOT NULL,
    key    TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (host, kind, key)
);
CREATE TABLE IF NOT EXISTS events (
    cluster TEXT PRIMARY KEY,
    events  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    name       TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS host_certificates (
    host       TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    not_after  TEXT NOT NULL
);
"""


class SqliteZoneStore:
    """ZoneStore in one SQLite file, opened as the agent's store is (hostagent/sqlite.py)."""

    def __init__(self, path: Path, report_interval_s: float = DEFAULT_REPORT_INTERVAL_S) -> None:
        self.db = Database(path, SCHEMA)
        self.report_interval_s = report_interval_s
        # A heartbeat with an unchanged report is not written (an fsync each, the cost of a
        # zone of many hosts): the host's report as last written and when, and its latest
        # heartbeat, which a restart loses (the row's is at most report_interval_s older).
        self._written: dict[str, tuple[str, float]] = {}
        self._beats: dict[str, float] = {}
        # A zone.db made before clusters had a VIP: its clusters keep none (NULL).
        self.db.add_column("clusters", "vip", "TEXT")
        # Each host's report as last validated, with the JSON it came from: a report is
        # validated again only when it changed, not on every read of every host.
        self._reports: dict[str, tuple[str, HostReport]] = {}

    async def start(self) -> None:
        """Add the node columns a database made before rollouts lacks."""

        def work(db: Connection) -> None:
            have = {row["name"] for row in db.execute("PRAGMA table_info(nodes)")}
            for column in NODE_COLUMNS:
                if column.split()[0] not in have:
                    db.execute(f"ALTER TABLE nodes ADD COLUMN {column}")

        await self.db.write(work)

    async def close(self) -> None:
        self.db.close()

    # --- hosts -----------------------------------------------------------------------

    async def put_host(self, host: str, report: HostReport, at: float) -> bool:
        """Store a host's latest report; True when the host registered for the first time.
        An unchanged report is written again only every report_interval_s
        (liveness.report_due); in between only the heartbeat's time is kept, in memory."""
        text = report.model_dump_json()
        written = self._written.get(host)
        if written is not None and not report_due(
            written[0], text, written[1], at, self.report_interval_s
        ):
            self._beats[host] = at
            return False

        def work(db: Connection) -> bool:
            known = db.execute("SELECT 1 FROM hosts WHERE id = ?", (host,)).fetchone()
            db.execute(
                "INSERT INTO hosts (id, report, registered_at, last_heartbeat) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "report = excluded.report, last_heartbeat = excluded.last_heartbeat",
                (host, text, now(), at),
            )
            return known is None

        first = await self.db.write(work)
        self._written[host] = (text, at)
        self._beats[host] = at
        return first

    def hosts(self) -> list[HostRecord]:
        rows = self.db.reader.execute("SELECT * FROM hosts ORDER BY id").fetchall()
        return [self._host(row) for row in rows]

    def host(self, host: str) -> HostRecord | None:
        row = self.db.reader.execute("SELECT * FROM hosts WHERE id = ?", (host,)).fetchone()
        return None if row is None else self._host(row)

    def _host(self, row: Row) -> HostRecord:
        text = row["report"]
        cached = self._reports.get(row["id"])
        if cached is None or cached[0] != text:
            cached = (text, parse_report(text))
            self._reports[row["id"]] = cached
        beat = max(row["last_heartbeat"], self._beats.get(row["id"], 0.0))
        return HostRecord(row["id"], cached[1], row["registered_at"], beat)

    async def remove_host(self, host: str) -> HostRemoval:
        """Forget the host, unless it holds a node the zone still wants; the nodes it held
        that were being removed (and their gateways) go with it."""
        removal = await self.db.write(lambda db: _remove_host(db, host))
        if not removal.live:
            self._reports.pop(host, None)
            self._written.pop(host, None)
            self._beats.pop(host, None)
        return removal

    # --- clusters and nodes ----------------------------------------------------------

    def clusters(self) -> list[ClusterRecord]:
        rows = self.db.reader.execute("SELECT * FROM clusters ORDER BY name").fetchall()
        return [_cluster(row) for row in rows]

    def cluster(self, name: str) -> ClusterRecord | None:
        return _get_cluster(self.db.reader, name)

    def nodes(self, cluster: str | None = None) -> list[NodeRecord]:
        if cluster is None:
            rows = self.db.reader.execute("SELECT * FROM nodes ORDER BY cluster, name").fetchall()
        else:
            query = "SELECT * FROM nodes WHERE cluster = ? ORDER BY name"
            rows = self.db.reader.execute(query, (cluster,)).fetchall()
        return [_node(row) for row in rows]

    def nodes_near(self, host: str) -> list[NodeRecord]:
        """Every node of every cluster that has a node on host: what host's work needs."""
        rows = self.db.reader.execute(
            "SELECT * FROM nodes WHERE cluster IN (SELECT cluster FROM nodes WHERE host = ?) "
            "ORDER BY cluster, name",
            (host,),
        ).fetchall()
        return [_node(row) for row in rows]

    def gateways(self, cluster: str | None = None) -> list[Gateway]:
        if cluster is None:
            rows = self.db.reader.execute("SELECT * FROM gateways ORDER BY cluster, host")
        else:
            query = "SELECT * FROM gateways WHERE cluster = ? ORDER BY host"
            rows = self.db.reader.execute(query, (cluster,))
        return [Gateway(row["cluster"], row["host"], row["address"]) for row in rows.fetchall()]

    async def create_cluster(
        self, cluster: ClusterRecord, nodes: Iterable[NodeRecord], gateways: Iterable[Gateway]
    ) -> None:
        """Stale when a node's host is gone."""
        nodes, gateways = list(nodes), list(gateways)

        def work(db: Connection) -> None:
            db.execute(
                "INSERT INTO clusters (name, spec, vni, node_subnet, pod_cidr, service_cidr, "
                "created_at, vip) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cluster.name,
                    cluster.spec.model_dump_json(),
                    cluster.vni,
                    cluster.node_subnet,
                    cluster.pod_cidr,
                    cluster.service_cidr,
                    cluster.created_at,
                    cluster.vip,
                ),
            )
            _insert(db, nodes, gateways)

        await self.db.write(work)

    async def scale(
        self,
        name: str,
        spec: ClusterSpec,
        add: Iterable[NodeRecord],
        gateways: Iterable[Gateway],
        remove: Iterable[str],
    ) -> None:
        """Stale when the cluster is gone or being deleted, or a new node's host is gone or
        lost the cluster's gateway."""
        add, gateways, remove = list(add), list(gateways), list(remove)

        def work(db: Connection) -> None:
            current = _get_cluster(db, name)
            if current is None or current.deleting:
                raise Stale(f"cluster {name} is gone or being deleted")
            db.execute(
                "UPDATE clusters SET spec = ? WHERE name = ?", (spec.model_dump_json(), name)
            )
            _insert(db, add, gateways)
            db.executemany(
                "UPDATE nodes SET deleting = 1 WHERE cluster = ? AND name = ?",
                [(name, node) for node in remove],
            )

        await self.db.write(work)

    async def mark_cluster_deleting(self, name: str) -> None:
        def work(db: Connection) -> None:
            db.execute("UPDATE clusters SET deleting = 1 WHERE name = ?", (name,))
            db.execute("UPDATE nodes SET deleting = 1 WHERE cluster = ?", (name,))

        await self.db.write(work)

    async def remove_node(self, cluster: str, name: str) -> None:
        """The node is gone from its host: forget it, and its host's gateway when it was the
        cluster's last node there."""
        await self.db.write(lambda db: _remove_node(db, cluster, name))

    async def remove_cluster(self, name: str) -> None:
        def work(db: Connection) -> None:
            db.execute("DELETE FROM nodes WHERE cluster = ?", (name,))
            db.execute("DELETE FROM gateways WHERE cluster = ?", (name,))
            db.execute("DELETE FROM events WHERE cluster = ?", (name,))
            db.execute("DELETE FROM clusters WHERE name = ?", (name,))

        await self.db.write(work)

    async def replace_node(self, node: NodeRecord) -> None:
        """Write a node's record anew (a re-creation in place); Stale when the node is gone
        or being deleted."""

        def work(db: Connection) -> None:
            row = db.execute(
                "SELECT deleting FROM nodes WHERE cluster = ? AND name = ?",
                (node.cluster, node.name),
            ).fetchone()
            if row is None or row["deleting"]:
                raise Stale(f"node {node.cluster}/{node.name} is gone or being deleted")
            db.execute(
                "UPDATE nodes SET created_at = ?, shape = ?, generation = ? "
                "WHERE cluster = ? AND name = ?",
                (
                    node.created_at,
                    _shape_json(node.shape),
                    node.generation,
                    node.cluster,
                    node.name,
                ),
            )

        await self.db.write(work)

    def events(self, cluster: str) -> list[ClusterEvent]:
        query = "SELECT events FROM events WHERE cluster = ?"
        row = self.db.reader.execute(query, (cluster,)).fetchone()
        return [] if row is None else events_of(row["events"])

    async def add_event(self, cluster: str, event: ClusterEvent) -> None:
        """Keep event as the cluster's latest (the oldest goes beyond MAX_EVENTS)."""

        def work(db: Connection) -> None:
            row = db.execute("SELECT events FROM events WHERE cluster = ?", (cluster,)).fetchone()
            kept = [] if row is None else events_of(row["events"])
            db.execute(
                "INSERT INTO events (cluster, events) VALUES (?, ?) ON CONFLICT (cluster) "
                "DO UPDATE SET events = excluded.events",
                (cluster, events_json([*kept, event])),
            )

        await self.db.write(work)

    # --- what each agent has acknowledged --------------------------------------------

    def deliveries(self, host: str) -> dict[tuple[str, str], str]:
        rows = self.db.reader.execute(
            "SELECT kind, key, digest FROM deliveries WHERE host = ?", (host,)
        ).fetchall()
        return {(row["kind"], row["key"]): row["digest"] for row in rows}

    async def set_delivery(self, host: str, kind: str, key: str, digest: str | None) -> None:
        """Record what host acknowledged for (kind, key); None forgets it."""
        await self.db.write(lambda db: _set_delivery(db, host, kind, key, digest))

    # --- the image catalogue ---------------------------------------------------------

    def images(self) -> list[CatalogueImage]:
        rows = self.db.reader.execute("SELECT * FROM images ORDER BY name").fetchall()
        return [_image(row) for row in rows]

    def image(self, name: str) -> CatalogueImage | None:
        return _get_image(self.db.reader, name)

    async def put_image(self, image: CatalogueImage, check: ImageCheck) -> bool:
        """Store image after check; True when the name is new (the same source again
        changes nothing)."""

        def work(db: Connection) -> bool:
            current = _get_image(db, image.name)
            check(current, _naming(db, image.name))
            if current is not None and current.source == image.source:
                return False
            db.execute(
                "INSERT INTO images (name, source, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET source = excluded.source, "
                "created_at = excluded.created_at",
                (image.name, image.source.model_dump_json(), image.created_at),
            )
            return current is None

        return await self.db.write(work)

    async def delete_image(self, name: str, check: ImageCheck) -> None:
        def work(db: Connection) -> None:
            check(_get_image(db, name), _naming(db, name))
            db.execute("DELETE FROM images WHERE name = ?", (name,))

        await self.db.write(work)

    # --- the hosts' client certificates ----------------------------------------------

    def token_generation(self, host: str) -> int:
        """The generation of the host token that last bootstrapped host (0: none did)."""
        return _token_generation(self.db.reader, host)

    def certificates(self) -> dict[str, HostCertificate]:
        rows = self.db.reader.execute("SELECT * FROM host_certificates").fetchall()
        return {row["host"]: HostCertificate(row["not_after"], row["generation"]) for row in rows}

    async def record_certificate(self, host: str, generation: int | None, not_after: str) -> None:
        """Record a certificate issued to host: bootstrapped by a host token of generation
        (Stale, nothing written, when that generation or a later one was taken before),
        or renewed (generation None)."""

        def work(db: Connection) -> None:
            taken = _token_generation(db, host)
            if generation is not None and generation <= taken:
                raise Stale(f"host token generation {generation} of {host} was used")
            db.execute(
                "INSERT INTO host_certificates (host, generation, not_after) VALUES (?, ?, ?) "
                "ON CONFLICT (host) DO UPDATE SET generation = excluded.generation, "
                "not_after = excluded.not_after",
                (host, taken if generation is None else generation, not_after),
            )

        await self.db.write(work)


def token_generation_in(path: Path, host: str) -> int:
    """token_generation of the zone database at path, read beside a running zone without
    creating or changing anything (0 when there is no database, or no such table yet)."""
    if not path.exists():
        return 0
    with read_only(path) as db:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        if db.execute(query, ("host_certificates",)).fetchone() is None:
            return 0
        return _token_generation(db, host)


def _token_generation(db: Connection, host: str) -> int:
    query = "SELECT generation FROM host_certificates WHERE host = ?"
    row = db.execute(query, (host,)).fetchone()
    return 0 if row is None else int(row["generation"])


def _get_cluster(db: Connection, name: str) -> ClusterRecord | None:
    row = db.execute("SELECT * FROM clusters WHERE name = ?", (name,)).fetchone()
    return None if row is None else _cluster(row)


def _get_image(db: Connection, name: str) -> CatalogueImage | None:
    row = db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
    return None if row is None else _image(row)


def _image(row: Row) -> CatalogueImage:
    source = ImageSource.model_validate_json(row["source"])
    return CatalogueImage(row["name"], source, row["created_at"])


def _naming(db: Connection, image: str) -> list[str]:
    clusters = [_cluster(row) for row in db.execute("SELECT * FROM clusters")]
    nodes = [_node(row) for row in db.execute("SELECT * FROM nodes WHERE shape IS NOT NULL")]
    return naming(image, clusters, nodes)


def _remove_host(db: Connection, host: str) -> HostRemoval:
    rows = db.execute(
        "SELECT nodes.*, clusters.deleting AS cluster_deleting FROM nodes "
        "JOIN clusters ON clusters.name = nodes.cluster WHERE host = ? ORDER BY cluster, name",
        (host,),
    ).fetchall()
    live = [_node(row) for row in rows if not row["deleting"] and not row["cluster_deleting"]]
    if live:
        return HostRemoval(live, [])
    db.execute("DELETE FROM nodes WHERE host = ?", (host,))
    db.execute("DELETE FROM gateways WHERE host = ?", (host,))
    db.execute("DELETE FROM deliveries WHERE host = ?", (host,))
    db.execute("DELETE FROM hosts WHERE id = ?", (host,))
    return HostRemoval([], [_node(row) for row in rows])


def _remove_node(db: Connection, cluster: str, name: str) -> None:
    row = db.execute(
        "SELECT host FROM nodes WHERE cluster = ? AND name = ?", (cluster, name)
    ).fetchone()
    if row is None:
        return
    db.execute("DELETE FROM nodes WHERE cluster = ? AND name = ?", (cluster, name))
    left = db.execute(
        "SELECT 1 FROM nodes WHERE cluster = ? AND host = ?", (cluster, row["host"])
    ).fetchone()
    if left is None:
        db.execute("DELETE FROM gateways WHERE cluster = ? AND host = ?", (cluster, row["host"]))


def _set_delivery(db: Connection, host: str, kind: str, key: str, digest: str | None) -> None:
    if digest is None:
        db.execute(
            "DELETE FROM deliveries WHERE host = ? AND kind = ? AND key = ?", (host, kind, key)
        )
    else:
        db.execute(
            "INSERT INTO deliveries (host, kind, key, digest) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (host, kind, key) DO UPDATE SET digest = excluded.digest",
            (host, kind, key, digest),
        )


def _insert(db: Connection, nodes: list[NodeRecord], gateways: list[Gateway]) -> None:
    """Insert placed nodes and new gateways; Stale (rolled back) when a node's host is gone
    or has no gateway of the cluster (another write removed what the placement saw)."""
    db.executemany(
        "INSERT INTO nodes (cluster, name, role, host, address, created_at, shape, generation) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                n.cluster,
                n.name,
                n.role.value,
                n.host,
                n.address,
                n.created_at,
                _shape_json(n.shape),
                n.generation,
            )
            for n in nodes
        ],
    )
    db.executemany(
        "INSERT OR IGNORE INTO gateways (cluster, host, address) VALUES (?, ?, ?)",
        [(g.cluster, g.host, g.address) for g in gateways],
    )
    for cluster, host in sorted({(n.cluster, n.host) for n in nodes}):
        if db.execute("SELECT 1 FROM hosts WHERE id = ?", (host,)).fetchone() is None:
            raise Stale(f"host {host} left the zone")
        query = "SELECT 1 FROM gateways WHERE cluster = ? AND host = ?"
        if db.execute(query, (cluster, host)).fetchone() is None:
            raise Stale(f"host {host} lost its gateway on cluster {cluster}")


def parse_report(text: str | bytes) -> HostReport:
    """A stored report as the zone took it (rules added since do not make it unreadable)."""
    return HostReport.model_validate(json.loads(text), context=STORED)


def _cluster(row: Row) -> ClusterRecord:
    return ClusterRecord(
        name=row["name"],
        spec=ClusterSpec.model_validate(json.loads(row["spec"])),
        vni=row["vni"],
        node_subnet=row["node_subnet"],
        pod_cidr=row["pod_cidr"],
        service_cidr=row["service_cidr"],
        created_at=row["created_at"],
        deleting=bool(row["deleting"]),
        vip=row["vip"],
    )


def _node(row: Row) -> NodeRecord:
    return NodeRecord(
        cluster=row["cluster"],
        name=row["name"],
        role=Role(row["role"]),
        host=row["host"],
        address=row["address"],
        created_at=row["created_at"],
        deleting=bool(row["deleting"]),
        shape=None if row["shape"] is None else shape_of_json(json.loads(row["shape"])),
        generation=row["generation"],
    )


NODE_COLUMNS = ("shape TEXT", "generation INTEGER NOT NULL DEFAULT 0")


def _shape_json(shape: Shape | None) -> str | None:
    return None if shape is None else json.dumps(shape_data(shape), separators=(",", ":"))


def shape_data(shape: Shape) -> dict[str, Any]:
    return dataclasses.asdict(shape)


def shape_of_json(data: dict[str, Any]) -> Shape:
    return Shape(**data)


def events_json(events: list[ClusterEvent]) -> str:
    """The last MAX_EVENTS of events as the stores keep them."""
    data = [
        {**dataclasses.asdict(e), "role": e.role and e.role.value} for e in events[-MAX_EVENTS:]
    ]
    return json.dumps(data, separators=(",", ":"))


def events_of(text: str | bytes) -> list[ClusterEvent]:
    return [ClusterEvent(**{**e, "role": e["role"] and Role(e["role"])}) for e in json.loads(text)]
