"""The only module that talks to the kernel (through pyroute2): observe bridges, apply plans.

Blocking, synchronous calls: the daemon runs them with asyncio.to_thread. pyroute2's sync API
drives its own event loop with run_until_complete, so it cannot run in a thread whose event
loop is running; Netlink refuses that with a clear error instead of pyroute2's obscure one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, assert_never

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from network.names import IFNAMSIZ
from network.plan import (
    Action,
    BridgeSeen,
    BridgeWanted,
    CreateBridge,
    DeleteBridge,
    ForeignDeviceError,
    NetworkError,
    RemoveAddress,
    SetAddress,
    SetMtu,
    SetUp,
    plan,
)

log = logging.getLogger(__name__)

IFF_UP = 0x1
DUMP_ATTEMPTS = 30
_DUMP_BACKOFF_S = 0.01


def retry_dump(call: Callable[[], Iterable[Any]], attempts: int = DUMP_ATTEMPTS) -> list[Any]:
    """Run a netlink dump, repeating it while the kernel flags it interrupted.

    NLM_F_DUMP_INTR means the table changed mid-dump; the answer is to ask again
    (pyroute2 #1206), not to fail the reconcile.
    """
    for attempt in range(attempts):
        try:
            return list(call())
        except NetlinkDumpInterrupted:
            time.sleep(_DUMP_BACKOFF_S * attempt)
    raise NetworkError(f"netlink dump still interrupted after {attempts} attempts; retry later")


class Netlink:
    """Cluster bridges in one network namespace (the root one unless netns is given).

    Every public method opens its own IPRoute in the calling thread and closes it before
    returning: pyroute2 0.9 keeps an event loop and a socket per thread and frees them only
    in that thread, so one long-lived IPRoute shared by asyncio.to_thread's pool would leak.
    In the root namespace opening one is just a socket (~1 ms). With netns, pyroute2 forks a
    short-lived child per session to enter the namespace (tests and the lab only);
    pyroute2's child_process_mode="mp" is left alone: on Python 3.11 it forks as well.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._closed = False

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Refuse further calls. Nothing stays open between calls (see the class docstring)."""
        self._closed = True

    def observe(self) -> list[BridgeSeen]:
        """Every bridge in the namespace, ours or not, with alias, IPv4 addresses, MTU, up."""
        with self._session() as ipr:
            return _observe(ipr)[0]

    def apply(self, actions: Iterable[Action]) -> None:
        """Apply actions in order; stops at the first failure with a NetworkError."""
        with self._session() as ipr:
            _apply_all(ipr, actions)

    def reconcile(self, wanted: Sequence[BridgeWanted]) -> list[Action]:
        """Observe, plan and apply in one session; returns the actions applied."""
        with self._session() as ipr:
            seen, link_names = _observe(ipr)
            actions = plan(wanted, seen, link_names=link_names)
            _apply_all(ipr, actions)
            return actions

    def tap_exists(self, name: str) -> bool:
        """Whether a tap (a link of kind 'tun') of that name exists."""
        with self._session() as ipr:
            link = _find(ipr, name)
            return link is not None and link.get(("linkinfo", "kind")) == "tun"

    def bridge_ports(self, bridge: str) -> list[str]:
        """Names of the interfaces enslaved to bridge, sorted."""
        with self._session() as ipr:
            index = _index(ipr, bridge)
            ports = retry_dump(lambda: ipr.link("dump", master=index))
            return sorted(str(port.get("ifname")) for port in ports)

    @contextmanager
    def _session(self) -> Iterator[Any]:
        if self._closed:
            raise RuntimeError("Netlink is closed")
        _refuse_running_loop()
        try:
            ipr = IPRoute() if self._netns is None else _open_netns(self._netns)
        except FileNotFoundError as err:
            raise NetworkError(f"network namespace {self._netns!r} does not exist") from err
        try:
            yield ipr
        finally:
            ipr.close()


def _open_netns(name: str) -> Any:
    # Checked first because pyroute2 0.9.7 leaks an event loop and sockets when IPRoute()
    # fails on a missing namespace; flags=0 still guards the race: never create one by accident.
    if name not in netns.listnetns():
        raise FileNotFoundError(name)
    return IPRoute(netns=name, flags=0)


def _refuse_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("Netlink blocks; call it from a worker thread (asyncio.to_thread)")


def _observe(ipr: Any) -> tuple[list[BridgeSeen], set[str]]:
    links = retry_dump(lambda: ipr.link("dump"))
    addresses = _ipv4_by_index(retry_dump(lambda: ipr.addr("dump", family=socket.AF_INET)))
    bridges = [
        _bridge_seen(link, addresses.get(link["index"], ()))
        for link in links
        if link.get(("linkinfo", "kind")) == "bridge"
    ]
    return bridges, {str(link.get("ifname")) for link in links}


def _ipv4_by_index(messages: Iterable[Any]) -> dict[int, tuple[str, ...]]:
    by_index: dict[int, list[str]] = {}
    for msg in messages:
        by_index.setdefault(msg["index"], []).append(f"{msg.get('address')}/{msg['prefixlen']}")
    return {index: tuple(sorted(found)) for index, found in by_index.items()}


def _bridge_seen(link: Any, addresses: tuple[str, ...]) -> BridgeSeen:
    alias = link.get("ifalias")
    return BridgeSeen(
        name=str(link.get("ifname")),
        alias=str(alias) if alias else None,
        addresses=addresses,
        mtu=int(link.get("mtu")),
        up=bool(link["flags"] & IFF_UP),
    )


def _apply_all(ipr: Any, actions: Iterable[Action]) -> None:
    for action in actions:
        try:
            _apply_one(ipr, action)
        except NetlinkError as err:
            if isinstance(action, CreateBridge) and err.code == errno.EEXIST:
                raise ForeignDeviceError(
                    f"{action}: a device named {action.name} appeared meanwhile; "
                    "delete or rename it if hostagent did not create it"
                ) from err
            raise NetworkError(f"{action} failed: {err}") from err
        log.info("network: %s", action)


def _apply_one(ipr: Any, action: Action) -> None:
    match action:
        case CreateBridge(name=name, alias=alias, mtu=mtu):
            _create_bridge(ipr, name, alias, mtu)
        case SetAddress(name=name, address=address):
            ip, prefix = address.split("/")
            ipr.addr("add", index=_owned_index(ipr, name), address=ip, prefixlen=int(prefix))
        case RemoveAddress(name=name, address=address):
            ip, prefix = address.split("/")
            ipr.addr("del", index=_owned_index(ipr, name), address=ip, prefixlen=int(prefix))
        case SetMtu(name=name, mtu=mtu):
            ipr.link("set", index=_owned_index(ipr, name), mtu=mtu)
        case SetUp(name=name):
            ipr.link("set", index=_owned_index(ipr, name), state="up")
        case DeleteBridge(name=name):
            if _find(ipr, name) is not None:  # already gone is fine: deletes are idempotent
                ipr.link("del", index=_owned_index(ipr, name))
        case _:
            assert_never(action)


def _create_bridge(ipr: Any, name: str, alias: str, mtu: int) -> None:
    # STP off and forward delay 0: a VM's tap forwards the moment it joins.
    ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
    index = _index(ipr, name)
    try:
        # Both need a separate "set": the kernel ignores IFLA_IFALIAS on create, and an MTU
        # given on create is not "set by user", so the first port joining would override it.
        ipr.link("set", index=index, ifalias=alias, mtu=mtu)
    except NetlinkError:
        ipr.link("del", index=index)  # an unmarked bridge would look foreign forever
        raise


def _find(ipr: Any, name: str) -> Any | None:
    if len(name.encode()) > IFNAMSIZ:  # the kernel would answer ERANGE
        return None
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise


def _index(ipr: Any, name: str) -> int:
    link = _find(ipr, name)
    if link is None:
        raise NetworkError(f"device {name} does not exist")
    return int(link["index"])


def _owned_index(ipr: Any, name: str) -> int:
    """The index of a bridge carrying our alias: apply() never changes anyone else's device."""
    link = _find(ipr, name)
    if link is None:
        raise NetworkError(f"bridge {name} does not exist")
    seen = _bridge_seen(link, ())
    if link.get(("linkinfo", "kind")) != "bridge" or seen.owner is None:
        raise ForeignDeviceError(
            f"device {name} (alias {seen.alias!r}) was not created by hostagent; refusing to "
            "change it"
        )
    return int(link["index"])
