"""network.netlink against the real kernel, inside a throwaway network namespace per test.

Devices the test itself needs (foreign bridges, veths, taps) are made with pyroute2 directly:
they stand for what an operator or libvirt would have created, not for hostagent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from network import batch
from network.model import ISOLATION_PRIORITY
from network.names import tap_name
from network.netlink import Netlink, retry_dump
from network.plan import (
    AddIsolationRule,
    BridgeWanted,
    ClusterNetworkWanted,
    DeleteBridge,
    DeleteIsolationRule,
    DisableForwarding,
    ForeignDeviceError,
    NetworkError,
    SetMaster,
    SetMtu,
    SetUp,
    TapSeen,
    Underlay,
)
from tests.conftest import require

pytestmark = pytest.mark.integration

HOST = "h1"  # this agent's host id, in every alias it writes
# Without an underlay: bridges only, with the cluster's MTU (a host serving its clusters alone).
ALPHA = ClusterNetworkWanted("alpha", 42, "10.42.0.1/24", mtu=1450)
BETA = ClusterNetworkWanted("beta", 43, "10.43.0.1/24", mtu=1400)


@pytest.fixture
def nsname() -> Iterator[str]:
    require(os.geteuid() == 0, "network namespace tests need root")
    name = f"hostagent-test-{uuid.uuid4().hex[:12]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)  # the kernel frees the devices once nothing holds the namespace


@pytest.fixture
def net(nsname: str) -> Iterator[Netlink]:
    with Netlink(netns=nsname) as netlink:
        yield netlink


@pytest.fixture
def raw(nsname: str) -> Iterator[Any]:
    """Plain pyroute2 in the namespace: plays the operator or libvirt."""
    with IPRoute(netns=nsname, flags=0) as ipr:
        yield ipr


def link(ipr: Any, name: str) -> Any:
    return ipr.link("get", index=ipr.link_lookup(ifname=name)[0])[0]


def test_reconcile_creates_bridge_then_is_idempotent(net: Netlink, raw: Any) -> None:
    assert net.reconcile([ALPHA], host=HOST) != []
    [seen] = net.observe().bridges
    assert seen.name == "habr42"
    assert seen.alias == "hostagent host=h1 cluster=alpha vni=42"
    assert seen.addresses == ("10.42.0.1/24",)
    assert (seen.mtu, seen.up) == (1450, True)
    data = dict(link(raw, "habr42").get(("linkinfo", "data"))["attrs"])
    assert (data["IFLA_BR_STP_STATE"], data["IFLA_BR_FORWARD_DELAY"]) == (0, 0)
    assert net.reconcile([ALPHA], host=HOST) == []


def test_reconcile_repairs_drift(net: Netlink, raw: Any) -> None:
    net.reconcile([ALPHA], host=HOST)
    index = raw.link_lookup(ifname="habr42")[0]
    raw.link("set", index=index, state="down", mtu=9000)
    raw.addr("add", index=index, address="10.99.0.1", prefixlen=24)
    assert len(net.reconcile([ALPHA], host=HOST)) == 3
    assert net.reconcile([ALPHA], host=HOST) == []
    assert net.observe().bridges[0].addresses == ("10.42.0.1/24",)


def test_foreign_bridge_with_other_name_is_left_alone(net: Netlink, raw: Any) -> None:
    raw.link("add", ifname="virbr0", kind="bridge")
    raw.addr("add", index=raw.link_lookup(ifname="virbr0")[0], address="192.168.1.1", prefixlen=24)
    net.reconcile([ALPHA], host=HOST)
    assert net.reconcile([], host=HOST) == [DeleteBridge("habr42"), DeleteIsolationRule("habr42")]
    [left] = net.observe().bridges
    assert (left.name, left.alias, left.addresses, left.up) == (
        "virbr0",
        None,
        ("192.168.1.1/24",),
        False,
    )


def test_stale_bridge_of_ours_is_removed(net: Netlink) -> None:
    net.reconcile([ALPHA, BETA], host=HOST)
    assert net.reconcile([BETA], host=HOST) == [
        DeleteBridge("habr42"),
        DeleteIsolationRule("habr42"),
    ]
    assert [bridge.name for bridge in net.observe().bridges] == ["habr43"]


@pytest.mark.parametrize("kind", ["bridge", "veth"])
def test_foreign_device_on_wanted_name_raises_and_changes_nothing(
    net: Netlink, raw: Any, kind: str
) -> None:
    net.reconcile([BETA], host=HOST)
    extra = {"peer": "habr42-peer"} if kind == "veth" else {}
    raw.link("add", ifname="habr42", kind=kind, **extra)
    with pytest.raises(ForeignDeviceError, match=r"habr42.*not created by hostagent"):
        net.reconcile([ALPHA], host=HOST)  # BETA is no longer wanted, yet must survive the refusal
    assert "habr43" in {bridge.name for bridge in net.observe().bridges}
    assert link(raw, "habr42").get("ifalias") is None


def test_apply_refuses_to_touch_foreign_device(net: Netlink, raw: Any) -> None:
    raw.link("add", ifname="virbr0", kind="bridge")
    with pytest.raises(ForeignDeviceError, match="virbr0"):
        net.apply([DeleteBridge("virbr0")], host=HOST)
    assert [bridge.name for bridge in net.observe().bridges] == ["virbr0"]


def test_enslaved_ports_stay_and_keep_bridge_mtu(net: Netlink, raw: Any) -> None:
    net.reconcile([ALPHA], host=HOST)
    raw.link("add", ifname="vm0", kind="veth", peer="vm0-peer")
    raw.link("add", ifname="hattap0", kind="tuntap", mode="tap")
    bridge = raw.link_lookup(ifname="habr42")[0]
    for port in ("vm0", "hattap0"):
        raw.link("set", index=raw.link_lookup(ifname=port)[0], master=bridge, state="up")
    assert net.bridge_ports("habr42") == ["hattap0", "vm0"]
    # Ports have MTU 1500; a bridge MTU only set on create would follow them up to 1500.
    assert net.reconcile([ALPHA], host=HOST) == []
    assert net.bridge_ports("habr42") == ["hattap0", "vm0"]
    assert net.tap_exists("hattap0")
    assert not net.tap_exists("vm0")
    assert not net.tap_exists("hatmissing")
    assert not net.tap_exists("x" * 16)


def test_two_agents_in_one_namespace_leave_each_other_alone(net: Netlink, raw: Any) -> None:
    other = "lab-2.example"
    net.reconcile([ALPHA], host=HOST)
    net.reconcile([BETA], host=other)
    assert link(raw, "habr43").get("ifalias") == "hostagent host=lab-2.example cluster=beta vni=43"
    with pytest.raises(ForeignDeviceError, match=r"habr43 belongs to hostagent host 'lab-2"):
        net.reconcile([ALPHA, BETA], host=HOST)
    with pytest.raises(ForeignDeviceError, match=r"habr43 .* belongs to hostagent host 'lab-2"):
        net.apply([SetMtu("habr43", 1500)], host=HOST)
    assert net.reconcile([], host=HOST) == [DeleteBridge("habr42"), DeleteIsolationRule("habr42")]
    assert net.reconcile([BETA], host=other) == []
    [left] = net.observe().bridges
    assert (left.name, left.mtu) == ("habr43", 1400)


def test_bridge_with_the_alias_before_host_ids_is_never_touched(net: Netlink, raw: Any) -> None:
    raw.link("add", ifname="habr42", kind="bridge")
    raw.link(
        "set", index=raw.link_lookup(ifname="habr42")[0], ifalias="hostagent cluster=alpha vni=42"
    )
    assert net.reconcile([], host=HOST) == []
    with pytest.raises(ForeignDeviceError, match="ip link set habr42 alias"):
        net.reconcile([ALPHA], host=HOST)
    assert [bridge.name for bridge in net.observe().bridges] == ["habr42"]


@contextlib.contextmanager
def libvirt_tap(raw: Any, name: str) -> Iterator[None]:
    """A tap as libvirt makes it for a running VM (`ip tuntap add dev <name> mode tap`),
    removed afterwards even when the test fails (the namespace's removal would, too)."""
    raw.link("add", ifname=name, kind="tuntap", mode="tap")
    try:
        raw.link("set", index=raw.link_lookup(ifname=name)[0], state="up")
        yield
    finally:
        with contextlib.suppress(Exception):
            raw.link("del", index=raw.link_lookup(ifname=name)[0])


def test_taps_of_running_vms_rejoin_a_bridge_made_anew(net: Netlink, raw: Any) -> None:
    tap, stopped = tap_name("alpha", "m1"), tap_name("alpha", "w1")  # w1's VM is not running
    alpha = dataclasses.replace(ALPHA, taps=frozenset({tap, stopped}))
    with libvirt_tap(raw, tap):
        assert SetMaster(tap, "habr42") in net.reconcile([alpha], host=HOST)
        assert net.bridge_ports("habr42") == [tap]
        raw.link("del", index=raw.link_lookup(ifname="habr42")[0])  # behind the agent's back
        assert net.observe().taps == (TapSeen(tap, None),)
        assert net.reconcile([alpha], host=HOST)[-1] == SetMaster(tap, "habr42")
        assert net.bridge_ports("habr42") == [tap]
        assert net.observe().taps == (TapSeen(tap, "habr42"),)
        assert net.reconcile([alpha], host=HOST) == []


def test_apply_moves_only_the_taps_it_is_given(net: Netlink, raw: Any) -> None:
    tap = tap_name("alpha", "m1")
    net.reconcile([ALPHA], host=HOST)
    with libvirt_tap(raw, tap), libvirt_tap(raw, "vnet0"):
        with pytest.raises(ForeignDeviceError, match=rf"{tap} .*not created by hostagent"):
            net.apply([SetMaster(tap, "habr42")], host=HOST)
        with pytest.raises(ForeignDeviceError, match="vnet0"):
            net.apply([SetMaster("vnet0", "habr42")], host=HOST, taps=[tap])
        assert net.bridge_ports("habr42") == []
        net.apply([SetMaster(tap, "habr42")], host=HOST, taps=[tap])
        assert net.bridge_ports("habr42") == [tap]


def test_legacy_bridge_wanted_still_reconciles(net: Netlink) -> None:
    legacy = BridgeWanted("habr42", "alpha", 42, "10.42.0.1/24", 1450)
    assert net.reconcile([legacy], host=HOST) != []
    assert net.reconcile([ALPHA], host=HOST) == []


def write_proc(nsname: str, path: str, value: str) -> None:
    """Write a /proc/sys file inside the namespace (a thread that entered it)."""

    def run() -> None:
        netns.setns(nsname, flags=0)
        with open(path, "w") as file:
            file.write(value)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


def test_bridges_never_forward_ipv4_even_after_ip_forward_is_set(net: Netlink, nsname: str) -> None:
    write_proc(nsname, "/proc/sys/net/ipv4/ip_forward", "1")  # as libvirt does
    net.reconcile([ALPHA, BETA], host=HOST)
    assert [bridge.forwarding for bridge in net.observe().bridges] == [False, False]
    # Toggling ip_forward sets every device's forwarding again; the next reconcile repairs it.
    write_proc(nsname, "/proc/sys/net/ipv4/ip_forward", "0")
    write_proc(nsname, "/proc/sys/net/ipv4/ip_forward", "1")
    assert [bridge.forwarding for bridge in net.observe().bridges] == [True, True]
    assert net.reconcile([ALPHA, BETA], host=HOST) == [
        DisableForwarding("habr42"),
        DisableForwarding("habr43"),
    ]
    assert net.reconcile([ALPHA, BETA], host=HOST) == []


def test_requests_are_counted(net: Netlink) -> None:
    before = net.requests
    net.observe()
    assert net.requests - before == 4  # link, address, FDB and rule dumps
    net.reconcile([ALPHA], host=HOST)
    # observe: 4 dumps; reconcile: 4 dumps, then add (its echo gives the index), set alias
    # and mtu, address and forwarding off (one batch), the isolation rule, up
    assert net.requests - before == 4 + 4 + 2 + 2 + 1 + 1


def test_underlay_address_must_be_on_the_host(net: Netlink) -> None:
    with pytest.raises(NetworkError, match=r"192\.0\.2\.1 is not on any device"):
        net.reconcile([ALPHA], Underlay("192.0.2.1"), host=HOST)
    assert net.observe().bridges == ()


def test_bridge_ports_of_missing_bridge_raises(net: Netlink) -> None:
    with pytest.raises(NetworkError, match="habr7 does not exist"):
        net.bridge_ports("habr7")


def test_missing_namespace_is_a_clear_error(nsname: str) -> None:
    with pytest.raises(NetworkError, match="does not exist"):
        Netlink(netns=nsname + "-missing").observe()


async def test_refuses_to_run_on_the_event_loop(net: Netlink) -> None:
    with pytest.raises(RuntimeError, match="to_thread"):
        net.observe()
    assert await asyncio.to_thread(net.reconcile, [ALPHA], host=HOST)
    assert await asyncio.to_thread(net.reconcile, [ALPHA], host=HOST) == []


def test_closed_netlink_refuses_calls(nsname: str) -> None:
    net = Netlink(netns=nsname)
    net.close()
    with pytest.raises(RuntimeError, match="closed"):
        net.observe()


def test_interrupted_dumps_are_retried() -> None:
    # Failure injection: the kernel sets NLM_F_DUMP_INTR only under concurrent changes.
    interruptions = 2

    def dump() -> list[str]:
        nonlocal interruptions
        if interruptions:
            interruptions -= 1
            raise NetlinkDumpInterrupted()
        return ["ok"]

    assert retry_dump(dump) == ["ok"]


def test_dumps_interrupted_forever_give_up() -> None:
    def dump() -> list[str]:
        raise NetlinkDumpInterrupted()

    with pytest.raises(NetworkError, match="interrupted after 3 attempts"):
        retry_dump(dump, attempts=3)


def open_batch_socket(nsname: str) -> socket.socket:
    made: list[socket.socket] = []

    def run() -> None:
        netns.setns(nsname, flags=0)
        made.append(batch.open_socket())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return made[0]


def test_batches_report_each_request_and_an_error_stops_none_of_the_others(
    nsname: str, raw: Any
) -> None:
    raw.link("add", ifname="vx0", kind="vxlan", vxlan_id=7, vxlan_learning=0, vxlan_port=4789)
    index = raw.link_lookup(ifname="vx0")[0]
    zero = "00:00:00:00:00:00"
    requests = [
        batch.FdbRequest(True, index, zero, "192.0.2.2"),
        batch.FdbRequest(True, 99_999, zero, "192.0.2.3"),  # no such device
        batch.FdbRequest(True, index, "52:54:00:00:00:02", "192.0.2.2"),
        batch.FdbRequest(False, index, zero, "192.0.2.9"),  # already gone: done
        *(batch.FdbRequest(True, index, zero, f"198.51.100.{n}") for n in range(1, 255)),
        *(batch.FdbRequest(True, index, zero, f"203.0.113.{n}") for n in range(1, 255)),
    ]  # 512 requests: two chunks
    with open_batch_socket(nsname) as sock:
        codes = batch.send(sock, requests)
    assert codes[:4] == [0, errno.ENODEV, 0, 0]
    assert codes[4:] == [0] * 508
    entries = {(m.get("lladdr"), m.get("dst")) for m in raw.fdb("dump", ifindex=index)}
    assert {(zero, "192.0.2.2"), ("52:54:00:00:00:02", "192.0.2.2")} <= entries
    assert len([dst for _, dst in entries if dst]) == 2 + 508


def test_forwarding_off_request_is_the_sysctl(nsname: str, raw: Any) -> None:
    write_proc(nsname, "/proc/sys/net/ipv4/ip_forward", "1")
    raw.link("add", ifname="br0", kind="bridge")
    index = raw.link_lookup(ifname="br0")[0]
    assert link(raw, "br0").get(("af_spec", "AF_INET"))["forwarding"] == 1
    with open_batch_socket(nsname) as sock:
        assert batch.send(sock, [batch.ForwardingOff(index)]) == [0]
    assert link(raw, "br0").get(("af_spec", "AF_INET"))["forwarding"] == 0


def test_failed_batched_action_is_named(net: Netlink, monkeypatch: pytest.MonkeyPatch) -> None:
    net.reconcile([ALPHA], host=HOST)
    # Failure injection: the kernel refusing the second of two batched requests.
    monkeypatch.setattr(batch, "send", lambda sock, requests: [0, errno.EPERM])
    with pytest.raises(NetworkError, match=r"set mtu 1450 on habr42 failed: \[Errno 1\]"):
        net.apply([SetUp("habr42"), SetMtu("habr42", 1450)], host=HOST)


def test_nothing_follows_a_failed_forwarding_off(
    net: Netlink, monkeypatch: pytest.MonkeyPatch
) -> None:
    net.reconcile([ALPHA], host=HOST)
    sent: list[list[batch.Request]] = []

    def refuse_forwarding(sock: socket.socket, requests: list[batch.Request]) -> list[int]:
        sent.append(requests)
        return [errno.EPERM if isinstance(r, batch.ForwardingOff) else 0 for r in requests]

    monkeypatch.setattr(batch, "send", refuse_forwarding)
    with pytest.raises(NetworkError, match="disable IPv4 forwarding on habr42 failed"):
        net.apply([DisableForwarding("habr42"), SetUp("habr42")], host=HOST)
    assert len(sent) == 1 and len(sent[0]) == 1  # SetUp was never sent


PROHIBIT = 8  # FR_ACT_PROHIBIT


def rules(raw: Any) -> set[tuple[str, int, int]]:
    """(iif, priority, action) of every IPv4 rule that names an input device."""
    return {
        (rule.get("iifname"), rule.get("priority"), rule["action"])
        for rule in raw.rule("dump", family=socket.AF_INET)
        if rule.get("iifname")
    }


def test_isolation_rule_comes_and_goes_with_the_bridge(net: Netlink, raw: Any) -> None:
    net.reconcile([ALPHA, BETA], host=HOST)
    ours = {(f"habr{vni}", ISOLATION_PRIORITY, PROHIBIT) for vni in (42, 43)}
    assert rules(raw) == ours
    assert net.observe().isolation_rules == {"habr42", "habr43"}
    # An operator's rules: another priority, another iif, another action.
    raw.rule("add", iifname="habr42", priority=ISOLATION_PRIORITY + 1, action="FR_ACT_PROHIBIT")
    raw.rule("add", iifname="virbr0", priority=ISOLATION_PRIORITY, action="FR_ACT_PROHIBIT")
    raw.rule("add", iifname="habr43", priority=ISOLATION_PRIORITY, table=100)
    theirs = rules(raw) - ours
    assert len(theirs) == 3
    assert net.reconcile([ALPHA, BETA], host=HOST) == []
    assert net.reconcile([ALPHA], host=HOST) == [
        DeleteBridge("habr43"),
        DeleteIsolationRule("habr43"),
    ]
    assert net.reconcile([], host=HOST) == [DeleteBridge("habr42"), DeleteIsolationRule("habr42")]
    assert net.reconcile([], host=HOST) == []
    assert rules(raw) == theirs


def test_missing_rule_is_added_and_one_left_behind_is_removed(net: Netlink, raw: Any) -> None:
    net.reconcile([ALPHA], host=HOST)
    raw.rule("del", iifname="habr42", priority=ISOLATION_PRIORITY, action="FR_ACT_PROHIBIT")
    assert net.reconcile([ALPHA], host=HOST) == [AddIsolationRule("habr42")]
    # The kernel keeps a rule whose device is gone ("detached"): as when the agent stops
    # between deleting a bridge and its rule.
    raw.link("del", index=raw.link_lookup(ifname="habr42")[0])
    assert rules(raw) == {("habr42", ISOLATION_PRIORITY, PROHIBIT)}
    assert net.reconcile([], host=HOST) == [DeleteIsolationRule("habr42")]
    assert rules(raw) == set()


def test_another_agents_rule_is_left_alone(net: Netlink, raw: Any) -> None:
    other = "lab-2.example"
    net.reconcile([BETA], host=other)
    assert net.reconcile([], host=HOST) == []
    for action in (DeleteIsolationRule("habr43"), AddIsolationRule("habr43")):
        with pytest.raises(ForeignDeviceError, match=r"habr43 .* belongs to hostagent host"):
            net.apply([action], host=HOST)
    raw.link("add", ifname="virbr0", kind="bridge")
    with pytest.raises(ForeignDeviceError, match=r"virbr0 .*not created by hostagent"):
        net.apply([AddIsolationRule("virbr0")], host=HOST)
    assert rules(raw) == {("habr43", ISOLATION_PRIORITY, PROHIBIT)}
