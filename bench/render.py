"""Rendering cost per node: user-data, meta-data, network-config and the config drive.

A 3-master, 20-worker cluster (1.31, masters with etcd disks, one operator extension per
role), each node rendered (cloudconfig.render.render_node) and its cidata ISO written
(cloudconfig.configdrive.build_config_drive) into a temporary directory. The first
round runs with cold caches (template compilation, Calico's manifests); the rounds
after it are what a running agent pays. No root, no libvirt.
Run:  .venv/bin/python -m bench.render [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from cloudconfig import render
from cloudconfig.configdrive import build_config_drive
from cloudconfig.context import Extensions, ExtraFile, ExtraUnit, MasterPeer, NodeContext

MASTERS, WORKERS = 3, 20
TARGET_MS = 20.0
EXTENSIONS = {
    "master": Extensions(
        files=(ExtraFile("/etc/audit/rules.d/k8s.rules", "-w /etc/kubernetes -p wa\n"),),
        commands=("echo master ready",),
    ),
    "worker": Extensions(
        units=(ExtraUnit("site-agent.service", "[Service]\nExecStart=/bin/true\n"),),
    ),
}


def cluster() -> list[NodeContext]:
    masters = tuple(MasterPeer(f"m{i}", f"10.42.0.{10 + i}") for i in range(MASTERS))
    nodes = []
    for i in range(MASTERS + WORKERS):
        role = "master" if i < MASTERS else "worker"
        name = f"m{i}" if role == "master" else f"w{i - MASTERS}"
        nodes.append(
            NodeContext(
                cluster="bench",
                node=name,
                role=role,
                hostname=name,
                instance_id=f"bench-{name}-0123456789abcdef",
                mac=f"52:54:00:00:00:{i:02x}",
                address=f"10.42.0.{10 + i}/24",
                gateway="10.42.0.1",
                mtu=1450,
                kubernetes_version="1.31.2",
                ssh_authorized_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIbench ops@example",),
                phone_home_url=f"http://10.42.0.1:8472/v1/phone-home/bench/{name}",
                phone_home_token="0123456789abcdef" * 4,
                masters=masters,
                etcd_disk="/dev/disk/by-id/virtio-etcd" if role == "master" else None,
                extensions=EXTENSIONS[role],
            )
        )
    return nodes


def one_node(ctx: NodeContext, work: Path) -> tuple[float, float, int]:
    """(render ms, drive ms, user-data bytes) for one node."""
    started = time.perf_counter()
    files = {name: text.encode() for name, text in render.render_node(ctx).items()}
    rendered = time.perf_counter()
    build_config_drive(work / f"{ctx.node}.iso", files)
    done = time.perf_counter()
    return (rendered - started) * 1000, (done - rendered) * 1000, len(files["user-data"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="warm rounds after the cold one")
    args = parser.parse_args()
    nodes = cluster()
    with tempfile.TemporaryDirectory(prefix="hostagent-render-") as tmp:
        work = Path(tmp)
        cold_started = time.perf_counter()
        cold = [one_node(ctx, work) for ctx in nodes]
        cold_total = (time.perf_counter() - cold_started) * 1000
        rounds: list[list[tuple[float, float, int]]] = []
        totals = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            rounds.append([one_node(ctx, work) for ctx in nodes])
            totals.append((time.perf_counter() - started) * 1000)
    print(f"{MASTERS} masters + {WORKERS} workers, Kubernetes 1.31, {args.rounds} warm rounds")
    print(f"{'node':6} {'user-data':>10} {'cold ms':>8} {'render ms':>10} {'drive ms':>9} "
          f"{'total ms':>9}")  # fmt: skip
    per_node = []
    for i, ctx in enumerate(nodes):
        render_ms = statistics.median(r[i][0] for r in rounds)
        drive_ms = statistics.median(r[i][1] for r in rounds)
        per_node.append(render_ms + drive_ms)
        cold_ms = cold[i][0] + cold[i][1]
        print(f"{ctx.node:6} {cold[i][2]:>8} B {cold_ms:8.2f} {render_ms:10.2f} {drive_ms:9.2f} "
              f"{render_ms + drive_ms:9.2f}")  # fmt: skip
    worst = max(per_node)
    warm_total = statistics.median(totals)
    print(f"cluster total: cold {cold_total:.1f} ms, warm median {warm_total:.1f} ms")
    print(f"per node (warm, median of rounds): mean {statistics.mean(per_node):.2f} ms, "
          f"max {worst:.2f} ms; target < {TARGET_MS:.0f} ms: "
          f"{'met' if worst < TARGET_MS else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
