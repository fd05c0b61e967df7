"""The zone's configured store: SQLite in state_dir, or etcd ([store] backend)."""

from __future__ import annotations

from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.etcd import Etcd, Tls
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.liveness import lease_ttl
from hostagent.zone.store import SqliteZoneStore, ZoneStore


def make_store(config: ZoneServerConfig) -> ZoneStore:
    """The configured store, not started yet (Zone.start starts it)."""
    store = config.store
    if store.backend == "sqlite":
        return SqliteZoneStore(
            config.state_dir / "zone.db", report_interval_s=config.hosts.report_interval_s
        )
    etcd = Etcd(
        store.endpoints,
        Tls(store.ca_file, store.cert_file, store.key_file),
        dial_timeout_s=store.dial_timeout_s,
        request_timeout_s=store.request_timeout_s,
    )
    hosts = config.hosts
    return EtcdZoneStore(
        etcd,
        store.prefix,
        host_lease_ttl_s=lease_ttl(hosts.lease_ttl_s, hosts.heartbeat_interval_s),
        report_interval_s=hosts.report_interval_s,
    )
