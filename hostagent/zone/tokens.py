"""The next host token of a host, as `hostagent zone host-token` and the lab make it: the
generation after the one that last bootstrapped the host, read from the zone's store
without changing it (the running zone owns it; a zone that never ran has none: generation
1). With SQLite the database is read read-only; with etcd the store is read once."""

from __future__ import annotations

import asyncio

from common.files import ensure_secret
from hostagent.zone.auth import host_token
from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.store import token_generation_in
from hostagent.zone.stores import make_store


def next_host_token(config: ZoneServerConfig, host: str) -> str:
    """ValueError for a host id that is no DNS-1123 label; StoreUnavailable when etcd
    cannot be read."""
    secret = ensure_secret(config.state_dir / "host-secret")
    return host_token(secret, host, _taken(config, host) + 1)


def _taken(config: ZoneServerConfig, host: str) -> int:
    if config.store.backend == "sqlite":
        return token_generation_in(config.state_dir / "zone.db", host)
    return asyncio.run(_taken_in_etcd(config, host))


async def _taken_in_etcd(config: ZoneServerConfig, host: str) -> int:
    store = make_store(config)
    await store.start()
    try:
        return store.token_generation(host)
    finally:
        await store.close()
