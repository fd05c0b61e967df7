"""Time from PUT to Running and to Ready, for 1 node and for 8 at once, against a baseline.

The baseline does the same work without the agent: bridge (pyroute2), qcow2 overlay,
config drive, domain XML, defineXML + create through libvirt-python, timed to Running.
Run as root with libvirtd up:  .venv/bin/python -m bench.node_startup [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt

from cloudconfig.configdrive import build_config_drive, config_drive_files
from cloudconfig.context import NodeContext
from hostagent.images import ImageCatalog
from hostagent.labimage.build import build_lab_image
from hostagent.virt import disk
from hostagent.virt.domain import DomainMeta, DomainParams, domain_xml
from network import names
from network.netlink import Netlink
from network.plan import BridgeWanted
from tests.conftest import IMAGE_CACHE
from tests.e2e.agent import Agent, cleanup

VNI = 190_000 + secrets.randbelow(9_000)
SUBNET = "10.252.7"
# The baseline's own network: it runs between the agent's rounds.
BASE_VNI = VNI + 1
BASE_SUBNET = "10.252.8"


def node_spec(index: int) -> dict[str, Any]:
    return {
        "role": "master" if index == 0 else "worker",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": VNI, "address": f"{SUBNET}.{10 + index}/24", "gateway": f"{SUBNET}.1"},
    }


def phase_times(client: Any, keys: list[tuple[str, str]], put_at: float) -> dict[str, float]:
    """Seconds from the PUT until every node was Running and Ready, read from the times the
    agent recorded for each transition (so the benchmark's polling adds nothing)."""
    client.wait(keys, timeout_s=600)
    firsts: dict[str, list[float]] = {"Running": [], "Ready": []}
    for cluster, node in keys:
        events = client.http.get(f"/v1/clusters/{cluster}/nodes/{node}/events").json()["items"]
        for phase, times in firsts.items():
            stamp = next(e["at"] for e in events if e["phase"] == phase)
            at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            times.append(at.timestamp() - put_at)
    return {"running": max(firsts["Running"]), "ready": max(firsts["Ready"])}


def agent_round(agent: Agent, client: Any, count: int, cluster: str) -> dict[str, float]:
    keys = [(cluster, f"n{i}") for i in range(count)]
    put_at = time.time()
    for i, key in enumerate(keys):
        client.put_node(*key, node_spec(i))
    result = phase_times(client, keys, put_at)
    for key in keys:
        client.delete_node(*key)
    client.wait(keys, until="Gone", timeout_s=120)
    return result


async def baseline(image_dir: Path, work: Path, count: int) -> float:
    """Seconds until `count` nodes made directly (all at once) are running."""
    image = ImageCatalog(image_dir).get("lab")
    assert image is not None
    cluster = f"base{secrets.token_hex(2)}"
    conn = libvirt.open("qemu:///system")
    netlink = Netlink()
    bridge = BridgeWanted(
        names.bridge_name(BASE_VNI), cluster, BASE_VNI, f"{BASE_SUBNET}.1/24", 1450
    )

    async def one(index: int) -> None:
        node = f"n{index}"
        files = work / f"{cluster}-{node}"
        (files / "pki").mkdir(parents=True)
        mac = names.mac_address(cluster, node)
        address = f"{BASE_SUBNET}.{10 + index}/24"
        ctx = NodeContext(cluster, node, "master", node, node, mac, address, f"{BASE_SUBNET}.1",
                          1450, "1.31.2", (), f"http://{BASE_SUBNET}.1:1/x", "ab")  # fmt: skip
        build_config_drive(files / "cidata.iso", config_drive_files(ctx))
        await disk.ensure_overlay(files / "disk.qcow2", image.disk, 2, timeout_s=120.0)
        params = DomainParams(f"{cluster}-{node}", "qemu", 1, 256, image.kernel, image.initrd,
                              image.cmdline, files / "disk.qcow2", files / "cidata.iso",
                              files / "pki", "hostagent-pki", files / "console.log", bridge.name,
                              names.tap_name(cluster, node), mac, 1450,
                              DomainMeta(cluster, node, "bench", "x"))  # fmt: skip
        xml = domain_xml(params)
        await asyncio.to_thread(lambda: conn.defineXML(xml).create())

    started = time.monotonic()
    try:
        await asyncio.to_thread(netlink.reconcile, [bridge], host="bench")
        await asyncio.gather(*(one(i) for i in range(count)))
        return time.monotonic() - started
    finally:
        for i in range(count):
            try:
                dom = conn.lookupByName(f"{cluster}-n{i}")
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        await asyncio.to_thread(netlink.reconcile, [], host="bench")
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    build_lab_image(IMAGE_CACHE, progress=lambda _: None)
    state = Path(tempfile.mkdtemp(prefix="hostagent-bench-", dir="/var/tmp"))
    state.chmod(0o711)  # QEMU's user must reach the node files below it
    agent = Agent(state_dir=state / "agent", image_dir=IMAGE_CACHE)
    # 8 one-vCPU lab VMs on a 2-core machine: allow the overcommit for the benchmark.
    agent.write_config("[capacity]\nreserved_vcpus = 0\nvcpu_ratio = 8.0\n")
    one: list[dict[str, float]] = []
    eight: list[dict[str, float]] = []
    base: list[float] = []
    base8: list[float] = []
    try:
        client = agent.start()
        # Interleaved, so the agent and the baseline meet the same machine (page cache,
        # libvirtd's state, what the other cores are doing) round for round.
        for r in range(args.repeat):
            base.append(asyncio.run(baseline(IMAGE_CACHE, state / f"b{r}", 1)))
            one.append(agent_round(agent, client, 1, f"b1-{secrets.token_hex(2)}"))
            print(
                f"  round {r + 1}, 1 node: baseline {base[-1]:.3f}, agent {one[-1]['running']:.3f}"
            )
        for r in range(args.repeat):
            base8.append(asyncio.run(baseline(IMAGE_CACHE, state / f"c{r}", 8)))
            eight.append(agent_round(agent, client, 8, f"b8-{secrets.token_hex(2)}"))
            print(
                f"  round {r + 1}, 8 nodes: baseline {base8[-1]:.3f}, "
                f"agent {eight[-1]['running']:.3f}"
            )
    finally:
        cleanup(agent, [names.bridge_name(VNI), names.bridge_name(BASE_VNI)])
    med = statistics.median
    r1, y1 = med(x["running"] for x in one), med(x["ready"] for x in one)
    r8, y8 = med(x["running"] for x in eight), med(x["ready"] for x in eight)
    b, b8 = med(base), med(base8)
    print(f"median of {args.repeat} runs, seconds from PUT (baseline: from first step)")
    print(f"  baseline (direct libvirt-python), 1 node  to Running: {b:7.3f}")
    print(f"  baseline (direct libvirt-python), 8 nodes to Running: {b8:7.3f}")
    print(f"  agent, 1 node   to Running: {r1:7.3f}   to Ready: {y1:7.3f}")
    print(f"  agent, 8 nodes  to Running: {r8:7.3f}   to Ready: {y8:7.3f}")
    print(f"  agent/baseline to Running (1 node): {r1 / b:5.2f}  (target <= 1.10)")
    print(f"  agent/baseline to Running (8 nodes): {r8 / b8:5.2f}")
    print(f"  8 nodes / 1 node to Running, agent:    {r8 / r1:5.2f}  (target < 3)")
    print(f"  8 nodes / 1 node to Running, baseline: {b8 / b:5.2f}  (what this machine allows)")


if __name__ == "__main__":
    main()
