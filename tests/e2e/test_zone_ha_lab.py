"""The replicated zone in the lab (`lab up --zone-replicas 3`): 3 hosts with real agents and
lab VMs (TCG), 3 zone replicas on a 3-member etcd cluster over TLS.

A cluster of 3 masters and 2 workers is created; once some of its nodes are acknowledged
by their agents the leader replica is SIGKILLed, and the etcd leader as soon as another
replica leads (a few seconds later). The cluster still reaches Ready on the survivors,
with the VNI, node subnet, hosts and addresses it was acknowledged with, and a cluster
created afterwards gets allocations of its own (nothing lost, nothing doubled). Then one
host's agent is SIGKILLed: every surviving replica shows that host NotReady within its
lease's TTL and a stated slack.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import http
from hostagent.client import ApiError
from hostagent.lab import etcdlab
from hostagent.lab.haplan import ReplicaPlan
from hostagent.lab.zonelab import LabSettings, agent_pids, down, replica_pid, up
from hostagent.zone.client import ZoneClient, ZoneContext
from hostagent.zone.liveness import lease_ttl
from tests.conftest import IN_CI, require
from tests.e2e.agent import poll

pytestmark = pytest.mark.e2e

# Isolated from a person's lab and from tests/e2e/test_zone_lab.py (10.254.9.0/24).
ROOT = Path("/var/lib/hostagent-lab-ha-test")
SUBNET = "10.254.14.0/24"
HEARTBEAT_S = 2.0  # the lab's; the hosts' lease TTL is 3 x that
SLACK_S = 3.0  # etcd checks lease expiry every 500 ms, the watch, a poll of each replica
SPEC: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "image": "lab",
    "masters": {"count": 3, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
    "workers": {"count": 2, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}
SMALL: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "masters": {"count": 1, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}


class HaLab:
    def __init__(self, settings: LabSettings, context: ZoneContext) -> None:
        self.settings = settings
        self.zone_plan = settings.zone()
        self.context = context
        self.zone = ZoneClient(context)  # fails over between the replicas, as the CLI does

    def replica(self, replica: ReplicaPlan) -> ZoneClient:
        """A client of this one replica (no failover)."""
        return ZoneClient(ZoneContext(replica.url, self.context.token, self.context.ca_file))

    def view(self, replica: ReplicaPlan) -> dict[str, Any] | None:
        client = self.replica(replica)
        try:
            return client.zone()
        except (ApiError, http.TransportError):
            return None
        finally:
            client.close()

    def leader(self, replicas: list[ReplicaPlan]) -> ReplicaPlan | None:
        """The leader as every replica of replicas agrees it is (None while they do not)."""
        views = [self.view(r) for r in replicas]
        leaders = {v["leader"] if v else None for v in views}
        if len(leaders) != 1 or None in leaders:
            return None
        (leader,) = leaders
        return self.zone_plan.replica(str(leader))

    def nodes(self, cluster: str) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.zone.cluster(cluster)["status"]["nodes"]}

    def host_states(self, replica: ReplicaPlan) -> dict[str, str]:
        client = self.replica(replica)
        try:
            return {h["host"]: h["state"] for h in client.hosts()}
        except (ApiError, http.TransportError):
            return {}
        finally:
            client.close()


@pytest.fixture(scope="module")
def lab(lab_image_dir: Path) -> Iterator[HaLab]:
    require(os.path.exists("/usr/bin/unshare"), "needs util-linux unshare")
    require(shutil.which("etcd") is not None, "needs etcd (scripts/setup-host.sh)")
    settings = LabSettings(
        hosts=3,
        root=ROOT,
        subnet=SUBNET,
        bridge="halabh0",
        veth_prefix="halabhv",
        context_file=ROOT / "zone-client.json",
        image_dir=lab_image_dir,
        heartbeat_s=HEARTBEAT_S,
        zone_replicas=3,
    )
    down(settings, purge=True, progress=print)  # a crashed earlier run
    try:
        context = up(settings, progress=print)
        lab = HaLab(settings, context)
        yield lab
        lab.zone.close()
    finally:
        if not IN_CI:
            for replica in settings.zone().replicas:
                if replica.log.exists():
                    print(f"--- {replica.id} log (tail)\n" + replica.log.read_text()[-2000:])
        down(settings, purge=True, progress=print)


def test_leader_replica_and_etcd_leader_killed_mid_creation(lab: HaLab) -> None:
    replicas = list(lab.zone_plan.replicas)
    old = poll(lambda: lab.leader(replicas), 60, "one zone leader seen by every replica")
    acknowledged = lab.zone.put_cluster("demo", SPEC)["status"]
    placed = {n["name"]: (n["host"], n["address"]) for n in acknowledged["nodes"]}
    assert sorted(placed) == ["m1", "m2", "m3", "w1", "w2"]

    def some_delivered() -> tuple[str, list[str]] | None:
        status = lab.zone.cluster("demo")["status"]
        delivered = [n["name"] for n in status["nodes"] if n["phase"] != "Pending"]
        return (status["phase"], delivered) if delivered else None

    phase, delivered = poll(some_delivered, 120, "a node of demo acknowledged", 0.1)
    pid = replica_pid(old)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert phase != "Ready"  # mid-creation
    print(f"SIGKILLed leader replica {old.id} with {len(delivered)} of 5 nodes acknowledged")
    survivors = [r for r in replicas if r != old]
    killed = time.monotonic()

    def new_leader() -> ReplicaPlan | None:
        leader = lab.leader(survivors)
        return leader if leader != old else None

    new = poll(new_leader, 60, "a new zone leader", 0.2)
    print(f"{new.id} leads {time.monotonic() - killed:.1f} s after the SIGKILL")
    etcd_leader = etcdlab.leader(lab.zone_plan)
    assert etcd_leader is not None
    etcd_pid = etcdlab.pid(etcd_leader)
    assert etcd_pid is not None
    os.kill(etcd_pid, signal.SIGKILL)
    print(f"SIGKILLed etcd leader {etcd_leader.name}")

    poll(lambda: lab.zone.cluster("demo")["status"]["phase"] == "Ready", 600, "demo Ready", 1.0)
    status = lab.zone.cluster("demo")["status"]
    assert (status["vni"], status["node_subnet"]) == (
        acknowledged["vni"],
        acknowledged["node_subnet"],
    )
    assert {n["name"]: (n["host"], n["address"]) for n in status["nodes"]} == placed
    # Every survivor holds the same, and a new cluster gets allocations of its own.
    other = lab.zone.put_cluster("other", SMALL)["status"]
    for replica in survivors:
        client = lab.replica(replica)
        try:
            views = {c["name"]: c["status"] for c in client.clusters()}
        finally:
            client.close()
        assert sorted(views) == ["demo", "other"], replica.id
        assert views["demo"]["vni"] == acknowledged["vni"]
    assert other["vni"] != acknowledged["vni"]
    assert other["node_subnet"] != acknowledged["node_subnet"]
    addresses = [n["address"] for n in [*status["nodes"], *other["nodes"]]]
    assert len(set(addresses)) == len(addresses)


def test_killed_agent_is_not_ready_on_every_replica_within_the_lease_ttl(lab: HaLab) -> None:
    alive = [r for r in lab.zone_plan.replicas if replica_pid(r) is not None]
    assert alive
    for replica in alive:
        ready = f"h2 Ready on {replica.id}"
        poll(lambda r=replica: lab.host_states(r).get("h2") == "Ready", 60, ready)
    pids = agent_pids(lab.settings.plan().host("h2"))
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    ttl = lease_ttl(None, HEARTBEAT_S)
    took: dict[str, float] = {}
    pending = set(alive)
    while pending:
        for replica in sorted(pending, key=lambda r: r.id):
            if lab.host_states(replica).get("h2") == "NotReady":
                took[replica.id] = time.monotonic() - killed
                pending.discard(replica)
        assert time.monotonic() - killed < ttl + SLACK_S + 30, f"still Ready on {pending}"
        time.sleep(0.1)  # polling interval
    print(f"h2 NotReady after {took} (lease TTL {ttl} s)")
    assert max(took.values()) <= ttl + SLACK_S, took
