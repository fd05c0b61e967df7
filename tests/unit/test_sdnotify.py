"""The sd_notify protocol against a datagram socket of the test's own, as systemd listens."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.sdnotify import Notifier, socket_address, watchdog_interval

PID = 4242


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = str(tmp_path / "notify")
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path


async def receive(sock: socket.socket, timeout_s: float = 5.0) -> str:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout_s)
    return data.decode()


def test_no_socket_no_watchdog_outside_systemd() -> None:
    notifier = Notifier.from_environ({}, PID)
    assert notifier == Notifier(None, None)
    assert notifier.notify("READY=1") is False


def test_abstract_socket_names_start_with_a_nul_byte() -> None:
    assert socket_address({"NOTIFY_SOCKET": "@/org/systemd/notify"}) == "\0/org/systemd/notify"
    assert socket_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, PID) == expected


async def test_ready_arrives(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert Notifier.from_environ({"NOTIFY_SOCKET": path}, PID).notify("READY=1")
    assert await receive(sock) == "READY=1"


async def test_abstract_socket_receives() -> None:
    name = f"hostagent-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, PID).notify("READY=1")
        assert await receive(sock) == "READY=1"


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")}, PID)
    assert notifier.notify("READY=1") is False


async def test_watchdog_is_fed_only_while_healthy(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(environ, os.getpid())
    checks: list[bool] = []

    def healthy() -> bool:
        checks.append(len(checks) >= 2)  # unhealthy for the first two rounds
        return checks[-1]

    feeding = asyncio.create_task(notifier.feed_watchdog(healthy))
    try:
        assert await receive(sock) == "WATCHDOG=1"
        assert await receive(sock) == "WATCHDOG=1"
    finally:
        feeding.cancel()
    # Datagrams arrive in order: the first one came from the first healthy round,
    # so the two unhealthy rounds before it sent nothing.
    assert checks[:3] == [False, False, True]


async def test_no_watchdog_task_without_an_interval(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path}, PID)
    await asyncio.wait_for(notifier.feed_watchdog(lambda: True), 1)  # returns at once
