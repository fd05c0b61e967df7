"""The cost of one round of the zone's delivery passes (one pass per host: what
`Deliverer._pass` reads from the service and the store, without the HTTP calls) with the
SQLite store, at 250, 500, 1000 and 2000 hosts.

Every host runs nodes: clusters of 3 masters + 2 workers are created until each host holds
some. Before a timed round every host reports again with a changed report (untimed), as
heartbeats do between two rounds, so the round validates each new report once. Baseline
in the same run: the full-scan path the zone had before (every pass read every host,
cluster and gateway and validated every host's report: hosts squared per round), timed on
a sample of passes and scaled to the whole round. No root, no libvirt, no CA (the PKI
backend is a stand-in: making CAs is not what is measured).
With --etcd URL the same rounds run on the etcd store (a one-time prefix on that member,
deleted after with the hosts' leases; no old path to compare with there). Its hosts'
leases last LEASE_S: setting up 1,000 hosts and their clusters takes longer than the
default 15 s, and a host whose lease lapsed is NotReady, which placement refuses.
Run:  .venv/bin/python -m bench.zone_pass [--hosts 250,500,1000,2000] [--sample 40]
      [--etcd http://127.0.0.1:2379]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.desired import host_work
from hostagent.zone.etcd import Delete, Etcd, Tls
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.model import STORED, ClusterSpec, HostReport
from hostagent.zone.service import ZoneService
from hostagent.zone.store import HostRecord, SqliteZoneStore, ZoneStore

LEASE_S = 3600  # the etcd hosts' lease TTL: longer than any set-up

CLUSTER = ClusterSpec.model_validate(
    {
        "kubernetes_version": "1.31.2",
        "masters": {"count": 3, "vcpus": 1, "memory_mib": 1024, "disk_gib": 10},
        "workers": {"count": 2, "vcpus": 1, "memory_mib": 1024, "disk_gib": 10},
    }
)


class NoCa:
    """Stands in for the PKI backend: creating a cluster makes no CAs here."""

    def ensure_cluster(self, cluster: str) -> None:
        return None


def report(i: int, beat: int) -> HostReport:
    return HostReport.model_validate(
        {
            "api_url": f"https://10.{i // 250}.{i % 250}.1:8470",
            "api_token": f"token-{i}",
            "underlay_address": f"10.{i // 250}.{i % 250}.1",
            "failure_domain": f"rack-{i % 20}",
            "allocatable": {"vcpus": 64, "memory_mib": 262144, "disk_gib": 4000},
            "allocated": {"vcpus": 0, "memory_mib": beat, "disk_gib": 0},
            "version": "0.1.0",
        }
    )


def old_hosts(store: SqliteZoneStore) -> list[HostRecord]:
    """SqliteZoneStore.hosts() before the parse cache: every report validated again."""
    rows = store.db.reader.execute("SELECT * FROM hosts ORDER BY id").fetchall()
    return [
        HostRecord(
            row["id"],
            HostReport.model_validate(json.loads(row["report"]), context=STORED),
            row["registered_at"],
            row["last_heartbeat"],
        )
        for row in rows
    ]


def old_pass(service: ZoneService, store: SqliteZoneStore, host: str) -> Any:
    """The pass as it was: ZoneService.work over full scans of hosts, clusters, gateways."""
    nodes = store.nodes_near(host)
    names = {n.cluster for n in nodes}
    clusters = {c.name: c for c in store.clusters() if c.name in names}
    gateways = [g for g in store.gateways() if g.cluster in names]
    hosts = {h.id: h for h in old_hosts(store)}
    store.deliveries(host)
    return host_work(host, clusters, nodes, gateways, hosts, service.config.network.mtu)


def new_pass(service: ZoneService, store: ZoneStore, host: str) -> Any:
    service.api_of(host)
    store.deliveries(host)
    return service.work(host)


async def open_store(tmp: Path, etcd: str | None) -> ZoneStore:
    store: ZoneStore
    if etcd is None:
        store = SqliteZoneStore(tmp / "zone.db")
    else:
        client = Etcd([etcd], Tls(), dial_timeout_s=2.0, request_timeout_s=30.0)
        prefix = f"/bench-zone-pass/{uuid.uuid4().hex}/"
        store = EtcdZoneStore(client, prefix, host_lease_ttl_s=LEASE_S)
    await store.start()
    return store


async def measure(hosts: int, sample: int, rounds: int, etcd: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-zone-pass-") as tmp:
        store = await open_store(Path(tmp), etcd)
        config = ZoneServerConfig(state_dir=Path(tmp))
        # A fixed clock: setting up 2000 hosts takes longer than heartbeat_timeout_s.
        service = ZoneService(store, config, NoCa(), clock=lambda: 1e9)  # type: ignore[arg-type]
        ids = [f"h{i:04d}" for i in range(hosts)]
        for i, host in enumerate(ids):
            await service.report(host, report(i, 0))
        clusters = 0
        while len({n.host for n in store.nodes()}) < hosts:
            await service.put_cluster(f"c{clusters}", CLUSTER)
            clusters += 1
        new_ms = []
        for beat in range(1, rounds + 1):
            for i, host in enumerate(ids):
                await service.report(host, report(i, beat))
            start = time.perf_counter()
            for host in ids:
                new_pass(service, store, host)
            new_ms.append((time.perf_counter() - start) * 1000)
        warm = time.perf_counter()
        for host in ids:
            new_pass(service, store, host)
        warm_ms = (time.perf_counter() - warm) * 1000
        old_ms = 0.0
        if isinstance(store, SqliteZoneStore):
            for host in ids[:sample]:  # the same answer both ways
                if old_pass(service, store, host) != service.work(host):
                    raise SystemExit(f"{host}: the old and the new pass disagree")
            start = time.perf_counter()
            for host in ids[:sample]:
                old_pass(service, store, host)
            old_ms = (time.perf_counter() - start) * 1000 * hosts / sample
        else:  # leave the member as it was
            assert isinstance(store, EtcdZoneStore)
            for lease in set(store.mirror.alive.values()):
                await store.etcd.revoke(lease)
            await store.etcd.txn([], [Delete(store.layout.prefix, prefix=True)])
        await store.close()
        return {
            "clusters": clusters,
            "new": statistics.median(new_ms),
            "warm": warm_ms,
            "old": old_ms,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="250,500,1000,2000")
    parser.add_argument("--sample", type=int, default=40, help="old-path passes timed")
    parser.add_argument("--rounds", type=int, default=3, help="new-path rounds (median)")
    parser.add_argument("--etcd", help="an etcd client URL: measure the etcd store instead")
    args = parser.parse_args()
    store = f"etcd {args.etcd}" if args.etcd else "SQLite"
    print(f"one delivery round = one pass per host (service and store reads, no HTTP), {store}")
    print(
        f"new: median of {args.rounds} rounds, each after every host reported a changed "
        f"report; old: {args.sample} passes timed, scaled to the round"
    )
    per_host = {}
    for hosts in (int(h) for h in args.hosts.split(",")):
        result = asyncio.run(measure(hosts, args.sample, args.rounds, args.etcd))
        per_host[hosts] = result["new"] / hosts
        print(f"{hosts} hosts ({result['clusters']:.0f} clusters of 5 nodes)")
        print(f"  round, after every host reported: {result['new']:.1f} ms")
        print(f"  round, no report changed: {result['warm']:.1f} ms")
        if result["old"]:
            print(f"  old full-scan round: {result['old']:.0f} ms")
            print(f"  old / new: {result['old'] / result['new']:.0f}x")
        print(f"  per pass: {result['new'] / hosts * 1000:.0f} us")
    first, last = min(per_host), max(per_host)
    print(
        f"growth per pass from {first} to {last} hosts: "
        f"{per_host[last] / per_host[first]:.2f}x (1.00 = a round grows linearly with hosts)"
    )


if __name__ == "__main__":
    main()
