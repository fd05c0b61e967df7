"""What the agent store's commits cost the event loop (issue 13, defect 6).

8 writers (as the reconciler's 8 workers) each record phases of their own nodes through
hostagent.store.Store.set_phase, every call one committed transaction (WAL,
synchronous=FULL: one fsync each), while a coroutine on the same loop ticks every 5 ms
and notes how late each tick is. The baseline, in the same run and on the same file,
does the same transactions on the loop itself (what the store did before its writer
thread). Figures: commits per second, and how late the loop's ticks were (median, worst).
The file is in --dir (default: a temporary directory, often tmpfs: fsync costs nothing
there; point it at the state disk to see the difference). No root, no libvirt.
Run:  .venv/bin/python -m bench.store_writes [--writes N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hostagent import store as store_module
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.store import Store

WRITERS = 8
TICK_S = 0.005
SPEC = NodeSpec.model_validate(
    {
        "role": "worker",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
    }
)

Write = Callable[[NodeKey, str], Awaitable[None]]


async def measure(write: Write, keys: list[NodeKey], writes: int) -> tuple[float, list[float]]:
    """Commits per second, and each tick's lateness (ms) while the writers ran."""
    late: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            due = time.perf_counter() + TICK_S
            await asyncio.sleep(TICK_S)
            late.append(max(0.0, time.perf_counter() - due) * 1000)

    async def writer(key: NodeKey) -> None:
        for i in range(writes):
            await write(key, f"step {i}")

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    await asyncio.gather(*(writer(key) for key in keys))
    elapsed = time.perf_counter() - started
    done.set()
    await ticker
    return len(keys) * writes / elapsed, late


async def run(folder: Path, writes: int) -> None:
    store = Store(folder / "bench.db")
    keys = [NodeKey(cluster="bench", name=f"w{i}") for i in range(WRITERS)]
    for key in keys:
        await store.create(key, SPEC, "token")

    async def off_loop(key: NodeKey, message: str) -> None:
        await store.set_phase(key, Phase.PROVISIONING, message)

    async def on_loop(key: NodeKey, message: str) -> None:
        db = store._db  # the same transaction, committed on the loop as before
        db._transaction(lambda c: store_module._set_phase(c, key, Phase.RUNNING, message, None))
        await asyncio.sleep(0)

    for label, write in (("baseline, commits on the loop", on_loop), ("writer thread", off_loop)):
        rate, late = await measure(write, keys, writes)
        print(f"{label}:")
        print(f"  commits: {rate:.0f}/s")
        print(f"  tick lateness median: {statistics.median(late):.2f} ms")
        print(f"  tick lateness worst: {max(late):.2f} ms")
        print(f"  ticks: {len(late)}")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=100, help="commits per writer")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the database")
    args = parser.parse_args()
    print(f"{WRITERS} writers x {args.writes} commits, a tick every {TICK_S * 1000:.0f} ms")
    if args.dir is not None:
        asyncio.run(run(args.dir, args.writes))
        return
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(run(Path(folder), args.writes))


if __name__ == "__main__":
    main()
