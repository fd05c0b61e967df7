"""The only module that talks to the kernel (through pyroute2): observe devices, apply plans.

Blocking, synchronous calls: the daemon runs them with asyncio.to_thread. pyroute2's sync API
drives its own event loop with run_until_complete, so it cannot run in a thread whose event
loop is running; Netlink refuses that with a clear error instead of pyroute2's obscure one.

Creating and deleting devices, and the bridges' isolation rules (`ip rule ... prohibit`,
a few per cluster's lifetime), goes through pyroute2, one request at a time. The small
changes (FDB entries, the bulk of the work at about 20 per cluster with 10 peers; up, MTU,
master; addresses; IPv4 forwarding off) are collected and sent in batches through
network.batch on a second rtnetlink socket of the same session. A batch is flushed before
any other action, so actions take effect in the planned order; like the unbatched path it
stops at the first failure it reports, though the kernel will have applied the rest of
that batch (the next reconcile observes and plans from there); forwarding off ends a batch,
so nothing after it happens unless it did.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar, assert_never

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from network import batch
from network.actions import (
    Action,
    AddIsolationRule,
    AppendFdb,
    CreateBridge,
    CreateVxlan,
    DeleteBridge,
    DeleteFdb,
    DeleteIsolationRule,
    DeleteVxlan,
    DisableForwarding,
    RemoveAddress,
    SetAddress,
    SetMaster,
    SetMtu,
    SetUp,
)
from network.model import (
    ISOLATION_PRIORITY,
    BridgeWanted,
    ClusterNetworkWanted,
    ForeignDeviceError,
    HostNetworkWanted,
    HostSeen,
    NetworkError,
    Underlay,
)
from network.names import IFNAMSIZ
from network.observe import LinkRef, host_seen, link_refs
from network.plan import plan

log = logging.getLogger(__name__)
T = TypeVar("T")

DUMP_ATTEMPTS = 30
_DUMP_BACKOFF_S = 0.01
_BRIDGE = ("bridge",)
_VXLAN = ("vxlan",)
_EITHER = ("bridge", "vxlan")
Batched = (
    AppendFdb
    | DeleteFdb
    | DisableForwarding
    | SetUp
    | SetMtu
    | SetMaster
    | SetAddress
    | RemoveAddress
)


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
    """Cluster networks in one network namespace (the root one unless netns is given).

    Every public method opens its own IPRoute in the calling thread and closes it before
    returning: pyroute2 0.9 keeps an event loop and a socket per thread and frees them only
    in that thread, so one long-lived IPRoute shared by asyncio.to_thread's pool would leak.
    In the root namespace opening one is just a socket (~1 ms). With netns, pyroute2 forks a
    short-lived child per session to enter the namespace (tests and the lab only);
    pyroute2's child_process_mode="mp" is left alone: on Python 3.11 it forks as well.
    A call that changes FDB entries or forwarding also opens a plain rtnetlink socket for
    the batches (network.batch), closed with the IPRoute: nothing outlives the call.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._closed = False
        self._requests = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def requests(self) -> int:
        """Netlink requests sent so far through this object: a dump counts as one, and so
        does each FDB entry, batched or not (each is a message with its own ack)."""
        with self._lock:
            return self._requests

    def close(self) -> None:
        """Refuse further calls. Nothing stays open between calls (see the class docstring)."""
        self._closed = True

    def observe(self) -> HostSeen:
        """Every bridge and VXLAN device in the namespace, ours or not, the host's IPv4
        addresses (to find the underlay device and its MTU) and the isolation rules."""
        with self._session() as session:
            return _observe(session)

    def apply(self, actions: Iterable[Action], *, host: str, taps: Iterable[str] = ()) -> None:
        """Apply actions in order; stops at the first failure with a NetworkError.

        Only devices whose alias names host's agent are ever changed or deleted, and of the
        devices without an alias only the tun devices named in taps, which SetMaster may put
        into a bridge of ours.
        """
        with self._session(host, taps) as session:
            session.links = link_refs(session.dump("link"))
            _apply_all(session, actions)

    def reconcile(
        self,
        clusters: Sequence[ClusterNetworkWanted | BridgeWanted],
        underlay: Underlay | None = None,
        *,
        host: str,
    ) -> list[Action]:
        """Observe, plan and apply in one session; returns the actions applied.

        underlay None wires bridges only (a host serving its clusters alone). host is this
        agent's host id: it marks the devices made, and devices marked by another host's
        agent (sharing the namespace) are left alone.
        """
        wanted = HostNetworkWanted.of(clusters, underlay, host=host)
        taps = {tap for cluster in wanted.clusters for tap in cluster.taps}
        with self._session(host, taps) as session:
            actions = plan(wanted, _observe(session))
            _apply_all(session, actions)
            return actions

    def tap_exists(self, name: str) -> bool:
        """Whether a tap (a link of kind 'tun') of that name exists."""
        with self._session() as session:
            link = _find(session, name)
            return link is not None and link.get(("linkinfo", "kind")) == "tun"

    def bridge_ports(self, bridge: str) -> list[str]:
        """Names of the interfaces enslaved to bridge, sorted."""
        with self._session() as session:
            link = _find(session, bridge)
            if link is None:
                raise NetworkError(f"device {bridge} does not exist")
            ports = session.dump("link", master=link["index"])
            return sorted(str(port.get("ifname")) for port in ports)

    @contextmanager
    def _session(self, host: str | None = None, taps: Iterable[str] = ()) -> Iterator[_Session]:
        if self._closed:
            raise RuntimeError("Netlink is closed")
        _refuse_running_loop()
        try:
            ipr = IPRoute(nlm_echo=True) if self._netns is None else _open_netns(self._netns)
        except FileNotFoundError as err:
            raise NetworkError(f"network namespace {self._netns!r} does not exist") from err
        session = _Session(ipr, self._netns, host, frozenset(taps))
        try:
            yield session
        finally:
            session.close()
            with self._lock:
                self._requests += session.requests


class _Session:
    """One IPRoute for one call: counts requests, remembers the links seen or made, and
    holds batched actions until the next flush (see network.batch).

    host: whose devices may be changed (None: none, for calls that only read); taps: the
    tun devices SetMaster may put into a bridge of ours.
    """

    def __init__(self, ipr: Any, netns: str | None, host: str | None, taps: frozenset[str]) -> None:
        self.ipr = ipr
        self.netns = netns
        self.host = host
        self.taps = taps
        self.requests = 0
        self.links: dict[str, LinkRef] = {}
        self.pending: list[tuple[Batched, batch.Request]] = []
        self._batch_socket: socket.socket | None = None

    def close(self) -> None:
        self.ipr.close()
        if self._batch_socket is not None:
            self._batch_socket.close()

    def queue(self, action: Batched) -> None:
        self.pending.append((action, self._request(action)))

    def _request(self, action: Batched) -> batch.Request:
        match action:
            case DisableForwarding(name=name):
                return batch.ForwardingOff(self.owned(name, _BRIDGE))
            case SetUp(name=name):
                return batch.LinkChange(self.owned(name, _EITHER), up=True)
            case SetMtu(name=name, mtu=mtu):
                return batch.LinkChange(self.owned(name, _EITHER), mtu=mtu)
            case SetMaster(name=name, bridge=bridge):
                master = self.owned(bridge, _BRIDGE)
                return batch.LinkChange(self.port(name), master=master)
            case SetAddress(name=name, address=address) | RemoveAddress(name=name, address=address):
                ip, prefix = address.split("/")
                add = isinstance(action, SetAddress)
                return batch.AddressChange(add, self.owned(name, _BRIDGE), ip, int(prefix))
            case AppendFdb(name=name, mac=mac, dst=dst) | DeleteFdb(name=name, mac=mac, dst=dst):
                index = self.owned(name, _VXLAN)
                return batch.FdbRequest(isinstance(action, AppendFdb), index, mac, dst)
            case _:
                assert_never(action)

    def flush(self) -> None:
        """Send the queued actions; NetworkError names the first that failed."""
        if not self.pending:
            return
        queued, self.pending = self.pending, []
        try:
            if self._batch_socket is None:
                self._batch_socket = _in_netns(self.netns, batch.open_socket)
            codes = batch.send(self._batch_socket, [request for _, request in queued])
        except OSError as err:
            more = f" (and {len(queued) - 1} more batched with it)" if len(queued) > 1 else ""
            raise NetworkError(f"{queued[0][0]}{more} failed: {err}") from err
        finally:
            self.requests += len(queued)
        for (action, _), code in zip(queued, codes, strict=True):
            if code:
                raise NetworkError(f"{action} failed: [Errno {code}] {os.strerror(code)}")
            log.info("network: %s", action)

    def link(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return self.ipr.link(*args, **kwargs)

    def addr(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return self.ipr.addr(*args, **kwargs)

    def fdb(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return self.ipr.fdb(*args, **kwargs)

    def rule(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return self.ipr.rule(*args, **kwargs)

    def dump(self, what: str, **filters: Any) -> list[Any]:
        method = getattr(self, what)
        return retry_dump(lambda: method("dump", **filters))

    def owned(self, name: str, kinds: tuple[str, ...]) -> int:
        """The index of a device of ours of one of kinds: nobody else's is ever changed,
        another host's agent's included."""
        ref = self.links.get(name)
        if ref is None:
            raise NetworkError(f"device {name} does not exist")
        owner = ref.owner
        if owner is None:
            raise ForeignDeviceError(
                f"device {name} (kind {ref.kind}, alias {ref.alias!r}) was not created by "
                "hostagent; refusing to change it"
            )
        if owner.host != self.host:
            raise ForeignDeviceError(
                f"device {name} (alias {ref.alias!r}) belongs to hostagent host "
                f"{owner.host!r}, not {self.host!r}; refusing to change it"
            )
        if ref.kind not in kinds:
            raise ForeignDeviceError(
                f"device {name} is a {ref.kind}, not a {' or '.join(kinds)}; refusing to change it"
            )
        return ref.index

    def port(self, name: str) -> int:
        """The index of a device SetMaster may move: our VXLAN device, or one of the
        wanted taps (libvirt's, without an alias: the name is what makes it a node's)."""
        ref = self.links.get(name)
        if ref is not None and ref.kind == "tun" and name in self.taps:
            return ref.index
        return self.owned(name, _VXLAN)

    def create(self, name: str, **spec: Any) -> int:
        """Create a link; its index. Sessions ask for NLM_F_ECHO, so the kernel (6.3 and
        later) answers with the new link itself; older kernels need a lookup."""
        answer = self.link("add", ifname=name, **spec)
        for msg in answer or ():
            if msg.get("event") == "RTM_NEWLINK" and msg.get("ifname") == name:
                return int(msg["index"])
        link = _find(self, name)
        if link is None:
            raise NetworkError(f"device {name} vanished right after it was created")
        return int(link["index"])


def _open_netns(name: str) -> Any:
    # Checked first because pyroute2 0.9.7 leaks an event loop and sockets when IPRoute()
    # fails on a missing namespace; flags=0 still guards the race: never create one by accident.
    if name not in netns.listnetns():
        raise FileNotFoundError(name)
    return IPRoute(netns=name, flags=0, nlm_echo=True)


def _refuse_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("Netlink blocks; call it from a worker thread (asyncio.to_thread)")


def _observe(session: _Session) -> HostSeen:
    links = session.dump("link")
    addresses = session.dump("addr", family=socket.AF_INET)
    fdb = session.dump("fdb")
    rules = session.dump("rule", family=socket.AF_INET)
    session.links = link_refs(links)
    return host_seen(links, addresses, fdb, rules)


def _apply_all(session: _Session, actions: Iterable[Action]) -> None:
    for action in actions:
        if isinstance(action, Batched):
            session.queue(action)
            if isinstance(action, DisableForwarding):
                # A barrier: the kernel goes on after a failed request in a batch, and a
                # bridge must never come up still forwarding because this one failed.
                session.flush()
            continue
        session.flush()
        try:
            _apply_one(session, action)
        except NetlinkError as err:
            if isinstance(action, CreateBridge | CreateVxlan) and err.code == errno.EEXIST:
                vxlan = isinstance(action, CreateVxlan)
                also = " (or a VXLAN device with its vni and port)" if vxlan else ""
                raise ForeignDeviceError(
                    f"{action}: a device named {action.name}{also} appeared meanwhile; "
                    "delete or rename it if hostagent did not create it"
                ) from err
            raise NetworkError(f"{action} failed: {err}") from err
        log.info("network: %s", action)
    session.flush()


def _apply_one(session: _Session, action: Action) -> None:
    match action:
        case CreateBridge(name=name, alias=alias, mtu=mtu):
            _create_bridge(session, name, alias, mtu)
        case CreateVxlan():
            _create_vxlan(session, action)
        case DeleteBridge(name=name) | DeleteVxlan(name=name):
            _delete(session, name, _BRIDGE if isinstance(action, DeleteBridge) else _VXLAN)
        case AddIsolationRule(name=name):
            _add_rule(session, name)
        case DeleteIsolationRule(name=name):
            _delete_rule(session, name)
        case (
            AppendFdb()
            | DeleteFdb()
            | DisableForwarding()
            | SetUp()
            | SetMtu()
            | SetMaster()
            | SetAddress()
            | RemoveAddress()
        ):
            session.queue(action)
            session.flush()
        case _:
            assert_never(action)


def _create_bridge(session: _Session, name: str, alias: str, mtu: int) -> None:
    # STP off and forward delay 0: a VM's tap forwards the moment it joins.
    index = session.create(name, kind="bridge", br_stp_state=0, br_forward_delay=0)
    try:
        # Both need a separate "set": the kernel ignores IFLA_IFALIAS on create, and an MTU
        # given on create is not "set by user", so the first port joining would override it.
        session.link("set", index=index, ifalias=alias, mtu=mtu)
    except NetlinkError:
        session.link("del", index=index)  # an unmarked bridge would look foreign forever
        raise
    session.links[name] = LinkRef(name, index, "bridge", alias)


def _create_vxlan(session: _Session, action: CreateVxlan) -> None:
    master = session.owned(action.bridge, _BRIDGE)
    index = session.create(
        action.name,
        kind="vxlan",
        vxlan_id=action.vni,
        vxlan_local=action.local,
        vxlan_port=action.port,
        vxlan_learning=0,  # the kernel's default is on: with static entries it only races
        mtu=action.mtu,
        master=master,
        state="up",
    )
    try:
        session.link("set", index=index, ifalias=action.alias)
    except NetlinkError:
        session.link("del", index=index)
        raise
    session.links[action.name] = LinkRef(action.name, index, "vxlan", action.alias)


def _delete(session: _Session, name: str, kinds: tuple[str, ...]) -> None:
    if name not in session.links:
        return  # already gone: deletes are idempotent
    index = session.owned(name, kinds)
    try:
        session.link("del", index=index)
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise
    del session.links[name]


def _isolation_rule(bridge: str) -> dict[str, Any]:
    """`ip rule ... iif <bridge> pref ISOLATION_PRIORITY prohibit`, as pyroute2 spells it."""
    return {
        "family": socket.AF_INET,
        "iifname": bridge,
        "priority": ISOLATION_PRIORITY,
        "action": "FR_ACT_PROHIBIT",
    }


def _add_rule(session: _Session, bridge: str) -> None:
    session.owned(bridge, _BRIDGE)
    try:
        session.rule("add", **_isolation_rule(bridge))
    except NetlinkError as err:
        if err.code != errno.EEXIST:  # the very same rule, added meanwhile
            raise


def _delete_rule(session: _Session, bridge: str) -> None:
    """The rule of a bridge of ours, or of one gone (a detached rule: no device to check).
    The kernel deletes the first rule matching what the request names: a narrower rule
    (same iif, priority and action, plus another selector) listed before ours would go
    instead, and ours at the next reconcile. Nobody but hostagent should use that priority."""
    if bridge in session.links:
        session.owned(bridge, _BRIDGE)
    try:
        session.rule("del", **_isolation_rule(bridge))
    except NetlinkError as err:
        if err.code != errno.ENOENT:  # already gone: deletes are idempotent
            raise


def _in_netns(namespace: str | None, call: Callable[[], T]) -> T:
    """call() in namespace: a short-lived thread enters it (setns changes only the calling
    thread) and ends right after, so no pooled thread is ever left in another namespace."""
    if namespace is None:
        return call()
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            netns.setns(namespace, flags=0)
            result.append(call())
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=run, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _find(session: _Session, name: str) -> Any | None:
    if len(name.encode()) > IFNAMSIZ:  # the kernel would answer ERANGE
        return None
    try:
        return session.link("get", ifname=name)[0]
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise
