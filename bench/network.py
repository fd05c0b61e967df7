"""Wire N clusters with P peers each on one host: hostagent's netlink path vs. `ip`/`bridge`.

Each run gets two fresh network namespaces with an underlay device (a veth, 192.0.2.1/24,
MTU 1500), then wires the same clusters in each: per cluster a bridge (alias, MTU, gateway
address, IPv4 forwarding off, up), a VXLAN device (vni, local, port 4789, learning off,
MTU, in the bridge, up, alias) and per peer an all-zeros FDB entry plus one entry per node
MAC. The baseline runs one `ip`/`bridge`/`sysctl` command per step, as a shell script
would; the baseline's result is checked to plan no actions, so both did the same work.
Run as root:  .venv/bin/python -m bench.network [--clusters 200] [--peers 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, netns

from network.model import (
    ClusterNetworkWanted,
    HostNetworkWanted,
    Peer,
    Underlay,
)
from network.names import mac_address
from network.netlink import Netlink
from network.plan import plan

LOCAL = "192.0.2.1"
MTU = 1450
HOST = "bench"  # the host id that marks the devices made (alias host=bench)


@dataclass
class Result:
    wire_s: float
    requests: int  # netlink messages (each one request and one ack), or baseline commands
    again_s: float = 0.0  # a second reconcile (nothing to do)
    again_requests: int = 0
    teardown_s: float = 0.0


def clusters(count: int, peers: int, macs: int) -> list[ClusterNetworkWanted]:
    wanted = []
    for i in range(count):
        name = f"bench{i}"
        hosts = [
            Peer(
                f"192.0.2.{2 + p}",
                frozenset(mac_address(name, f"p{p}n{m}") for m in range(macs)),
            )
            for p in range(peers)
        ]
        address = f"10.{64 + i // 256}.{i % 256}.1/24"
        wanted.append(ClusterNetworkWanted(name, 1000 + i, address, MTU, frozenset(hosts)))
    return wanted


@contextlib.contextmanager
def host_namespace(role: str) -> Iterator[str]:
    name = f"habench-{uuid.uuid4().hex[:8]}-{role}"
    netns.create(name)
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname="ul0", kind="veth", peer="ul0-peer")
            for device in ("ul0", "ul0-peer", "lo"):
                ipr.link("set", index=ipr.link_lookup(ifname=device)[0], state="up")
            ipr.addr("add", index=ipr.link_lookup(ifname="ul0")[0], address=LOCAL, prefixlen=24)
        yield name
    finally:
        netns.remove(name)


def hostagent(namespace: str, wanted: list[ClusterNetworkWanted]) -> Result:
    underlay = Underlay(LOCAL)
    with Netlink(netns=namespace) as net:
        began = time.perf_counter()
        actions = net.reconcile(wanted, underlay, host=HOST)
        result = Result(time.perf_counter() - began, net.requests)
        assert actions, "nothing was wired"
        began, sent = time.perf_counter(), net.requests
        assert net.reconcile(wanted, underlay, host=HOST) == []
        result.again_s = time.perf_counter() - began
        result.again_requests = net.requests - sent
        began = time.perf_counter()
        net.reconcile([], underlay, host=HOST)
        result.teardown_s = time.perf_counter() - began
    return result


def commands(namespace: str, wanted: list[ClusterNetworkWanted]) -> Iterator[list[str]]:
    ip, bridge = ["ip", "-n", namespace], ["bridge", "-n", namespace]
    sysctl = ["ip", "netns", "exec", namespace, "sysctl", "-qw"]
    for c in wanted:
        br, vx = c.bridge, c.vxlan
        yield [*ip, "link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"]
        yield [*ip, "link", "set", br, "alias", c.alias(HOST), "mtu", str(MTU)]
        yield [*ip, "addr", "add", c.address, "dev", br]
        yield [*sysctl, f"net.ipv4.conf.{br}.forwarding=0"]
        yield [*ip, "link", "set", br, "up"]
        yield [
            *ip, "link", "add", vx, "mtu", str(MTU), "master", br, "up", "type", "vxlan",
            "id", str(c.vni), "local", LOCAL, "dstport", "4789", "nolearning",
        ]  # fmt: skip
        yield [*ip, "link", "set", vx, "alias", c.alias(HOST)]
        for entry in sorted(c.fdb(LOCAL)):
            yield [*bridge, "fdb", "append", entry.mac, "dev", vx, "dst", entry.dst]


def baseline(namespace: str, wanted: list[ClusterNetworkWanted]) -> Result:
    began = time.perf_counter()
    count = 0
    for command in commands(namespace, wanted):
        subprocess.run(command, check=True)
        count += 1
    result = Result(time.perf_counter() - began, count)
    with Netlink(netns=namespace) as net:  # the same state as hostagent's, or it's not fair
        want = HostNetworkWanted(tuple(wanted), Underlay(LOCAL), host=HOST)
        leftover = plan(want, net.observe())
    assert leftover == [], f"baseline differs from hostagent's wiring: {leftover[:3]}"
    began = time.perf_counter()
    for c in wanted:
        for device in (c.vxlan, c.bridge):
            subprocess.run(["ip", "-n", namespace, "link", "del", device], check=True)
    result.teardown_s = time.perf_counter() - began
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--macs-per-peer", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    wanted = clusters(args.clusters, args.peers, args.macs_per_peer)
    entries = sum(len(c.fdb(LOCAL)) for c in wanted)
    print(
        f"{args.clusters} clusters x {args.peers} peers x {args.macs_per_peer} MAC(s) per peer: "
        f"{2 * args.clusters} devices, {entries} FDB entries; median of {args.repeat} runs"
    )
    ours: list[Result] = []
    theirs: list[Result] = []
    for _ in range(args.repeat):
        with host_namespace("agent") as namespace:
            ours.append(hostagent(namespace, wanted))
        with host_namespace("baseline") as namespace:
            theirs.append(baseline(namespace, wanted))
    report(ours, theirs)


def report(ours: list[Result], theirs: list[Result]) -> None:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    agent_s = median([r.wire_s for r in ours])
    base_s = median([r.wire_s for r in theirs])
    print(f"{'':<34}{'wall s':>10}{'requests':>10}")
    print(f"{'hostagent netlink, wire all':<34}{agent_s:>10.3f}{ours[0].requests:>10}")
    again = median([r.again_s for r in ours])
    print(f"{'hostagent, reconcile again (no-op)':<34}{again:>10.3f}{ours[0].again_requests:>10}")
    print(f"{'hostagent, remove all':<34}{median([r.teardown_s for r in ours]):>10.3f}")
    print(f"{'ip/bridge commands, wire all':<34}{base_s:>10.3f}{theirs[0].requests:>10}")
    print(f"{'ip link del, remove all':<34}{median([r.teardown_s for r in theirs]):>10.3f}")
    print(f"baseline / hostagent, wire all: {base_s / agent_s:.1f}x")


if __name__ == "__main__":
    main()
