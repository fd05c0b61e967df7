"""network.nftables against the real kernel and nft: the table that keeps guests to their
own gateway, in the namespaces lab of test_network_vxlan (h1 serves alpha and beta; a1 is
alpha's VM on h1, b1 beta's). Every table lives in a lab namespace and goes with it.

Listeners and connections are sockets the test opens inside the namespaces; the package
under test only runs nft.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from network.firewall import DeleteTable, ReplaceTable, table_wanted
from network.model import ClusterNetworkWanted, NetworkError
from network.names import mac_address
from network.nftables import NfTables
from tests.conftest import require
from tests.integration.test_network_vxlan import (
    HOSTS,
    Lab,
    build,
    in_netns,
    ping,
    plug,
    set_ip_forward,
    vm_address,
    write_proc,
)

pytestmark = pytest.mark.integration

PORT = 8472  # the phone-home port
OTHER_PORT = 2222  # something else listening on the host's gateway address
ALPHA_GW, BETA_GW, UNDERLAY = "10.100.0.1", "10.200.0.1", "192.0.2.1"


@pytest.fixture
def lab() -> Iterator[Lab]:
    require(os.geteuid() == 0, "network namespace tests need root")
    require(shutil.which("nft") is not None, "needs nft (apt-get install nftables)")
    lab = Lab()
    try:
        build(lab)
        for host in HOSTS:
            set_ip_forward(lab, host)
            assert lab.reconcile(host)
        plug(lab)
        yield lab
    finally:
        lab.close()  # the namespaces, and with them every table in them


def nft(lab: Lab, host: str = "h1") -> NfTables:
    return NfTables(netns=lab.ns(host))


def guard(lab: Lab, host: str = "h1") -> list[ReplaceTable | DeleteTable]:
    return nft(lab, host).reconcile(lab.wanted(host), host=host, tcp_ports=[PORT])


@contextlib.contextmanager
def listening(namespace: str, *addresses: tuple[str, int]) -> Iterator[None]:
    """TCP listeners in namespace (the kernel answers the handshake; nobody accepts)."""

    def open_all() -> list[socket.socket]:
        found = []
        for address, port in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(8)
            found.append(sock)
        return found

    socks = in_netns(namespace, open_all)
    try:
        yield
    finally:
        for sock in socks:
            sock.close()


def connects(namespace: str, address: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP handshake from namespace to address:port completes in time."""

    def run() -> bool:
        try:
            socket.create_connection((address, port), timeout=timeout).close()
        except OSError:
            return False
        return True

    return in_netns(namespace, run)


def test_guests_reach_only_their_own_gateway(lab: Lab) -> None:
    a1, b1, h1 = lab.ns("a1"), lab.ns("b1"), lab.ns("h1")
    listeners = [(gw, port) for gw in (ALPHA_GW, BETA_GW) for port in (PORT, OTHER_PORT)]
    with listening(h1, *listeners, (UNDERLAY, PORT)), listening(a1, ("0.0.0.0", PORT)):
        # The defect: the prohibit rule stops forwarding, not local delivery.
        assert connects(a1, BETA_GW, PORT)
        assert ping(a1, BETA_GW)
        assert guard(lab)
        assert connects(a1, ALPHA_GW, PORT)  # phone-home
        assert ping(a1, ALPHA_GW)
        assert connects(b1, BETA_GW, PORT)
        assert not connects(a1, BETA_GW, PORT)  # the host's address on another bridge
        assert not ping(a1, BETA_GW, tries=2)
        assert not connects(b1, ALPHA_GW, PORT)
        assert not connects(a1, UNDERLAY, PORT)  # or anywhere else on the host
        assert not ping(a1, UNDERLAY, tries=2)
        assert not connects(a1, ALPHA_GW, OTHER_PORT)  # only phone-home on its own
        # The host still reaches its guests (the replies come back), and they each other.
        assert connects(h1, vm_address("a1"), PORT)
        assert ping(a1, vm_address("a2")) and ping(a1, vm_address("a3"))
        assert ping(b1, vm_address("b2"))
        assert not ping(b1, vm_address("a1"), tries=2)


def test_bridged_traffic_passes_when_br_netfilter_hands_it_to_the_ip_hooks(lab: Lab) -> None:
    # With br_netfilter, frames a bridge forwards go through the inet forward hook with the
    # bridge as both iif and oif (Docker and Kubernetes hosts turn this on): a rule
    # dropping all that comes in on a cluster bridge would cut the cluster in two.
    h1 = lab.ns("h1")
    require(
        os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        "br_netfilter is not loaded on this kernel",
    )
    for family in ("iptables", "ip6tables"):
        write_proc(h1, f"/proc/sys/net/bridge/bridge-nf-call-{family}", "1")
    assert guard(lab)
    assert ping(lab.ns("a1"), vm_address("a2"))  # a1's tap -> habr100 -> havx100
    assert ping(lab.ns("b1"), vm_address("b2"))
    assert not ping(lab.ns("b1"), vm_address("a1"), tries=2)


def _ipv6(lab: Lab) -> None:
    """Global IPv6 on h1's bridges and on a1 and b1, routes via h1, static neighbours
    (the table drops ND to the host, so this isolates what the forward hook does), and
    IPv6 forwarding on in h1: what an operator or another tool could set up."""
    h1 = lab.ns("h1")
    write_proc(h1, "/proc/sys/net/ipv6/conf/all/forwarding", "1")
    ends = {"a1": ("habr100", "2001:db8:100"), "b1": ("habr200", "2001:db8:200")}
    for vm, (bridge, prefix) in ends.items():
        for namespace, device in ((h1, bridge), (lab.ns(vm), "eth0")):
            write_proc(namespace, f"/proc/sys/net/ipv6/conf/{device}/accept_dad", "0")
        with IPRoute(netns=h1, flags=0) as ipr:
            index = ipr.link_lookup(ifname=bridge)[0]
            bridge_mac = ipr.get_links(index)[0].get("address")
            ipr.addr("add", index=index, address=f"{prefix}::1", prefixlen=64)
            vm_mac = mac_address("alpha" if vm == "a1" else "beta", vm)
            ipr.neigh("add", dst=f"{prefix}::11", lladdr=vm_mac, ifindex=index, state=0x80)
        with IPRoute(netns=lab.ns(vm), flags=0) as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=index, address=f"{prefix}::11", prefixlen=64)
            ipr.neigh("add", dst=f"{prefix}::1", lladdr=bridge_mac, ifindex=index, state=0x80)
            ipr.route("add", dst="::/0", gateway=f"{prefix}::1", family=socket.AF_INET6)


def test_ipv6_is_neither_forwarded_nor_delivered(lab: Lab) -> None:
    _ipv6(lab)
    a1, b1, h1 = lab.ns("a1"), lab.ns("b1"), lab.ns("h1")
    on_h1 = [("2001:db8:200::1", PORT), ("2001:db8:100::1", PORT), (ALPHA_GW, PORT)]
    with listening(b1, ("::", PORT)), listening(h1, *on_h1):
        # Control: without the table, h1 routes IPv6 between its clusters and takes it in.
        assert connects(a1, "2001:db8:200::11", PORT)
        assert connects(a1, "2001:db8:200::1", PORT)
        assert guard(lab)
        assert not connects(a1, "2001:db8:200::11", PORT)
        assert not connects(a1, "2001:db8:200::1", PORT)
        assert not connects(a1, "2001:db8:100::1", PORT)  # not even its own gateway
        assert not connects(b1, "2001:db8:100::11", PORT)
        assert connects(a1, ALPHA_GW, PORT)  # IPv4 phone-home as before


def test_second_reconcile_changes_nothing_and_drift_is_repaired(lab: Lab) -> None:
    [replaced] = guard(lab)
    assert isinstance(replaced, ReplaceTable)
    listing = nft(lab).listing("h1")
    assert listing == replaced.wanted.definition()  # exactly what nft lists
    assert guard(lab) == []
    assert nft(lab).listing("h1") == listing
    # Changed by hand: put back whole, in one transaction.
    by_hand = ["nft", "flush", "chain", "inet", "hostagent_h1", "bridge_input"]
    subprocess.run(["ip", "netns", "exec", lab.ns("h1"), *by_hand], check=True)
    assert nft(lab).listing("h1") != listing
    assert guard(lab) == [replaced]
    assert nft(lab).listing("h1") == listing
    assert not ping(lab.ns("a1"), BETA_GW, tries=2)


def test_the_last_cluster_gone_takes_the_table(lab: Lab) -> None:
    guard(lab)
    alpha = [c for c in lab.wanted("h1") if c.cluster == "alpha"]
    [replaced] = nft(lab).reconcile(alpha, host="h1", tcp_ports=[PORT])
    assert isinstance(replaced, ReplaceTable)
    assert "habr200" not in (nft(lab).listing("h1") or "")
    assert nft(lab).reconcile([], host="h1", tcp_ports=[PORT]) == [DeleteTable("hostagent_h1")]
    assert nft(lab).listing("h1") is None
    assert nft(lab).reconcile([], host="h1", tcp_ports=[PORT]) == []
    assert ping(lab.ns("a1"), BETA_GW)


def test_another_hosts_table_is_never_touched(lab: Lab) -> None:
    other = ClusterNetworkWanted("gamma", 300, "10.30.0.1/24")
    theirs = nft(lab).reconcile([other], host="lab-2", tcp_ports=[PORT])
    assert theirs == [ReplaceTable(table_wanted([other], host="lab-2", tcp_ports=[PORT]))]
    before = nft(lab).listing("lab-2")
    assert before is not None
    guard(lab)
    nft(lab).reconcile([], host="h1", tcp_ports=[PORT])
    assert nft(lab).listing("lab-2") == before
    assert nft(lab).listing("h1") is None


def test_a_missing_namespace_is_a_clear_error(lab: Lab) -> None:
    missing = NfTables(netns=lab.ns("nowhere"))
    with pytest.raises(NetworkError, match=r"network namespace .*nowhere' does not exist"):
        missing.reconcile(lab.wanted("h1"), host="h1", tcp_ports=[PORT])
