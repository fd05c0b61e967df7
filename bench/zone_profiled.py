"""`hostagent zone serve` under cProfile, with an event-loop lag probe: bench.zone_load
--profile DIR starts its zones as `python -m bench.zone_profiled OUT ARGS...`. On exit
(SIGTERM) the profile goes to OUT.prof and the probe's figures to OUT.lag.json: a task
that asks to wake every 10 ms notes how late each wake-up is, the time the loop was
busy with something else. Nothing in the zone knows about it."""

from __future__ import annotations

import asyncio
import cProfile
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hostagent import cli
from hostagent.zone import server

TICK = 0.01


async def probe(lags: list[float]) -> None:
    while True:
        asked = time.monotonic()
        await asyncio.sleep(TICK)
        lags.append(time.monotonic() - asked - TICK)


def figures(lags: list[float]) -> dict[str, Any]:
    ordered = sorted(lags)
    if not ordered:
        return {"ticks": 0}

    def at(q: float) -> float:
        return round(1000 * ordered[int(q * (len(ordered) - 1))], 1)

    return {
        "ticks": len(ordered),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
        "over_50ms": sum(lag > 0.05 for lag in ordered),
    }


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    serve = server.serve
    lags: list[float] = []

    async def probed(config: Any, environ: Mapping[str, str]) -> None:
        task = asyncio.create_task(probe(lags))
        try:
            await serve(config, environ)
        finally:
            task.cancel()

    server.serve = probed
    profile = cProfile.Profile()
    try:
        profile.runcall(cli.main, argv)
    finally:
        profile.dump_stats(f"{out}.prof")
        Path(f"{out}.lag.json").write_text(json.dumps(figures(lags)))


if __name__ == "__main__":
    main()
