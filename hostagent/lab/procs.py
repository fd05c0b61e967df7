"""Processes as /proc shows them (root namespace): children, pid namespaces, exits.

Waiting uses pidfds, so a process that is not our child can be waited for without
polling and without mistaking a recycled PID for it.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

PROC = Path("/proc")


def all_pids() -> Iterator[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def parent_pid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat.rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    return [child for child in all_pids() if parent_pid(child) == pid]


def cmdline(pid: int) -> list[str] | None:
    """The process's argv; None when it is gone (or a kernel thread)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] or None


def pid_namespace(pid: int) -> str | None:
    """The process's pid namespace ("pid:[4026532…]"); None when it is gone."""
    try:
        return os.readlink(PROC / str(pid) / "ns" / "pid")
    except OSError:
        return None


def in_namespace(namespace: str) -> list[int]:
    """The PIDs (root namespace) of every process in a pid namespace."""
    return [pid for pid in all_pids() if pid_namespace(pid) == namespace]


def wait_exited(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every process has exited; the ones still running after timeout."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds[os.pidfd_open(pid)] = pid
        deadline = time.monotonic() + timeout
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select(list(fds), [], [], remaining)
            for fd in readable:
                del fds[fd]
                os.close(fd)
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)
