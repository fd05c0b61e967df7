"""A real etcd quorum in the guests and the control-plane VIP, on a lab of 3 hosts.

The zone places a cluster of 3 lab-cloudinit masters (Debian 12 guests under TCG) with
`etcd_mode: systemd` on 3 hosts: each master runs Debian's etcd as a unit with the
cluster's own certificates (issued by the zone's CA for the cluster) over the cluster's
VXLAN network, and keepalived holds the cluster's VIP (the .5 of its node subnet).
From inside a lab host (its namespaces: the cluster's bridge there carries the host's
gateway address), etcdctl with the cluster's healthcheck-client certificate sees 3
healthy members, writes a key through the VIP, and reads it back through the VIP after
the VIP's holder was destroyed, the VIP having moved to another master.

Run under `flock /tmp/lab.lock`: one lab at a time on a machine.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.client import ApiError
from hostagent.lab import hosts as lab_hosts
from hostagent.lab.zonelab import LabSettings, down, up
from hostagent.zone.client import ZoneClient
from tests.conftest import IN_CI, require
from tests.e2e.agent import poll

# The first test waits for 3 TCG guests to boot (see READY_TIMEOUT_S).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

# Its own lab: isolated from a person's lab (halab0) and from test_zone_lab's (halabt9).
ROOT = Path("/var/lib/hostagent-lab-etcd-test")
SUBNET = "10.254.19.0/24"
CLUSTER = "etcd"
SPEC: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "image": "lab-cloudinit",
    "etcd_mode": "systemd",
    "masters": {"count": 3, "vcpus": 1, "memory_mib": 512, "disk_gib": 3},
}
READY_TIMEOUT_S = 1200  # 3 guests booting at once under TCG on a shared 2-core machine
FAILOVER_TIMEOUT_S = 120


class Lab:
    def __init__(self, settings: LabSettings, zone: ZoneClient) -> None:
        self.settings = settings
        self.plan = settings.plan()
        self.zone = zone

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
        return self.zone.cluster(CLUSTER)

    def etcdctl(self, host: str, node: str, endpoints: list[str], *args: str) -> str:
        """etcdctl inside lab host `host`, with the healthcheck-client certificate the
        agent of `host` placed for its master `node`."""
        pki = self.plan.host(host).state_dir / "nodes" / CLUSTER / node / "pki" / "etcd"
        argv = [
            "etcdctl",
            f"--endpoints={','.join(endpoints)}",
            f"--cacert={pki / 'ca.crt'}",
            f"--cert={pki / 'healthcheck-client.crt'}",
            f"--key={pki / 'healthcheck-client.key'}",
            "--dial-timeout=3s",
            "--command-timeout=10s",
            *args,
        ]
        result = lab_hosts.exec_in(self.plan.host(host), argv, check=False, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {result.stderr.strip()[-500:]}")
        return result.stdout

    def holder(self, host: str, node: str, vip: str) -> str:
        """The master answering on the VIP: the member etcd names in its reply."""
        status = json.loads(
            self.etcdctl(host, node, [url(vip)], "endpoint", "status", "-w", "json")
        )
        member_id = status[0]["Status"]["header"]["member_id"]
        members = json.loads(self.etcdctl(host, node, [url(vip)], "member", "list", "-w", "json"))
        names = {m["ID"]: m["name"] for m in members["members"]}
        name: str = names[member_id]
        return name


def url(address: str) -> str:
    return f"https://{address}:2379"


def attempt(check: Any) -> Any:
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
    assert lab_image_dir == cloudinit_image_dir  # both images where the agents look
    settings = LabSettings(
        hosts=3,
        root=ROOT,
        subnet=SUBNET,
        bridge="haetcd0",
        veth_prefix="haetcv",
        context_file=ROOT / "zone-client.json",
        image_dir=cloudinit_image_dir,
    )
    down(settings, purge=True, progress=print)  # a crashed earlier run
    try:
        zone = ZoneClient(up(settings, progress=print))
        try:
            yield Lab(settings, zone)
        finally:
            zone.close()
    finally:
        for host in settings.plan().hosts:
            log = host.command_log
            if log.exists() and not IN_CI:
                print(f"--- {host.name} agent log (tail)\n" + log.read_text()[-3000:])
            for console in (host.state_dir / "nodes" / CLUSTER).glob("*/console.log"):
                print(f"--- {console}\n" + console.read_text(errors="replace")[-3000:])
        down(settings, purge=True, progress=print)


def masters(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in view["status"]["nodes"] if n["role"] == "master"}


def test_three_masters_form_one_etcd_cluster_over_vxlan(lab: Lab) -> None:
    view = lab.ensure_cluster()
    nodes = masters(view)
    assert {n["host"] for n in nodes.values()} == {"h1", "h2", "h3"}
    endpoints = [url(n["address"]) for n in nodes.values()]

    def healthy() -> list[dict[str, Any]] | None:
        out = lab.etcdctl("h1", "m1", endpoints, "endpoint", "health", "--cluster", "-w", "json")
        health: list[dict[str, Any]] = json.loads(out)
        return health if len(health) == 3 and all(h["health"] for h in health) else None

    started = time.monotonic()
    health = poll(lambda: attempt(healthy), 600, "3 healthy etcd members", 5.0)
    print(f"etcd healthy {time.monotonic() - started:.0f} s after the cluster was Ready")
    assert sorted(h["endpoint"] for h in health) == sorted(endpoints)
    members = json.loads(lab.etcdctl("h2", "m2", endpoints, "member", "list", "-w", "json"))
    assert sorted((m["name"], m["peerURLs"][0]) for m in members["members"]) == sorted(
        (name, f"https://{n['address']}:2380") for name, n in nodes.items()
    )


def test_the_vip_is_the_endpoint_and_answers(lab: Lab) -> None:
    view = lab.ensure_cluster()
    status = view["status"]
    vip = status["vip"]
    assert vip == status["node_subnet"].replace(".0/24", ".5")
    assert status["api_endpoint"] == f"{vip}:6443"
    holder = poll(lambda: attempt(lambda: lab.holder("h2", "m2", vip)), 600, "the VIP", 5.0)
    assert holder in masters(view)
    # The VIP is in the certificate etcd answers with: etcdctl checks it.
    lab.etcdctl("h3", "m3", [url(vip)], "put", "/issue15/through-vip", "written")
    out = lab.etcdctl("h1", "m1", [url(vip)], "get", "/issue15/through-vip", "--print-value-only")
    assert out.strip() == "written"


def test_the_vip_moves_when_its_holder_is_destroyed(lab: Lab) -> None:
    view = lab.ensure_cluster()
    vip = view["status"]["vip"]
    nodes = masters(view)
    before = poll(lambda: attempt(lambda: lab.holder("h1", "m1", vip)), 600, "the VIP", 5.0)
    lab.etcdctl("h1", "m1", [url(vip)], "put", "/issue15/before-failover", "kept")
    victim_host = nodes[before]["host"]
    # Ask etcd from a host whose master stays up, with that master's certificate.
    asker = next(name for name in sorted(nodes) if name != before)
    asker_host = nodes[asker]["host"]
    lab_hosts.exec_in(lab.plan.host(victim_host), ["virsh", "destroy", f"{CLUSTER}-{before}"])
    destroyed = time.monotonic()

    def moved() -> str | None:
        holder = lab.holder(asker_host, asker, vip)
        return holder if holder != before else None

    after = poll(lambda: attempt(moved), FAILOVER_TIMEOUT_S, "the VIP on another master", 1.0)
    print(f"VIP moved from {before} to {after} {time.monotonic() - destroyed:.1f} s after destroy")
    out = lab.etcdctl(
        asker_host, asker, [url(vip)], "get", "/issue15/before-failover", "--print-value-only"
    )
    assert out.strip() == "kept"
    lab.etcdctl(asker_host, asker, [url(vip)], "put", "/issue15/after-failover", "written")
