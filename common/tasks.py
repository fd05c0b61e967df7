"""Stopping asyncio tasks: the one way to cancel and wait."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks (None: none) and wait until each has ended, its CancelledError
    swallowed: a task that ended with another error raises it here."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task
