"""Placement of a cluster's nodes over a zone's hosts: hostagent.zone.placement.place.

100 nodes (3 masters + 97 workers) and 1000 nodes (3 + 997) over 1000 hosts in 20 failure
domains, with varied free resources (some hosts nearly full, some with a larger QEMU
overhead). The baseline, measured in the same run, is a naive reference placement in this
file: the same rules, but for every node it scans every host, keys the ones the node fits
on and sorts them. Its assignments are checked to be the same as place()'s. As a floor,
the time to merely copy and sort the host list by id. No root, no libvirt.
Run:  .venv/bin/python -m bench.placement [--repeat N] [--hosts H]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable, Sequence

from hostagent.capacity import Resources
from hostagent.model import Role
from hostagent.zone.placement import HostOffer, NodeRequest, place

DOMAINS = 20
TARGET_MS = 100.0
TARGET_NODES = 100


def hosts(count: int, seed: int = 7) -> list[HostOffer]:
    rng = random.Random(seed)
    offers = []
    for i in range(count):
        full = rng.random() < 0.1  # a tenth of the hosts have almost nothing left
        offers.append(
            HostOffer(
                id=f"h{i:04d}",
                failure_domain=f"rack-{i % DOMAINS:02d}",
                free=Resources(
                    vcpus=rng.choice([1.5, 3.0]) if full else float(rng.randrange(8, 96)),
                    memory_mib=rng.randrange(512, 2048) if full else rng.randrange(16, 256) * 1024,
                    disk_gib=rng.randrange(0, 30) if full else rng.randrange(200, 2000),
                ),
                overhead_base_mib=256 if i % 7 == 0 else 192,
            )
        )
    rng.shuffle(offers)  # place() must not depend on the order
    return offers


def nodes(workers: int) -> list[NodeRequest]:
    masters = [NodeRequest(f"m{i}", Role.MASTER, 2, 4096, 40) for i in range(1, 4)]
    return masters + [NodeRequest(f"w{i}", Role.WORKER, 2, 2048, 20) for i in range(1, workers + 1)]


def naive(requests: Sequence[NodeRequest], offers: Sequence[HostOffer]) -> dict[str, str]:
    """The rules of place() spelled out directly; `requests` come in processing order."""
    free = {h.id: [h.free.vcpus, h.free.memory_mib, h.free.disk_gib] for h in offers}
    count = dict.fromkeys(free, 0)
    masters = dict.fromkeys(free, 0)
    domain_masters = {h.failure_domain: 0 for h in offers}
    assignments = {}
    for node in requests:
        candidates = []
        for h in offers:
            memory = node.memory_mib + h.overhead_base_mib
            memory += h.overhead_per_gib_mib * -(-node.memory_mib // 1024)
            vcpus, mem_free, disk = free[h.id]
            if node.vcpus > vcpus or memory > mem_free or node.disk_gib > disk:
                continue
            spread = (count[h.id], memory - mem_free, h.id)
            if node.role == Role.MASTER:
                key = (domain_masters[h.failure_domain], masters[h.id], *spread)
            else:
                key = (0, 0, *spread)
            candidates.append((key, h, memory))
        if not candidates:
            raise RuntimeError(f"naive: no room for {node.name}")
        candidates.sort(key=lambda c: c[0])
        _, host, memory = candidates[0]
        free[host.id][0] -= node.vcpus
        free[host.id][1] -= memory
        free[host.id][2] -= node.disk_gib
        count[host.id] += 1
        if node.role == Role.MASTER:
            masters[host.id] += 1
            domain_masters[host.failure_domain] += 1
        assignments[node.name] = host.id
    return assignments


def median_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--hosts", type=int, default=1000, help="hosts offered")
    args = parser.parse_args()
    offers = hosts(args.hosts)
    print(
        "baseline = a naive reference placement in this file (same rules, every host "
        "scanned and the candidates sorted for each node), checked to assign the same"
    )
    print(f"{args.hosts} hosts in {DOMAINS} failure domains (median of {args.repeat} runs)")
    floor = median_ms(lambda: sorted(list(offers), key=lambda h: h.id), args.repeat)
    print(f"  floor, copy and sort the host list: {floor:.2f} ms")
    results = {}
    for workers in (TARGET_NODES - 3, 997):
        requests = nodes(workers)
        n = len(requests)
        got = place(requests, offers)  # also warms up
        if got.assignments != naive(requests, offers) or got.warnings:
            raise SystemExit(f"{n} nodes: place() and the naive reference disagree")
        ours = median_ms(functools.partial(place, requests, offers), args.repeat)
        theirs = median_ms(functools.partial(naive, requests, offers), args.repeat)
        results[n] = ours
        print(f"  place, {n} nodes (3 masters + {workers} workers): {ours:.2f} ms")
        print(f"  naive reference, {n} nodes: {theirs:.2f} ms")
        print(f"  naive / place, {n} nodes: {theirs / ours:.1f}x")
    ours = results[TARGET_NODES]
    verdict = "met" if ours < TARGET_MS else "NOT met"
    print(
        f"target: {TARGET_NODES} nodes over {args.hosts} hosts in < {TARGET_MS:.0f} ms: "
        f"{verdict} ({ours:.2f} ms)"
    )


if __name__ == "__main__":
    main()
