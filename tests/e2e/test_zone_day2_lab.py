"""Remediation on a real lab (2 hosts, lab VMs under TCG, the zone driving real agents):
a worker whose VM is destroyed until it crash-loops, and a worker whose guest stops
reporting (its VM paused), are both replaced by new workers within the configured time,
and the cluster's drain hook (a webhook server on the lab's bridge address) is called
before each removal, the events saying so; a hook that does not answer in time is given
up after its timeout. Its own lab root, bridge, subnet and veth
prefix; run it under `flock /tmp/lab.lock` (one lab on a machine at a time)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hostagent.lab import hosts as lab_hosts
from hostagent.lab.zonelab import LabSettings, down, up
from hostagent.zone.client import ZoneClient
from tests.conftest import IN_CI, require
from tests.e2e.agent import poll

pytestmark = pytest.mark.e2e

ROOT = Path("/var/lib/hostagent-lab-day2")
SUBNET = "10.254.15.0/24"
UNHEALTHY_FOR_S = 5.0
REPORT_TIMEOUT_S = 12.0
# The guests report every 5 s; the agent judges every second; the zone replaces a node
# unhealthy for 5 s, one per 5 s window (the cluster has 3 nodes: budget 1).
AGENT_EXTRA = f"""
[health]
report_interval_s = 5
report_timeout_s = {REPORT_TIMEOUT_S}
check_interval_s = 1.0
"""
ZONE_EXTRA = f"""
[rollout]
interval_s = 1.0

[remediation]
unhealthy_for_s = {UNHEALTHY_FOR_S}
window_s = 5.0
"""
POOL = {"vcpus": 1, "memory_mib": 256, "disk_gib": 1}
HOOK_TIMEOUT_S = 3.0
SLOW_S = 30.0


class Hook:
    """The drain hook: records each call (with the time) and answers 200, for the nodes
    in `slow` only after SLOW_S (past the hook's timeout)."""

    def __init__(self, address: str) -> None:
        self.calls: list[tuple[float, dict[str, Any]]] = []
        self.slow: set[str] = set()
        self.released = threading.Event()  # ends every slow answer at once (teardown)
        calls, slow, released = self.calls, self.slow, self.released

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                calls.append((time.monotonic(), body))
                if body["node"] in slow:
                    released.wait(SLOW_S)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.server.server_address[1]}/drain"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class Day2Lab:
    def __init__(self, settings: LabSettings, zone: ZoneClient, hook: Hook) -> None:
        self.settings, self.zone, self.hook = settings, zone, hook
        self.plan = settings.plan()

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.zone.cluster("day2")["status"]["nodes"]}

    def virsh(self, host: str, *argv: str) -> str:
        command = ["virsh", "-c", "qemu:///system", *argv]
        return lab_hosts.exec_in(self.plan.host(host), command, check=False).stdout

    def replaced(self, node: str, by: str) -> bool:
        nodes = self.nodes()
        return node not in nodes and nodes.get(by, {}).get("phase") == "Ready"


@pytest.fixture(scope="module")
def lab(lab_image_dir: Path) -> Iterator[Day2Lab]:
    require(os.path.exists("/usr/bin/unshare"), "needs util-linux unshare")
    settings = LabSettings(
        hosts=2,
        root=ROOT,
        subnet=SUBNET,
        bridge="halabd15",
        veth_prefix="halabdv",
        context_file=ROOT / "zone-client.json",
        agent_extra_toml=AGENT_EXTRA,
        zone_extra_toml=ZONE_EXTRA,
        image_dir=lab_image_dir,
    )
    down(settings, purge=True, progress=print)  # a crashed earlier run
    hook: Hook | None = None
    try:
        context = up(settings, progress=print)
        hook = Hook(str(settings.plan().gateway.ip))
        yield Day2Lab(settings, ZoneClient(context), hook)
    finally:
        if hook is not None:
            hook.close()
        for host in settings.plan().hosts:
            log = host.command_log
            if log.exists() and not IN_CI:
                print(f"--- {host.name} agent log (tail)\n" + log.read_text()[-3000:])
        down(settings, purge=True, progress=print)


def test_crash_looping_and_silent_workers_are_drained_and_replaced(lab: Day2Lab) -> None:
    spec = {
        "kubernetes_version": "1.31.2",
        "image": "lab",
        "masters": {"count": 1, **POOL},
        "workers": {"count": 2, **POOL},
        "drain_hook": {"url": lab.hook.url, "timeout_s": HOOK_TIMEOUT_S},
    }
    lab.zone.put_cluster("day2", spec)
    poll(lambda: lab.zone.cluster("day2")["status"]["phase"] == "Ready", 600, "day2 Ready", 1.0)

    # w1: its VM destroyed whenever it runs, until its agent calls it a crash loop.
    host = lab.nodes()["w1"]["host"]
    start = time.monotonic()

    def crash_looped() -> bool:
        if lab.replaced("w1", "w3"):
            return True
        if "running" in lab.virsh(host, "domstate", "day2-w1"):
            lab.virsh(host, "destroy", "day2-w1")
        return False

    poll(crash_looped, 300, "w1 replaced by a Ready w3", 1.0)
    crash_s = time.monotonic() - start

    # w2: its guest silenced (the VM paused: its domain still runs, nothing reports); its
    # drain hook does not answer in time, and the zone goes on after HOOK_TIMEOUT_S.
    lab.hook.slow.add("w2")
    host = lab.nodes()["w2"]["host"]
    lab.virsh(host, "suspend", "day2-w2")
    start = time.monotonic()
    poll(lambda: lab.replaced("w2", "w4"), 300, "w2 replaced by a Ready w4", 1.0)
    silent_s = time.monotonic() - start
    print(f"replaced: crash-looping worker in {crash_s:.0f} s, silent one in {silent_s:.0f} s")
    # The silent guest: the report timeout, the zone's unhealthy_for_s, then the drain,
    # the new worker's boot and the old one's removal, within a minute and a half.
    assert silent_s < REPORT_TIMEOUT_S + UNHEALTHY_FOR_S + 90

    called = [body for _, body in lab.hook.calls]
    assert [b["node"] for b in called][:2] == ["w1", "w2"]
    assert all(b["cluster"] == "day2" and b["role"] == "worker" for b in called)
    events = lab.zone.cluster("day2")["status"]["events"][::-1]  # oldest first
    events = [e for e in events if e["node"]]  # not the cluster's own (created)
    kinds = [(e["kind"], e["node"]) for e in events]
    assert kinds == [("drain", "w1"), ("remediation", "w1"), ("drain", "w2"), ("remediation", "w2")]
    assert events[0]["message"].startswith("drain hook answered 200")
    assert events[2]["message"].startswith(f"drain hook timed out after {HOOK_TIMEOUT_S:.0f} s")
    assert "crash-loop" in events[1]["message"] or "failed" in events[1]["message"]
    assert "guest-not-reporting" in events[3]["message"]
    lab.zone.delete_cluster("day2")
    lab.zone.wait("day2", "Gone", timeout_s=300)
