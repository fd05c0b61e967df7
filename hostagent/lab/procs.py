"""Processes as /proc shows them (root namespace): children, pid namespaces, exits.

Waiting uses pidfds, so a process that is not our child can be waited for without
polling and without mistaking a recycled PID for it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
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


def running(pid_file: Path, marker: str) -> int | None:
    """The PID in pid_file while that process runs with marker among its arguments (not
    a recycled PID); None otherwise."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    argv = cmdline(pid)
    if argv is None or marker not in argv or not alive(pid):
        return None
    return pid


def stop(pid_file: Path, marker: str, timeout: float) -> int | None:
    """SIGTERM the process of pid_file (see running), SIGKILL after timeout; remove the pid
    file; the PID stopped, if any."""
    pid = running(pid_file, marker)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if wait_exited([pid], timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_exited([pid], 10.0)
    pid_file.unlink(missing_ok=True)
    return pid


def alive(pid: int) -> bool:
    """Whether the process runs (exists and is no zombie)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
