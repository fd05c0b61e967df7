"""A real etcd quorum in the guests, the control-plane VIP, and a rolling upgrade of the
masters that keeps both, under a replicated zone whose leader dies mid-roll.

A lab of 3 hosts with 3 zone replicas on a 3-member etcd (LabSettings(zone_replicas=3)).
The zone places a cluster of 3 lab-cloudinit masters (Debian 12 guests under TCG) with
`etcd_mode: systemd`, created at 1.30, on 3 hosts: each master runs Debian's etcd as a
unit with the cluster's own certificates over the cluster's VXLAN network, and
keepalived holds the cluster's VIP (the .5 of its node subnet). From inside a lab host
(its namespaces: the cluster's bridge there carries the host's gateway address),
etcdctl with the cluster's healthcheck-client certificate sees 3 healthy members and
writes a key.

Then the cluster is upgraded to 1.31 (the zone's PUT): the masters are re-created in
place one at a time, each only once the others' etcd members reported healthy (the
guests' health reports, observe.etcd_healthy). During the roll two probes run, each
about once a second from a lab host:
- quorum: a linearizable get of the key from a member (each in turn until one answers,
  2 s to dial, 5 s to answer: an election in between is waited for). Every sample must
  answer: quorum is never lost.
- the VIP: a get of the key through https://VIP:2379 (same timeouts). Tolerance: the VIP
  is gone while its holder shuts down until keepalived on another master takes it
  (VRRP), so single samples may fail; the longest time without an answer (from one
  answered sample to the next) must stay under VIP_GAP_S. Its reply's member names the
  VIP's holder, which must change at least once (every master is replaced, the first
  holder too).
Once the first master is back at 1.31, the zone's leader replica is SIGKILLed: another
replica leads and the roll completes. Afterwards every master runs 1.31 (the zone's view
and the agents' node specs), the rollout is done, every member reported healthy to its
agent, and the key reads back.

Run under `flock /tmp/lab.lock`: one lab at a time on a machine.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import http
from hostagent.client import ApiError, Client
from hostagent.lab import hosts as lab_hosts
from hostagent.lab.errors import LabError
from hostagent.lab.haplan import ReplicaPlan
from hostagent.lab.zonelab import AGENT_PORT, LabSettings, down, replica_pid, up
from hostagent.zone.client import ZoneClient, ZoneContext
from hostagent.zone.observe import epoch
from tests.conftest import IN_CI, require
from tests.e2e.agent import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(4800)]

# Its own lab: isolated from a person's lab (halab0) and from the other lab tests.
ROOT = Path("/var/lib/hostagent-lab-etcd-test")
SUBNET = "10.254.19.0/24"
CLUSTER = "etcd"
KEY, VALUE = "/issue15/before-the-roll", "kept"
FROM, TO = "1.30.6", "1.31.2"
SPEC: dict[str, Any] = {
    "kubernetes_version": FROM,
    "image": "lab-cloudinit",
    "etcd_mode": "systemd",
    "masters": {"count": 3, "vcpus": 1, "memory_mib": 512, "disk_gib": 3},
    "rollout": {"ready_timeout_s": 1200.0},  # a TCG boot on a shared 2-core machine
}
# Guests report every 10 s (their etcd member's health too); the Roller looks every second.
AGENT_EXTRA = """
[health]
report_interval_s = 10
"""
ZONE_EXTRA = """
[rollout]
interval_s = 1.0
"""
READY_TIMEOUT_S = 1200  # 3 guests booting at once under TCG on a shared 2-core machine
ROLL_TIMEOUT_S = 3600  # 3 masters one after another, each a TCG boot
VIP_GAP_S = 30.0  # VRRP failover (~7 s measured) plus a probe's own timeouts
PROBE_EVERY_S = 1.0
DIAL, COMMAND = "--dial-timeout=2s", "--command-timeout=5s"
PROBE_PKI = ROOT / "probe-pki"  # the healthcheck-client certificate the probes use


@dataclass
class Sample:
    started: float
    ended: float
    ok: bool
    detail: str


@dataclass
class Probe:
    """check() about every PROBE_EVERY_S in a thread of its own until stop(): each call's
    (start, end, ok, detail). check returns the detail, or raises AssertionError."""

    name: str
    check: Callable[[], str]
    samples: list[Sample] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                sample = Sample(started, time.monotonic(), True, self.check())
            except (AssertionError, LabError, OSError, subprocess.SubprocessError) as exc:
                sample = Sample(started, time.monotonic(), False, str(exc)[-300:])
            sample.ended = time.monotonic()
            self.samples.append(sample)
            self.stopped.wait(max(0.0, PROBE_EVERY_S - (sample.ended - started)))  # pacing

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=60)

    def longest_gap(self) -> float:
        """The longest time without an answer: between the ends of two answered samples
        (the first answered sample opens the span)."""
        answered = [s.ended for s in self.samples if s.ok]
        return max((b - a for a, b in itertools.pairwise(answered)), default=0.0)


class Lab:
    def __init__(self, settings: LabSettings, context: ZoneContext) -> None:
        self.settings = settings
        self.plan = settings.plan()
        self.zone_plan = settings.zone()
        self.context = context
        self.zone = ZoneClient(context)  # fails over between the replicas, as the CLI does
        self.pki = PROBE_PKI  # a copy: a master's own directory goes when it does

    def ensure_cluster(self) -> dict[str, Any]:
        """The cluster Ready, created when missing: its zone view."""
        try:
            self.zone.cluster(CLUSTER)
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.zone.put_cluster(CLUSTER, SPEC)
        started = time.monotonic()
        poll(
            lambda: self.zone.cluster(CLUSTER)["status"]["phase"] == "Ready",
            READY_TIMEOUT_S,
            f"cluster {CLUSTER} Ready",
            2.0,
        )
        print(f"cluster {CLUSTER} Ready after {time.monotonic() - started:.0f} s of waiting")
        view = self.zone.cluster(CLUSTER)
        if not self.pki.exists():
            source = self.plan.host("h1").state_dir / "nodes" / CLUSTER / "m1" / "pki" / "etcd"
            self.pki.mkdir(mode=0o700)
            for name in ("ca.crt", "healthcheck-client.crt", "healthcheck-client.key"):
                shutil.copy2(source / name, self.pki / name)
        return view

    def etcdctl(self, host: str, endpoints: list[str], *args: str) -> str:
        """etcdctl inside lab host `host`, with the cluster's healthcheck-client
        certificate."""
        argv = [
            "etcdctl",
            f"--endpoints={','.join(endpoints)}",
            f"--cacert={self.pki / 'ca.crt'}",
            f"--cert={self.pki / 'healthcheck-client.crt'}",
            f"--key={self.pki / 'healthcheck-client.key'}",
            DIAL,
            COMMAND,
            *args,
        ]
        result = lab_hosts.exec_in(self.plan.host(host), argv, check=False, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {result.stderr.strip()[-500:]}")
        return result.stdout

    def get(self, host: str, endpoint: str) -> tuple[str, int]:
        """A linearizable get of KEY from one endpoint: (value, the answering member's ID)."""
        reply = json.loads(self.etcdctl(host, [endpoint], "get", KEY, "-w", "json"))
        kvs = reply.get("kvs") or [{"value": ""}]
        return base64.b64decode(kvs[0]["value"]).decode(), int(reply["header"]["member_id"])

    def view(self, replica: ReplicaPlan) -> dict[str, Any] | None:
        client = ZoneClient(ZoneContext(replica.url, self.context.token, self.context.ca_file))
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

    def agent(self, host: str) -> Client:
        plan = self.plan.host(host)
        token = (plan.state_dir / "api-token").read_text().strip()
        tls = ssl.create_default_context(cafile=str(self.settings.root / "ca" / "ca.crt"))
        return Client(f"https://{plan.address.ip}:{AGENT_PORT}", token, tls=tls)

    def agent_node(self, host: str, node: str) -> dict[str, Any]:
        client = self.agent(host)
        try:
            return client.get_node(CLUSTER, node)
        finally:
            client.close()


def url(address: str) -> str:
    return f"https://{address}:2379"


def attempt(check: Callable[[], Any]) -> Any:
    """check(), or None when etcdctl failed (for poll)."""
    try:
        return check()
    except AssertionError as exc:
        print(f"  not yet: {str(exc)[:200]}")
        return None


@pytest.fixture(scope="module")
def lab(lab_image_dir: Path, cloudinit_image_dir: Path) -> Iterator[Lab]:
    require(os.path.exists("/usr/bin/unshare"), "needs util-linux unshare")
    require(shutil.which("etcdctl") is not None, "needs etcdctl (Debian's etcd-client)")
    require(shutil.which("etcd") is not None, "needs etcd (scripts/setup-host.sh)")
    assert lab_image_dir == cloudinit_image_dir  # both images where the agents look
    settings = LabSettings(
        hosts=3,
        root=ROOT,
        subnet=SUBNET,
        bridge="haetcd0",
        veth_prefix="haetcv",
        context_file=ROOT / "zone-client.json",
        agent_extra_toml=AGENT_EXTRA,
        zone_extra_toml=ZONE_EXTRA,
        image_dir=cloudinit_image_dir,
        zone_replicas=3,
    )
    down(settings, purge=True, progress=print)  # a crashed earlier run
    lab: Lab | None = None
    try:
        lab = Lab(settings, up(settings, progress=print))
        yield lab
    finally:
        if lab is not None:
            lab.zone.close()
        for host in settings.plan().hosts:
            log = host.command_log
            if log.exists() and not IN_CI:
                print(f"--- {host.name} agent log (tail)\n" + log.read_text()[-3000:])
            for console in (host.state_dir / "nodes" / CLUSTER).glob("*/console.log"):
                print(f"--- {console}\n" + console.read_text(errors="replace")[-3000:])
        if not IN_CI:
            for replica in settings.zone().replicas:
                if replica.log.exists():
                    print(f"--- {replica.id} log (tail)\n" + replica.log.read_text()[-2000:])
        shutil.rmtree(PROBE_PKI, ignore_errors=True)
        down(settings, purge=True, progress=print)


def masters(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in view["status"]["nodes"] if n["role"] == "master"}


def test_three_masters_form_one_etcd_cluster_over_vxlan(lab: Lab) -> None:
    view = lab.ensure_cluster()
    nodes = masters(view)
    assert {n["host"] for n in nodes.values()} == {"h1", "h2", "h3"}
    endpoints = [url(n["address"]) for n in nodes.values()]

    def healthy() -> list[dict[str, Any]] | None:
        out = lab.etcdctl("h1", endpoints, "endpoint", "health", "--cluster", "-w", "json")
        health: list[dict[str, Any]] = json.loads(out)
        return health if len(health) == 3 and all(h["health"] for h in health) else None

    started = time.monotonic()
    health = poll(lambda: attempt(healthy), 600, "3 healthy etcd members", 5.0)
    print(f"etcd healthy {time.monotonic() - started:.0f} s after the cluster was Ready")
    assert sorted(h["endpoint"] for h in health) == sorted(endpoints)
    members = json.loads(lab.etcdctl("h2", endpoints, "member", "list", "-w", "json"))
    assert sorted((m["name"], m["peerURLs"][0]) for m in members["members"]) == sorted(
        (name, f"https://{n['address']}:2380") for name, n in nodes.items()
    )
    status = view["status"]
    vip = status["vip"]
    assert vip == status["node_subnet"].replace(".0/24", ".5")
    assert status["api_endpoint"] == f"{vip}:6443"
    # The VIP is in the certificate etcd answers with: etcdctl checks it.
    poll(lambda: attempt(lambda: lab.etcdctl("h3", [url(vip)], "put", KEY, VALUE)), 300, "put")
    assert lab.get("h1", url(vip))[0] == VALUE


def test_rolling_upgrade_keeps_quorum_and_the_vip_through_a_zone_leader_kill(lab: Lab) -> None:
    view = lab.ensure_cluster()
    nodes = masters(view)
    vip = view["status"]["vip"]
    endpoints = [url(n["address"]) for n in nodes.values()]
    poll(lambda: attempt(lambda: lab.get("h1", url(vip))[0] == VALUE or None), 300, "the key")
    members = json.loads(lab.etcdctl("h2", endpoints, "member", "list", "-w", "json"))
    names = {int(m["ID"]): m["name"] for m in members["members"]}
    order = list(endpoints)

    def quorum() -> str:
        """A linearizable get from the first member that answers (the last one that did
        is asked first)."""
        errors = []
        for endpoint in list(order):
            try:
                value, member = lab.get("h1", endpoint)
            except AssertionError as exc:
                errors.append(str(exc)[-120:])
                continue
            order.remove(endpoint)
            order.insert(0, endpoint)
            assert value == VALUE, f"{KEY} = {value!r}"
            return names.get(member, str(member))
        raise AssertionError("; ".join(errors))

    def through_vip() -> str:
        value, member = lab.get("h2", url(vip))
        assert value == VALUE, f"{KEY} = {value!r}"
        return names.get(member, str(member))

    probes = [Probe("quorum", quorum), Probe("vip", through_vip)]
    replicas = list(lab.zone_plan.replicas)
    leader = poll(lambda: lab.leader(replicas), 60, "one zone leader seen by every replica")
    for probe in probes:
        probe.start()
    started = time.monotonic()
    killed_at: float | None = None
    new_leader: ReplicaPlan | None = None
    try:
        lab.zone.put_cluster(CLUSTER, {**SPEC, "kubernetes_version": TO})
        print(f"upgrade to {TO} put; zone leader {leader.id}")
        last = ""
        while True:
            try:
                status = lab.zone.cluster(CLUSTER)["status"]
            except http.TransportError as exc:  # every replica it tried was down
                print(f"[{time.monotonic() - started:6.1f}s] zone: {exc}")
                time.sleep(1.0)  # polling interval
                continue
            now = masters({"status": status})
            line = f"{status['phase']}: {status['message']} " + ", ".join(
                f"{n}={v['phase']}@{v['kubernetes_version']}" for n, v in sorted(now.items())
            )
            if line != last:
                print(f"[{time.monotonic() - started:6.1f}s] {line}")
                last = line
            rollout = status.get("rollout")
            assert rollout is None or rollout["state"] != "Stopped", rollout
            # Progress counts the nodes Ready at the new spec as their agents report
            # them (a node's phase alone is its old incarnation's until re-created).
            upgraded = int(rollout["progress"].split("/")[0]) if rollout else len(now)
            if killed_at is None and upgraded >= 1:
                pid = replica_pid(leader)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                print(f"SIGKILLed zone leader {leader.id}: {rollout and rollout['progress']}")
            if killed_at is not None and new_leader is None:
                survivors = [r for r in replicas if r != leader]
                found = lab.leader(survivors)
                if found is not None and found != leader:
                    new_leader = found
                    print(f"{found.id} leads {time.monotonic() - killed_at:.1f} s after")
            done = all(v["kubernetes_version"] == TO for v in now.values())
            if done and rollout is None and status["phase"] == "Ready":
                break
            assert time.monotonic() - started < ROLL_TIMEOUT_S, f"roll not done: {line}"
            time.sleep(1.0)  # polling interval
    finally:
        for probe in probes:
            probe.stop()
    rolled_s = time.monotonic() - started
    quorum_probe, vip_probe = probes
    holders = [s.detail for s in vip_probe.samples if s.ok]
    moves = sum(1 for a, b in itertools.pairwise(holders) if a != b)
    failed = [s for s in vip_probe.samples if not s.ok]
    print(
        f"rolled in {rolled_s:.0f} s; quorum probe: {len(quorum_probe.samples)} samples, "
        f"{sum(not s.ok for s in quorum_probe.samples)} failed; VIP probe: "
        f"{len(vip_probe.samples)} samples, {len(failed)} failed, longest gap "
        f"{vip_probe.longest_gap():.1f} s, holders {dedupe(holders)} ({moves} moves)"
    )
    for sample in [*[s for s in quorum_probe.samples if not s.ok], *failed][:10]:
        print(f"  failed at {sample.started - started:6.1f}s: {sample.detail[-200:]}")

    assert killed_at is not None, "the first master never came back: the leader was not killed"
    assert new_leader is not None and new_leader != leader
    assert quorum_probe.samples and all(s.ok for s in quorum_probe.samples), "quorum was lost"
    assert vip_probe.samples[0].ok and vip_probe.samples[-1].ok
    assert vip_probe.longest_gap() < VIP_GAP_S
    assert moves >= 1, f"the VIP never moved: {dedupe(holders)}"
    for name, node in masters(lab.zone.cluster(CLUSTER)).items():
        assert (node["kubernetes_version"], node["phase"]) == (TO, "Ready"), name
        spec = lab.agent_node(node["host"], name)["spec"]
        assert spec["kubernetes_version"] == TO, name

    def members_healthy() -> bool:
        """Every master's guest told its agent its member is healthy, since re-created."""
        for name, node in masters(lab.zone.cluster(CLUSTER)).items():
            etcd = lab.agent_node(node["host"], name)["status"]["health"]["etcd"]
            fresh = etcd and epoch(etcd["checked_at"]) >= epoch(node["created_at"])
            if not (fresh and etcd["healthy"]):
                return False
        return True

    poll(members_healthy, 120, "every member reported healthy to its agent", 2.0)
    health = json.loads(
        lab.etcdctl("h3", endpoints, "endpoint", "health", "--cluster", "-w", "json")
    )
    assert len(health) == 3 and all(h["health"] for h in health), health
    assert lab.get("h3", url(vip))[0] == VALUE


def dedupe(items: list[str]) -> list[str]:
    """items without consecutive repeats."""
    return [b for a, b in zip([None, *items], items, strict=False) if a != b]
