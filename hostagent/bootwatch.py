"""The boot timeout: a node whose guest has not phoned home `[health] boot_timeout_s` after
its domain started goes Failed, with the last lines of its serial console in the message
(a kernel panic, an init that died, a wrong root device: what an operator looks for
first). A guest that phones home later still becomes Ready; a PUT of the node retries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hostagent import console
from hostagent.model import NodeKey, Phase
from hostagent.store import Store

log = logging.getLogger(__name__)
CONSOLE_BYTES = 16 * 1024  # enough for the last lines, however long the log


def boot_failure(timeout_s: float, lines: list[str], log_file: Path) -> str:
    shown = " | ".join(lines) if lines else "(nothing: the console log is empty)"
    return (
        f"the guest did not phone home within {timeout_s:.0f}s of its start; the last lines "
        f"of its serial console: {shown}. The whole log: {log_file} (or GET .../console). "
        "Fix the image or the node's configuration, then PUT the node again or DELETE it"
    )


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


class BootWatch:
    def __init__(
        self,
        store: Store,
        nodes_dir: Path,
        timeout_s: float,
        interval_s: float,
        failed: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.nodes_dir = nodes_dir
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._failed = failed
        self._clock = clock

    def _started(self, key: NodeKey) -> float | None:
        """When the node last went Running (its domain started or was adopted)."""
        runs = [t.at for t in self.store.transitions(key) if t.phase is Phase.RUNNING]
        return _seconds(runs[-1]) if runs else None

    async def check(self) -> list[NodeKey]:
        """One pass: the nodes it failed."""
        failed = []
        now = self._clock()
        for record in self.store.all():
            if record.deleting or record.phase is not Phase.RUNNING:
                continue
            started = self._started(record.key)
            if started is None or now - started < self.timeout_s:
                continue
            path = console.log_path(self.nodes_dir, record.key)
            data = await asyncio.to_thread(console.tail, path, CONSOLE_BYTES)
            message = boot_failure(self.timeout_s, console.last_lines(data), path)
            if await self.store.set_phase(record.key, Phase.FAILED, message, event="failed"):
                log.error("%s: %s", record.key, message)
                failed.append(record.key)
        return failed

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # this loop ending would restart the agent (watchdog)
                log.exception("the boot timeout check crashed; the next one retries")
                self._failed()
            await asyncio.sleep(self.interval_s)
