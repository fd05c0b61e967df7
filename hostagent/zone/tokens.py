"""The next host token of a host, as `hostagent zone host-token` and the lab make it: the
generation after the one that last bootstrapped the host, read from the zone's store
(which may be in use by the running zone: SQLite's WAL lets both)."""

from __future__ import annotations

from pathlib import Path

from common.files import ensure_secret
from hostagent.zone.auth import host_token
from hostagent.zone.store import SqliteZoneStore


def next_host_token(state_dir: Path, host: str) -> str:
    """ValueError for a host id that is no DNS-1123 label."""
    secret = ensure_secret(state_dir / "host-secret")
    store = SqliteZoneStore(state_dir / "zone.db")
    try:
        generation = store.token_generation(host)
    finally:
        store.close()
    return host_token(secret, host, generation + 1)
