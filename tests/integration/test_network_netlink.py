"""network.netlink against the real kernel, inside a throwaway network namespace per test.

Devices the test itself needs (foreign bridges, veths, taps) are made with pyroute2 directly:
they stand for what an operator or libvirt would have created, not for hostagent.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from network.netlink import Netlink, retry_dump
from network.plan import BridgeWanted, DeleteBridge, ForeignDeviceError, NetworkError

pytestmark = pytest.mark.integration

ALPHA = BridgeWanted.for_cluster("alpha", 42, "10.42.0.1/24", mtu=1450)
BETA = BridgeWanted.for_cluster("beta", 43, "10.43.0.1/24", mtu=1400)


@pytest.fixture
def nsname() -> Iterator[str]:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("network namespace tests need root, and CI must run them")
        pytest.skip("network namespace tests need root")
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
    assert net.reconcile([ALPHA]) != []
    [seen] = net.observe()
    assert seen.name == "habr42"
    assert seen.alias == "hostagent cluster=alpha vni=42"
    assert seen.addresses == ("10.42.0.1/24",)
    assert (seen.mtu, seen.up) == (1450, True)
    data = dict(link(raw, "habr42").get(("linkinfo", "data"))["attrs"])
    assert (data["IFLA_BR_STP_STATE"], data["IFLA_BR_FORWARD_DELAY"]) == (0, 0)
    assert net.reconcile([ALPHA]) == []


def test_reconcile_repairs_drift(net: Netlink, raw: Any) -> None:
    net.reconcile([ALPHA])
    index = raw.link_lookup(ifname="habr42")[0]
    raw.link("set", index=index, state="down", mtu=9000)
    raw.addr("add", index=index, address="10.99.0.1", prefixlen=24)
    assert len(net.reconcile([ALPHA])) == 3
    assert net.reconcile([ALPHA]) == []
    assert net.observe()[0].addresses == ("10.42.0.1/24",)


def test_foreign_bridge_with_other_name_is_left_alone(net: Netlink, raw: Any) -> None:
    raw.link("add", ifname="virbr0", kind="bridge")
    raw.addr("add", index=raw.link_lookup(ifname="virbr0")[0], address="192.168.1.1", prefixlen=24)
    net.reconcile([ALPHA])
    assert net.reconcile([]) == [DeleteBridge("habr42")]
    [left] = net.observe()
    assert (left.name, left.alias, left.addresses, left.up) == (
        "virbr0",
        None,
        ("192.168.1.1/24",),
        False,
    )


def test_stale_bridge_of_ours_is_removed(net: Netlink) -> None:
    net.reconcile([ALPHA, BETA])
    assert net.reconcile([BETA]) == [DeleteBridge("habr42")]
    assert [bridge.name for bridge in net.observe()] == ["habr43"]


@pytest.mark.parametrize("kind", ["bridge", "veth"])
def test_foreign_device_on_wanted_name_raises_and_changes_nothing(
    net: Netlink, raw: Any, kind: str
) -> None:
    net.reconcile([BETA])
    extra = {"peer": "habr42-peer"} if kind == "veth" else {}
    raw.link("add", ifname="habr42", kind=kind, **extra)
    with pytest.raises(ForeignDeviceError, match=r"habr42.*not created by hostagent"):
        net.reconcile([ALPHA])  # BETA is no longer wanted, yet must survive the refusal
    assert "habr43" in {bridge.name for bridge in net.observe()}
    assert link(raw, "habr42").get("ifalias") is None


def test_apply_refuses_to_touch_foreign_device(net: Netlink, raw: Any) -> None:
    raw.link("add", ifname="virbr0", kind="bridge")
    with pytest.raises(ForeignDeviceError, match="virbr0"):
        net.apply([DeleteBridge("virbr0")])
    assert [bridge.name for bridge in net.observe()] == ["virbr0"]


def test_enslaved_ports_stay_and_keep_bridge_mtu(net: Netlink, raw: Any) -> None:
    net.reconcile([ALPHA])
    raw.link("add", ifname="vm0", kind="veth", peer="vm0-peer")
    raw.link("add", ifname="hattap0", kind="tuntap", mode="tap")
    bridge = raw.link_lookup(ifname="habr42")[0]
    for port in ("vm0", "hattap0"):
        raw.link("set", index=raw.link_lookup(ifname=port)[0], master=bridge, state="up")
    assert net.bridge_ports("habr42") == ["hattap0", "vm0"]
    # Ports have MTU 1500; a bridge MTU only set on create would follow them up to 1500.
    assert net.reconcile([ALPHA]) == []
    assert net.bridge_ports("habr42") == ["hattap0", "vm0"]
    assert net.tap_exists("hattap0")
    assert not net.tap_exists("vm0")
    assert not net.tap_exists("hatmissing")
    assert not net.tap_exists("x" * 16)


def test_bridge_ports_of_missing_bridge_raises(net: Netlink) -> None:
    with pytest.raises(NetworkError, match="habr7 does not exist"):
        net.bridge_ports("habr7")


def test_missing_namespace_is_a_clear_error(nsname: str) -> None:
    with pytest.raises(NetworkError, match="does not exist"):
        Netlink(netns=nsname + "-missing").observe()


async def test_refuses_to_run_on_the_event_loop(net: Netlink) -> None:
    with pytest.raises(RuntimeError, match="to_thread"):
        net.observe()
    assert await asyncio.to_thread(net.reconcile, [ALPHA])
    assert await asyncio.to_thread(net.reconcile, [ALPHA]) == []


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
