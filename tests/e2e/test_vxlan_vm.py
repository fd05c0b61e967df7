"""A lab VM on this host reaches an endpoint of its cluster on another host over the
cluster's VXLAN network.

This host runs the agent (its VMs' taps live in the root namespace) with an underlay
address on a veth pair; the other end of the pair is "host B", a network namespace
wired by the same network package (VXLAN with the cluster's VNI, bridge, FDB toward
this host), with an endpoint namespace on its bridge. The guest pings the endpoint and
reports the result when it phones home.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from network.model import ClusterNetworkWanted, Peer, Underlay
from network.names import bridge_name, mac_address, vxlan_name
from network.netlink import Netlink
from tests.conftest import require_libvirt
from tests.e2e.agent import Agent, cleanup, link_exists, poll

pytestmark = pytest.mark.e2e

TAG = secrets.token_hex(2)
CLUSTER = f"vx-{TAG}"
VNI = 500_000 + secrets.randbelow(100_000)
NET = f"10.249.{secrets.randbelow(250)}"
UNDERLAY = f"10.248.{secrets.randbelow(250)}"
HOST_B, ENDPOINT = f"havxb-{TAG}", f"havxe-{TAG}"
UL_ROOT, UL_B = f"haul{TAG}", f"haulb{TAG}"
EP_MAC = "52:54:00:aa:bb:cc"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def build_host_b() -> None:
    """Host B: underlay veth to this host, the cluster network, one endpoint on it."""
    ip("netns", "add", HOST_B)
    ip("netns", "add", ENDPOINT)
    ip("link", "add", UL_ROOT, "type", "veth", "peer", "name", UL_B)
    ip("link", "set", UL_B, "netns", HOST_B)
    ip("addr", "add", f"{UNDERLAY}.1/24", "dev", UL_ROOT)
    ip("link", "set", UL_ROOT, "up")
    ip("-n", HOST_B, "addr", "add", f"{UNDERLAY}.2/24", "dev", UL_B)
    ip("-n", HOST_B, "link", "set", UL_B, "up")
    ip("-n", HOST_B, "link", "set", "lo", "up")
    vm_mac = mac_address(CLUSTER, "m1")
    with Netlink(netns=HOST_B) as netlink:
        netlink.reconcile(
            [
                ClusterNetworkWanted(
                    CLUSTER, VNI, f"{NET}.2/24", 1450,
                    frozenset({Peer(f"{UNDERLAY}.1", frozenset({vm_mac}))}),
                )
            ],
            Underlay(f"{UNDERLAY}.2"),
            host=HOST_B,
        )  # fmt: skip
    ip("-n", HOST_B, "link", "add", "ep0", "type", "veth", "peer", "name", "eth0")
    ip("-n", HOST_B, "link", "set", "eth0", "netns", ENDPOINT)
    ip("-n", HOST_B, "link", "set", "ep0", "master", bridge_name(VNI), "mtu", "1450", "up")
    ip("-n", ENDPOINT, "link", "set", "eth0", "address", EP_MAC, "mtu", "1450", "up")
    ip("-n", ENDPOINT, "addr", "add", f"{NET}.50/24", "dev", "eth0")


def tear_down_host_b() -> None:
    for ns in (HOST_B, ENDPOINT):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", UL_ROOT], capture_output=True)


@pytest.fixture(scope="module")
def agent(lab_image_dir: Path) -> Iterator[Agent]:
    require_libvirt()
    agent = Agent(state_dir=Path("/var/lib/hostagent-e2e") / CLUSTER, image_dir=lab_image_dir)
    agent.write_config(
        f'[network]\nunderlay_address = "{UNDERLAY}.1"\npeer_check_interval_s = 1.0\n'
        f'[[network.clusters]]\ncluster = "{CLUSTER}"\n'
        f'peers = [{{address = "{UNDERLAY}.2", macs = ["{EP_MAC}"]}}]\n'
        f'[[cloudconfig.master.files]]\npath = "/etc/hostagent/ping-targets"\n'
        f'content = "PING_TARGETS={NET}.50"\n'
    )
    try:
        build_host_b()
        yield agent
    finally:
        print(agent.log_tail())
        cleanup(agent, [bridge_name(VNI), vxlan_name(VNI)])
        tear_down_host_b()


def spec() -> dict[str, Any]:
    return {
        "role": "master",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": VNI, "address": f"{NET}.11/24", "gateway": f"{NET}.1", "mtu": 1450},
    }


def test_vm_pings_an_endpoint_on_another_host(agent: Agent) -> None:
    client = agent.start()
    client.put_node(CLUSTER, "m1", spec())
    client.wait([(CLUSTER, "m1")], timeout_s=300, progress=print)
    assert link_exists(vxlan_name(VNI))
    guest = client.get_node(CLUSTER, "m1")["status"]["guest"]
    assert guest["pings"] == {f"{NET}.50": True}, guest

    def peer_reported() -> Any:
        networks = client.host()["networks"]
        peers = [p for n in networks if n["cluster"] == CLUSTER for p in n["peers"]]
        return peers if peers and peers[0]["reachable"] is not None else None

    peers = poll(peer_reported, 30, "the underlay check of host B")
    assert peers[0]["address"] == f"{UNDERLAY}.2" and peers[0]["reachable"] is True

    client.delete_node(CLUSTER, "m1")
    client.wait([(CLUSTER, "m1")], until="Gone", timeout_s=120)
    poll(lambda: not link_exists(vxlan_name(VNI)), 30, "the VXLAN device to go with the node")
