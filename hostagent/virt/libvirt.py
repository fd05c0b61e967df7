"""The only module that imports libvirt.

Every libvirt call runs in a dedicated thread pool, never on the event loop. libvirt's
own event loop runs in one daemon thread; lifecycle events and connection loss are
handed to asyncio with call_soon_threadsafe. A supervisor task reconnects with backoff
when libvirtd goes away (the VMs keep running: QEMU does not depend on libvirtd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt

from common.backoff import Backoff
from common.errors import ProvisioningError
from hostagent.errors import LibvirtUnavailable
from hostagent.virt.domain import DomainInfo, parse_meta

log = logging.getLogger(__name__)
T = TypeVar("T")

_event_thread: threading.Thread | None = None
_event_lock = threading.Lock()


def _start_event_loop() -> None:
    """libvirt's default event implementation, once per process, in its own thread."""
    global _event_thread
    with _event_lock:
        if _event_thread is not None:
            return
        # Errors arrive as exceptions with the same text; libvirt would also print each
        # one to stderr, a second, unformatted copy in the agent's log.
        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_thread.start()


class Libvirt:
    def __init__(
        self,
        uri: str,
        *,
        workers: int,
        on_lifecycle: Callable[[str], None],
        on_reconnect: Callable[[], None],
        on_timed: Callable[[str, float], None] = lambda _call, _seconds: None,
    ) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self._conn: Any = None
        self._events = -1
        self._lost = asyncio.Event()
        self._on_lifecycle = on_lifecycle
        self._on_reconnect = on_reconnect
        self._on_timed = on_timed
        self.reconnects = 0
        self.connected = asyncio.Event()

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _need(self) -> Any:
        if self._conn is None:
            raise LibvirtUnavailable(
                f"libvirt at {self.uri} is not reachable; the agent keeps retrying. "
                "Check that libvirtd is running."
            )
        return self._conn

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _start_event_loop()

        def open_conn() -> Any:
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(
                lambda _c, _reason, _o: loop.call_soon_threadsafe(self.mark_lost), None
            )
            self._events = conn.domainEventRegisterAny(
                None,
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                lambda _c, dom, _event, _detail, _o: loop.call_soon_threadsafe(
                    self._on_lifecycle, dom.name()
                ),
                None,
            )
            return conn

        try:
            self._conn = await self._call(open_conn)
        except libvirt.libvirtError as exc:
            raise LibvirtUnavailable(f"cannot connect to libvirt at {self.uri}: {exc}") from exc
        self._lost.clear()
        self.connected.set()

    def mark_lost(self) -> None:
        log.warning("connection to libvirt lost", extra={"uri": self.uri})
        self._conn = None
        self.connected.clear()
        self._lost.set()

    async def supervise(self, backoff_max_s: float = 10.0) -> None:
        """Reconnect whenever the connection is lost; runs until cancelled."""
        while True:
            await self._lost.wait()
            retry = Backoff(0.5, backoff_max_s)
            while self._conn is None:
                try:
                    await self.connect()
                except LibvirtUnavailable as exc:
                    delay = retry.next()
                    log.warning("%s; retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
            self.reconnects += 1
            log.info("reconnected to libvirt", extra={"uri": self.uri})
            self._on_reconnect()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:

            def close() -> None:
                # The callbacks hold references: without this the connection stays open
                # and hands events to an event loop that may be gone.
                conn.domainEventDeregisterAny(self._events)
                conn.unregisterCloseCallback()
                conn.close()

            with contextlib.suppress(libvirt.libvirtError):
                await self._call(close)
        self._pool.shutdown(wait=False)

    async def alive(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(await self._call(conn.isAlive))
        except libvirt.libvirtError:
            return False

    async def owned_domains(self, host: str) -> list[DomainInfo]:
        """Every domain carrying our metadata for this host; all others are invisible."""
        conn = self._need()

        def collect() -> list[DomainInfo]:
            found = []
            for dom in conn.listAllDomains(0):
                try:
                    info = _info(dom)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # went away between listing and reading it
                    raise
                if info is not None and info.meta.host == host:
                    found.append(info)
            return found

        return await self._wrap("list", collect, "list domains")

    async def domain(self, name: str, host: str) -> DomainInfo | None:
        conn = self._need()

        def lookup() -> DomainInfo | None:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            info = _info(dom)
            if info is None or info.meta.host != host:
                raise ProvisioningError(
                    f"a libvirt domain named {name} exists but is not managed by this agent; "
                    "rename or remove it, or choose another cluster/node name"
                )
            return info

        return await self._wrap("lookup", lookup, f"look up domain {name}")

    async def define(self, xml: str) -> None:
        conn = self._need()
        await self._wrap("define", lambda: conn.defineXML(xml), "define domain")

    async def start(self, name: str) -> int:
        conn = self._need()

        def start() -> int:
            dom = conn.lookupByName(name)
            dom.create()
            return int(dom.ID())

        return await self._wrap("start", start, f"start domain {name}")

    async def shutdown(self, name: str, timeout_s: float) -> None:
        """ACPI power-off, then destroy when the guest has not stopped within timeout_s; a
        paused domain (its guest cannot see ACPI: hung, or suspended) is destroyed at once."""
        conn = self._need()

        def request() -> None:
            dom = conn.lookupByName(name)
            if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.destroy()
            elif dom.isActive():
                dom.shutdown()

        await self._wrap("shutdown", request, f"shut down domain {name}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if not await self._wrap(
                "is_active", lambda: conn.lookupByName(name).isActive(), "poll domain"
            ):
                return
            await asyncio.sleep(0.5)
        log.warning("domain %s ignored ACPI shutdown for %.0fs; destroying it", name, timeout_s)
        await self.destroy(name)

    async def destroy(self, name: str) -> None:
        conn = self._need()

        def destroy() -> None:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()

        await self._wrap("destroy", destroy, f"destroy domain {name}")

    async def undefine(self, name: str) -> None:
        conn = self._need()
        await self._wrap(
            "undefine", lambda: conn.lookupByName(name).undefine(), f"undefine domain {name}"
        )

    async def run_transient(self, xml: str) -> str:
        conn = self._need()
        return str(
            await self._wrap(
                "create_transient", lambda: conn.createXML(xml, 0).name(), "start probe domain"
            )
        )

    async def offers_kvm(self) -> str | None:
        """None when libvirt offers a kvm domain type for x86_64, else libvirt's reason."""
        conn = self._need()

        def domain_capabilities() -> str | None:
            try:
                conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
            except libvirt.libvirtError as exc:
                if not conn.isAlive():
                    raise
                return str(exc)
            return None

        return await self._wrap(
            "domain_capabilities", domain_capabilities, "read kvm domain capabilities"
        )

    async def is_active(self, name: str) -> bool:
        conn = self._need()

        def active() -> bool:
            try:
                return bool(conn.lookupByName(name).isActive())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise

        return await self._wrap("is_active", active, f"query domain {name}")

    async def _wrap(self, call: str, fn: Callable[[], T], what: str) -> T:
        """Run fn off the loop; `call` names it in the timings (a metric label)."""
        started = time.monotonic()
        try:
            return await self._call(fn)
        except libvirt.libvirtError as exc:
            if not await self.alive():
                raise LibvirtUnavailable(f"{what}: libvirt is not reachable ({exc})") from exc
            raise ProvisioningError(f"{what}: {exc}") from exc
        finally:
            self._on_timed(call, time.monotonic() - started)


def _info(dom: Any) -> DomainInfo | None:
    meta = parse_meta(dom.XMLDesc(0))
    if meta is None:
        return None
    active = bool(dom.isActive())
    return DomainInfo(
        name=dom.name(), meta=meta, running=active, domain_id=int(dom.ID()) if active else None
    )
