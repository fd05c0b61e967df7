"""Time to provision a node's certificate set: a master set and a worker set, through the
local CA and through Vault's API (an OpenBao dev server this starts on loopback).

A set is everything `pki.provision.provision_node` does for a fresh directory: host
keys, CSRs, signing, CA certificates, the service-account key (masters), atomic
writes with fsync. The cluster's CAs exist already (the first set of a cluster, which
creates them, is reported apart as "cold").
Run:  .venv/bin/python -m bench.pki [--repeat N] [--key-type ecdsa|rsa] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from pki.backend import Backend
from pki.certset import NodeIdentity
from pki.keys import KeyType
from pki.local import LocalBackend
from pki.provision import provision_node
from pki.vault import VaultBackend, VaultSettings
from tests import openbao as devserver


def node(cluster: str, role: str, index: int) -> NodeIdentity:
    return NodeIdentity(
        cluster, f"{role[0]}{index}", role, f"10.42.{index // 250}.{index % 250 + 2}"
    )


async def one_set(backend: Backend, identity: NodeIdentity, root: Path, key_type: KeyType) -> float:
    start = time.perf_counter()
    await provision_node(backend, identity, root / identity.name, key_type=key_type)
    return (time.perf_counter() - start) * 1000


async def measure(backend: Backend, root: Path, args: argparse.Namespace) -> dict[str, object]:
    cluster = f"bench{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    cold = await one_set(backend, node(cluster, "master", 0), root, args.key_type)
    results: dict[str, object] = {"cold master": cold}
    semaphore = asyncio.Semaphore(args.concurrency)

    async def limited(identity: NodeIdentity) -> float:
        async with semaphore:
            return await one_set(backend, identity, root, args.key_type)

    for role in ("master", "worker"):
        times = [
            await one_set(backend, node(cluster, role, i + 1), root, args.key_type)
            for i in range(args.repeat)
        ]
        results[role] = times
        start = time.perf_counter()
        batch = [node(cluster, role, 1000 + i) for i in range(args.repeat)]
        await asyncio.gather(*(limited(identity) for identity in batch))
        results[f"{role} sets/s at concurrency {args.concurrency}"] = args.repeat / (
            time.perf_counter() - start
        )
    return results


def report(name: str, results: dict[str, object]) -> None:
    print(f"\n{name}")
    print(f"  cold master set (creates the CAs): {results['cold master']:.1f} ms")
    for role in ("master", "worker"):
        times = sorted(results[role])  # type: ignore[call-overload]
        p90 = times[int(len(times) * 0.9) - 1] if len(times) >= 10 else times[-1]
        median = statistics.median(times)
        print(
            f"  {role} set: median {median:.1f} ms, p90 {p90:.1f} ms, "
            f"{1000 / median:.1f} sets/s sequential"
        )
        key = next(k for k in results if k.startswith(f"{role} sets/s"))
        print(f"  {key}: {results[key]:.1f}")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-pki-") as tmp:
        root = Path(tmp)
        local = await measure(LocalBackend(root / "state"), root / "local", args)
        report(f"local CA ({args.key_type}, {args.repeat} sets per role)", local)
        with devserver.start() as server:
            vault = VaultBackend(VaultSettings(url=server.url, token=server.root_token))
            through_vault = await measure(vault, root / "vault", args)
        report(f"Vault API: OpenBao dev server on loopback ({args.key_type})", through_vault)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--key-type", type=KeyType, default=KeyType.ECDSA)
    parser.add_argument("--concurrency", type=int, default=4)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
