"""systemd's notify protocol (sd_notify(3)) without a dependency: datagrams to $NOTIFY_SOCKET.

The environment is handed in by the caller (`serve()` passes os.environ), so nothing
here reads it on its own and tests can give their own socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


def socket_address(environ: Mapping[str, str]) -> str | None:
    """Where to send notifications: a path, or an abstract socket ('@' becomes a NUL byte)."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds, or None when systemd set none for this process.

    `pid` is ours: WATCHDOG_PID, when set, names the process the watchdog is meant for
    (a child that inherited the environment must not feed its parent's watchdog).
    """
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


@dataclass(frozen=True)
class Notifier:
    """Tells systemd how the service is doing; silently does nothing outside systemd."""

    address: str | None
    watchdog_s: float | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        return cls(socket_address(environ), watchdog_interval(environ, pid))

    def notify(self, state: str) -> bool:
        """Send one state line ("READY=1", "STOPPING=1", "WATCHDOG=1"); True when sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), self.address)
        except OSError as exc:
            # Notification is advisory: a vanished socket must not take the agent down.
            log.warning("sd_notify %s to %r failed: %s", state, self.address, exc)
            return False
        return True

    async def feed_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Send WATCHDOG=1 at half the interval for as long as the agent is healthy.

        Running as a task on the event loop is itself the main check: a blocked or
        deadlocked loop stops the feeding and systemd restarts us. `healthy` adds what
        the loop cannot see (a background loop of the agent that died). libvirtd being
        down is deliberately not a reason: the agent reconnects on its own and keeps
        serving its API meanwhile, and restarting it would neither help nor touch libvirtd.
        """
        if self.address is None or self.watchdog_s is None:
            return
        while True:
            if healthy():
                self.notify("WATCHDOG=1")
            else:
                log.error("not feeding the systemd watchdog: the agent is unhealthy")
            await asyncio.sleep(self.watchdog_s / 2)
