"""Per-cluster VXLAN networks across hosts: real kernel VXLAN, bridges and FDB, in namespaces.

The lab, one set of namespaces per test (names unique per run, all removed afterwards):

    underlay   bridge "ul" joining the hosts' eth0 (veth pairs), 192.0.2.0/24
    h1 h2 h3   "hosts": each runs network.Netlink(netns=...) for its clusters
    a1 a2 a3   "VMs" of cluster alpha (vni 100, 10.100.0.0/24), one per host
    b1 b2      "VMs" of cluster beta (vni 200, 10.200.0.0/24) on h1 and h2

A VM is a namespace whose eth0 is a veth; its other end (t-<vm>) sits in the host's
namespace, in the cluster bridge, as libvirt's tap would. Host i is gateway 10.x.0.i on
each cluster it serves; VM <c><i> is 10.x.0.1i with a default route via its host.
Pings are sent from the test (a raw ICMP socket inside the VM's namespace, DF on request);
the package under test never runs a command.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from pyroute2 import IPRoute, netns
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from network.model import ISOLATION_PRIORITY, VXLAN_OVERHEAD, ZERO_MAC, FdbEntry
from network.names import mac_address
from network.netlink import Netlink
from network.plan import (
    AddIsolationRule,
    AppendFdb,
    ClusterNetworkWanted,
    DeleteBridge,
    DeleteFdb,
    DeleteIsolationRule,
    DeleteVxlan,
    DisableForwarding,
    ForeignDeviceError,
    HostNetworkWanted,
    NetworkError,
    Peer,
    SetMaster,
    SetMtu,
    Underlay,
    plan,
)
from tests.conftest import require

pytestmark = pytest.mark.integration

T = TypeVar("T")
CLUSTERS = {"alpha": (100, "10.100.0"), "beta": (200, "10.200.0")}
VMS = {"a1": "h1", "a2": "h2", "a3": "h3", "b1": "h1", "b2": "h2"}
HOSTS = ("h1", "h2", "h3")
MTU = 1450  # the cluster MTU; the underlay veths have 1500


def in_netns(namespace: str, call: Callable[[], T]) -> T:
    """Run call in a fresh thread that has entered namespace (threads have their own)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            netns.setns(namespace, flags=0)
            result.append(call())
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def write_proc(namespace: str, path: str, value: str) -> None:
    def write() -> None:
        with open(path, "w") as file:
            file.write(value)

    in_netns(namespace, write)


def read_proc(namespace: str, path: str) -> str:
    def read() -> str:
        with open(path) as file:
            return file.read().strip()

    return in_netns(namespace, read)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(namespace: str, dst: str, size: int = 56, df: bool = False, tries: int = 3) -> bool:
    """One ICMP echo answered within `tries` attempts of 0.5 s; size is the payload, as
    with ping -s; df=True is ping -M do (too big for the route's MTU -> False)."""

    def run() -> bool:
        ident = random.randrange(1, 0xFFFF)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
            if df:
                sock.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
            for seq in range(tries):
                header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
                payload = bytes(size)
                packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq)
                try:
                    sock.sendto(packet + payload, (dst, 0))
                except OSError:  # EMSGSIZE: too big for the route with DF
                    return False
                if _await_reply(sock, dst, ident, seq, time.monotonic() + 0.5):
                    return True
        return False

    return in_netns(namespace, run)


def _await_reply(sock: socket.socket, dst: str, ident: int, seq: int, deadline: float) -> bool:
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, (src, _) = sock.recvfrom(65535)
        except TimeoutError:
            return False
        icmp = data[(data[0] & 0x0F) * 4 :]
        kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", icmp[:8])
        if src == dst and kind == 0 and (got_ident, got_seq) == (ident, seq):
            return True
    return False


class Monitor:
    """RTNL notifications about our devices (habr*, havx*) in one namespace.

    Link and IPv4 address messages, and VXLAN FDB messages (AF_BRIDGE, with a destination),
    whose ifindex is one of our devices. The rest is what the kernel announces on its own
    and at times of its own choosing: the bridge learning MACs (AF_BRIDGE entries without a
    destination, also on the VXLAN port), ARP, the underlay veth's state.
    """

    GROUPS = 0x1 | 0x4 | 0x10  # RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR

    def __init__(self, namespace: str) -> None:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, self.GROUPS))
            sock.setblocking(False)
            return sock

        self.sock = in_netns(namespace, open_socket)
        with IPRoute(netns=namespace, flags=0) as ipr:
            links = ipr.link("dump")
            self.ours = {
                link["index"] for link in links if link.get("ifname")[:4] in ("habr", "havx")
            }

    def drain(self) -> list[tuple[int, int, int, str | None]]:
        """(type, family, ifindex, NDA_DST) per message about our devices since last time."""
        time.sleep(0.05)
        found = []
        with contextlib.suppress(BlockingIOError):
            while data := self.sock.recv(1 << 20):
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    found.append(_describe(kind, data[offset : offset + length]))
                    offset += (length + 3) & ~3
        return [
            (kind, family, index, dst)
            for kind, family, index, dst in found
            if index in self.ours and (kind not in (28, 29) or (family, bool(dst)) == (7, True))
        ]

    def close(self) -> None:
        self.sock.close()


def _describe(kind: int, message: bytes) -> tuple[int, int, int, str | None]:
    family = message[16]
    ifindex: int = struct.unpack_from("=i", message, 20)[0]
    if kind not in (28, 29):  # RTM_NEWNEIGH, RTM_DELNEIGH
        return kind, family, ifindex, None
    msg = ndmsg(message)
    msg.decode()
    return kind, family, ifindex, msg.get("dst")


@dataclass
class Lab:
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    namespaces: list[str] = field(default_factory=list)
    nets: dict[str, Netlink] = field(default_factory=dict)
    peers_of: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def ns(self, role: str) -> str:
        return f"hatest-{self.run}-{role}"

    def create(self, role: str) -> str:
        name = self.ns(role)
        netns.create(name)
        self.namespaces.append(name)
        return name

    def close(self) -> None:
        for net in self.nets.values():
            net.close()
        for name in reversed(self.namespaces):
            with contextlib.suppress(OSError):
                netns.remove(name)

    @staticmethod
    def address(host: str) -> str:
        return f"192.0.2.{host[1:]}"

    def underlay(self, host: str) -> Underlay:
        return Underlay(self.address(host))

    def serves(self, host: str) -> list[str]:
        return sorted({cluster_of(vm) for vm, on in VMS.items() if on == host})

    def wanted(self, host: str) -> list[ClusterNetworkWanted]:
        """What the zone would tell host: its clusters, each with the other hosts serving
        it (self.peers_of overrides) and their VMs' MACs."""
        networks = []
        for cluster in self.serves(host):
            vni, subnet = CLUSTERS[cluster]
            others = {on for vm, on in VMS.items() if cluster_of(vm) == cluster} - {host}
            others = self.peers_of.get(host, {}).get(cluster, others)
            peers = frozenset(
                Peer(self.address(other), frozenset(macs_on(other, cluster))) for other in others
            )
            address = f"{subnet}.{host[1:]}/24"
            networks.append(ClusterNetworkWanted(cluster, vni, address, MTU, peers))
        return networks

    def reconcile(self, host: str) -> list[Any]:
        return self.nets[host].reconcile(self.wanted(host), self.underlay(host), host=host)


def cluster_of(vm: str) -> str:
    return "alpha" if vm.startswith("a") else "beta"


def macs_on(host: str, cluster: str) -> list[str]:
    return [
        mac_address(cluster, vm)
        for vm, on in VMS.items()
        if on == host and cluster_of(vm) == cluster
    ]


def vm_address(vm: str) -> str:
    return f"{CLUSTERS[cluster_of(vm)][1]}.1{vm[1:]}"


def build(lab: Lab) -> None:
    underlay = lab.create("underlay")
    with IPRoute(netns=underlay, flags=0) as ipr:
        ipr.link("add", ifname="ul", kind="bridge", br_stp_state=0, br_forward_delay=0)
        ipr.link("set", index=ipr.link_lookup(ifname="ul")[0], state="up")
    for host in HOSTS:
        namespace = lab.create(host)
        _veth(namespace, "eth0", underlay, f"p-{host}", master="ul")
        with IPRoute(netns=namespace, flags=0) as ipr:
            _up(ipr, "lo")
            _up(ipr, "eth0", address=(lab.address(host), 24))
        lab.nets[host] = Netlink(netns=namespace)
    for vm, host in VMS.items():
        namespace = lab.create(vm)
        _veth(namespace, "eth0", lab.ns(host), f"t-{vm}")
        subnet = CLUSTERS[cluster_of(vm)][1]
        with IPRoute(netns=namespace, flags=0) as ipr:
            _up(ipr, "lo")
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=index, address=mac_address(cluster_of(vm), vm), mtu=MTU)
            _up(ipr, "eth0", address=(vm_address(vm), 24))
            ipr.route("add", dst="0.0.0.0/0", gateway=f"{subnet}.{host[1:]}")


def plug(lab: Lab) -> None:
    """Put each VM's tap into its cluster's bridge, as libvirt does when the domain starts."""
    for vm, host in VMS.items():
        vni, _ = CLUSTERS[cluster_of(vm)]
        with IPRoute(netns=lab.ns(host), flags=0) as ipr:
            bridge = ipr.link_lookup(ifname=f"habr{vni}")[0]
            ipr.link("set", index=ipr.link_lookup(ifname=f"t-{vm}")[0], master=bridge)


def _veth(namespace: str, name: str, other: str, peer: str, master: str | None = None) -> None:
    with IPRoute(netns=namespace, flags=0) as ipr:
        ipr.link("add", ifname=name, kind="veth", peer=peer)
        ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], net_ns_fd=other)
    with IPRoute(netns=other, flags=0) as ipr:
        index = ipr.link_lookup(ifname=peer)[0]
        if master:
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=master)[0])
        ipr.link("set", index=index, state="up")


def _up(ipr: Any, name: str, address: tuple[str, int] | None = None) -> None:
    index = ipr.link_lookup(ifname=name)[0]
    if address:
        ipr.addr("add", index=index, address=address[0], prefixlen=address[1])
    ipr.link("set", index=index, state="up")


def set_ip_forward(lab: Lab, host: str) -> None:
    """What libvirt (and most hosts) do: ip_forward=1, which also sets every device's
    conf/<dev>/forwarding and conf/default/forwarding to 1. The kernel does that only on a
    change, so it is switched off first, as a reboot would."""
    for value in "01":
        write_proc(lab.ns(host), "/proc/sys/net/ipv4/ip_forward", value)


@pytest.fixture
def lab() -> Iterator[Lab]:
    require(os.geteuid() == 0, "network namespace tests need root")
    lab = Lab()
    try:
        build(lab)
        yield lab
    finally:
        lab.close()


@pytest.fixture
def wired(lab: Lab) -> Lab:
    """The lab with every host's clusters wired (after ip_forward=1) and the VMs plugged."""
    for host in HOSTS:
        set_ip_forward(lab, host)
        assert lab.reconcile(host)
    plug(lab)
    return lab


def isolation_rules(lab: Lab, host: str) -> set[str]:
    """The iif of each `iif <dev> pref ISOLATION_PRIORITY prohibit` rule on host."""
    with IPRoute(netns=lab.ns(host), flags=0) as ipr:
        found = ipr.rule("dump", family=socket.AF_INET)
        return {
            str(rule.get("iifname"))
            for rule in found
            if rule.get("priority") == ISOLATION_PRIORITY and rule["action"] == 8  # prohibit
        }


def vxlan_fdb(lab: Lab, host: str, vni: int) -> set[FdbEntry]:
    [seen] = [v for v in lab.nets[host].observe().vxlans if v.vni == vni]
    return set(seen.fdb)


# --- tests -------------------------------------------------------------------------------


def test_devices_are_wired_as_specified(wired: Lab) -> None:
    seen = wired.nets["h1"].observe()
    vxlans = {device.name: device for device in seen.vxlans}
    alpha, beta = vxlans["havx100"], vxlans["havx200"]
    assert (alpha.vni, alpha.port, alpha.local, alpha.learning) == (100, 4789, "192.0.2.1", False)
    assert (alpha.mtu, alpha.master, alpha.up) == (1500 - VXLAN_OVERHEAD, "habr100", True)
    assert alpha.alias == "hostagent host=h1 cluster=alpha vni=100"
    assert alpha.fdb == {
        FdbEntry(ZERO_MAC, "192.0.2.2"),
        FdbEntry(ZERO_MAC, "192.0.2.3"),
        FdbEntry(mac_address("alpha", "a2"), "192.0.2.2"),
        FdbEntry(mac_address("alpha", "a3"), "192.0.2.3"),
    }
    assert beta.fdb == {
        FdbEntry(ZERO_MAC, "192.0.2.2"),
        FdbEntry(mac_address("beta", "b2"), "192.0.2.2"),
    }
    [bridge] = [device for device in seen.bridges if device.name == "habr100"]
    assert (bridge.mtu, bridge.addresses, bridge.up) == (1450, ("10.100.0.1/24",), True)
    assert read_proc(wired.ns("h1"), "/proc/sys/net/ipv4/conf/habr100/forwarding") == "0"
    assert read_proc(wired.ns("h1"), "/proc/sys/net/ipv4/ip_forward") == "1"  # left as found


def test_cluster_traffic_crosses_hosts(wired: Lab) -> None:
    for src, dst in [("a1", "a2"), ("a1", "a3"), ("a3", "a2"), ("b2", "b1")]:
        assert ping(wired.ns(src), vm_address(dst)), f"{src} -> {dst}"


def test_clusters_stay_apart_even_with_ip_forward_on(wired: Lab) -> None:
    # Routed through the host (b1's gateway is h1, which also has alpha's subnet).
    assert not ping(wired.ns("b1"), vm_address("a1"), tries=2)
    assert not ping(wired.ns("b1"), vm_address("a2"), tries=2)
    # On-link across the VNIs: alpha's broadcast ARP never reaches beta's segment.
    with IPRoute(netns=wired.ns("a2"), flags=0) as ipr:
        ipr.route("add", dst="10.200.0.0/24", oif=ipr.link_lookup(ifname="eth0")[0])
    assert not ping(wired.ns("a2"), vm_address("b2"), tries=2)
    # ip_forward=1 written again re-enables forwarding on every device (the next reconcile
    # takes that back); until then the isolation rules alone keep the clusters apart.
    set_ip_forward(wired, "h1")
    assert read_proc(wired.ns("h1"), "/proc/sys/net/ipv4/conf/habr200/forwarding") == "1"
    assert isolation_rules(wired, "h1") == {"habr100", "habr200"}
    assert not ping(wired.ns("b1"), vm_address("a1"), tries=2)
    assert not ping(wired.ns("a1"), vm_address("b1"), tries=2)
    assert not ping(wired.ns("b1"), vm_address("a2"), tries=2)  # on to another host, too
    assert ping(wired.ns("b1"), "10.200.0.1")  # the host's own address: its gateway
    assert ping(wired.ns("a1"), "10.100.0.1")
    assert ping(wired.ns("b1"), vm_address("b2"))  # its own cluster, across hosts
    assert wired.reconcile("h1") == [DisableForwarding("habr100"), DisableForwarding("habr200")]
    assert not ping(wired.ns("b1"), vm_address("a1"), tries=2)


def test_the_isolation_rules_are_what_hold_with_ip_forward_on(wired: Lab) -> None:
    # Control: without the rules, forwarding back on lets h1 route between its clusters.
    with IPRoute(netns=wired.ns("h1"), flags=0) as ipr:
        for bridge in ("habr100", "habr200"):
            ipr.rule("del", iifname=bridge, priority=ISOLATION_PRIORITY, action="FR_ACT_PROHIBIT")
    set_ip_forward(wired, "h1")
    assert ping(wired.ns("b1"), vm_address("a1"))
    assert wired.reconcile("h1") == [
        DisableForwarding("habr100"),
        AddIsolationRule("habr100"),
        DisableForwarding("habr200"),
        AddIsolationRule("habr200"),
    ]
    set_ip_forward(wired, "h1")
    assert not ping(wired.ns("b1"), vm_address("a1"), tries=2)
    # The cluster leaves h1: its bridge goes, and its rule with it.
    alpha = [c for c in wired.wanted("h1") if c.cluster == "alpha"]
    assert wired.nets["h1"].reconcile(alpha, wired.underlay("h1"), host="h1") == [
        DeleteVxlan("havx200"),
        DeleteBridge("habr200"),
        DeleteIsolationRule("habr200"),
        DisableForwarding("habr100"),
    ]
    assert isolation_rules(wired, "h1") == {"habr100"}
    assert ping(wired.ns("a1"), "10.100.0.1")


def test_cluster_mtu_passes_and_one_byte_more_does_not(wired: Lab) -> None:
    a1, a2 = wired.ns("a1"), vm_address("a2")
    assert ping(a1, a2, size=MTU - 28, df=True)
    assert not ping(a1, a2, size=MTU - 27, df=True)
    # With a bigger NIC the VM can send it, and the host's bridge and VXLAN device drop it.
    with IPRoute(netns=a1, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], mtu=1500)
    with IPRoute(netns=wired.ns("h1"), flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="t-a1")[0], mtu=1500)
    assert not ping(a1, a2, size=MTU - 27, df=True, tries=2)
    assert ping(a1, a2, size=MTU - 28, df=True)


def test_cluster_mtu_above_underlay_minus_50_is_refused_and_changes_nothing(lab: Lab) -> None:
    with IPRoute(netns=lab.ns("h1"), flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], mtu=1400)
    with pytest.raises(NetworkError, match=r"wants MTU 1450, but the underlay leaves 1350"):
        lab.reconcile("h1")
    seen = lab.nets["h1"].observe()
    assert (seen.bridges, seen.vxlans) == ((), ())


def test_peers_change_by_difference(wired: Lab) -> None:
    net = wired.nets["h1"]
    before = vxlan_fdb(wired, "h1", 100)
    wired.peers_of["h1"] = {"alpha": {"h2"}}  # h3 leaves alpha, as h1 is told
    monitor = Monitor(wired.ns("h1"))
    try:
        sent = net.requests
        actions = wired.reconcile("h1")
        requests = net.requests - sent
        events = monitor.drain()
    finally:
        monitor.close()
    a3 = mac_address("alpha", "a3")
    assert actions == [
        DeleteFdb("havx100", ZERO_MAC, "192.0.2.3"),
        DeleteFdb("havx100", a3, "192.0.2.3"),
    ]
    assert requests == 4 + 2  # link, address, FDB and rule dumps, then one per entry
    assert {(kind, dst) for kind, _, _, dst in events} == {(29, "192.0.2.3")}  # RTM_DELNEIGH
    assert vxlan_fdb(wired, "h1", 100) == before - {
        FdbEntry(ZERO_MAC, "192.0.2.3"),
        FdbEntry(a3, "192.0.2.3"),
    }
    assert not ping(wired.ns("a1"), vm_address("a3"), tries=2)
    assert ping(wired.ns("a1"), vm_address("a2"))
    assert ping(wired.ns("b1"), vm_address("b2"))

    del wired.peers_of["h1"]  # h3 is back
    assert wired.reconcile("h1") == [
        AppendFdb("havx100", ZERO_MAC, "192.0.2.3"),
        AppendFdb("havx100", a3, "192.0.2.3"),
    ]
    assert vxlan_fdb(wired, "h1", 100) == before
    assert ping(wired.ns("a1"), vm_address("a3"))


def test_second_apply_changes_nothing_and_a_restarted_agent_adopts(wired: Lab) -> None:
    monitors = {host: Monitor(wired.ns(host)) for host in HOSTS}
    try:
        for host in HOSTS:
            assert wired.reconcile(host) == []
        assert {host: m.drain() for host, m in monitors.items()} == {host: [] for host in HOSTS}
        for host in HOSTS:  # the agent restarts: a new Netlink, nothing remembered
            wired.nets[host].close()
            wired.nets[host] = Netlink(netns=wired.ns(host))
            want = HostNetworkWanted.of(wired.wanted(host), wired.underlay(host), host=host)
            assert plan(want, wired.nets[host].observe()) == []
            assert wired.reconcile(host) == []
        assert {host: m.drain() for host, m in monitors.items()} == {host: [] for host in HOSTS}
        # The monitor is not blind: drift repaired is a change it reports.
        with IPRoute(netns=wired.ns("h1"), flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="havx100")[0], mtu=1400)
        monitors["h1"].drain()
        assert wired.reconcile("h1") == [SetMtu("havx100", 1450)]
        assert [event[0] for event in monitors["h1"].drain()] == [16]  # RTM_NEWLINK
    finally:
        for monitor in monitors.values():
            monitor.close()
    assert ping(wired.ns("a1"), vm_address("a3"))


def test_cluster_leaving_a_host_takes_only_its_devices(wired: Lab) -> None:
    h2 = wired.ns("h2")
    with IPRoute(netns=h2, flags=0) as ipr:  # someone else's devices, named like ours
        ipr.link("add", ifname="flannel.1", kind="vxlan", vxlan_id=1, vxlan_port=8472)
        ipr.link("add", ifname="virbr0", kind="bridge")
    net = wired.nets["h2"]
    alpha = [c for c in wired.wanted("h2") if c.cluster == "alpha"]
    assert net.reconcile(alpha, wired.underlay("h2"), host="h2") == [
        DeleteVxlan("havx200"),
        DeleteBridge("habr200"),
        DeleteIsolationRule("habr200"),
    ]
    assert isolation_rules(wired, "h2") == {"habr100"}
    seen = net.observe()
    assert {v.name for v in seen.vxlans} == {"havx100", "flannel.1"}
    assert {b.name for b in seen.bridges} == {"habr100", "virbr0"}
    assert "t-b2" in seen.other_links  # the VM's tap outlives its bridge, as with libvirt
    assert ping(wired.ns("a1"), vm_address("a2"))


def test_foreign_vxlan_on_our_vni_blocks_and_changes_nothing(lab: Lab) -> None:
    with IPRoute(netns=lab.ns("h1"), flags=0) as ipr:
        ipr.link("add", ifname="vxlan-100", kind="vxlan", vxlan_id=100, vxlan_port=4789)
    with pytest.raises(ForeignDeviceError, match=r"vxlan-100 .*uses vni 100 on UDP port 4789"):
        lab.reconcile("h1")
    seen = lab.nets["h1"].observe()
    assert [v.name for v in seen.vxlans] == ["vxlan-100"]
    assert seen.bridges == ()


def test_lost_bridge_is_rebuilt_with_its_vxlan_port(wired: Lab) -> None:
    with IPRoute(netns=wired.ns("h1"), flags=0) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="habr100")[0])  # by hand, by mistake
    actions = wired.reconcile("h1")
    assert SetMaster("havx100", "habr100") in actions
    [vxlan] = [v for v in wired.nets["h1"].observe().vxlans if v.name == "havx100"]
    assert vxlan.master == "habr100"
    plug(wired)  # libvirt re-plugs the taps when the domains restart or reattach
    assert ping(wired.ns("a1"), vm_address("a2"))


def test_underlay_mtu_change_resizes_bridges_and_vxlan_devices(wired: Lab) -> None:
    with IPRoute(netns=wired.ns("h1"), flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], mtu=9000)
    assert wired.reconcile("h1") == [
        SetMtu("habr100", 8950),
        SetMtu("havx100", 8950),
        SetMtu("habr200", 8950),
        SetMtu("havx200", 8950),
    ]
    seen = wired.nets["h1"].observe()
    assert {d.mtu for d in (*seen.bridges, *seen.vxlans)} == {8950}
    assert wired.reconcile("h1") == []
