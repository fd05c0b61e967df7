"""Images, consoles and events across a real lab (3 hosts, each its own namespaces,
libvirtd and agent; lab VMs under TCG; the zone driving the agents over mutual TLS).

An HTTP server on the lab bridge's address serves the lab image's files. An image pushed
to the zone's catalogue (`hostagent image push`) reaches the 3 hosts its cluster is
placed on, verified at its digest, and the nodes reach Ready; a corrupted copy is refused
(the host's image Failed with the digest message, in the zone's cluster view, no node
started); an image in use cannot be deleted; once its cluster is gone every agent
collects it. A node whose kernel panics at boot goes Failed with the console's last
lines, and its console is served by the agent and relayed by the zone within bounds.
A node's events and its cluster's follow its creation, a crash restart and its deletion.

Its own lab root, bridge, subnet and veth prefix; run it under `flock /tmp/lab.lock`
(one lab on a machine at a time), with PYTHONPATH set to the checkout under test."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from hostagent import console
from hostagent.client import ApiError
from hostagent.lab import hosts as lab_hosts
from hostagent.lab.plan import HostPlan
from hostagent.lab.zonelab import LabSettings, down, up
from hostagent.zone.client import ZoneClient
from tests.conftest import IN_CI, require
from tests.e2e.agent import poll

pytestmark = pytest.mark.e2e

ROOT = Path("/var/lib/hostagent-lab-img-test")
SUBNET = "10.254.16.0/24"
REPO = Path(__file__).resolve().parents[2]
HOSTS = ("h1", "h2", "h3")
# A lab guest phones home within ~30 s under TCG; one later than this still turns Ready.
BOOT_TIMEOUT_S = 45.0
UNUSED_TTL_S = 5.0
GC_INTERVAL_S = 1.0
AGENT_EXTRA = f"""
[health]
check_interval_s = 1.0
boot_timeout_s = {BOOT_TIMEOUT_S}

[images]
unused_ttl_s = {UNUSED_TTL_S}
gc_interval_s = {GC_INTERVAL_S}
"""
# The panicking node stays Failed: nothing replaces it while the test reads it.
ZONE_EXTRA = """
[remediation]
enabled = false
"""
POOL = {"vcpus": 1, "memory_mib": 256, "disk_gib": 1}
# No init in the initramfs and no root disk: the kernel panics and (panic=0) stays there.
PANIC = "console=ttyS0 rdinit=/no-such-init root=/dev/no-such-disk panic=0"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """Serves files from memory by path on the lab bridge's address (the agents reach it
    from their hosts' namespaces through the bridge)."""

    def __init__(self, address: str) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.base = f"http://{address}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ImagesLab:
    def __init__(self, settings: LabSettings, zone: ZoneClient, files: FileServer) -> None:
        self.settings, self.zone, self.files = settings, zone, files
        self.plan = settings.plan()

    def host(self, name: str) -> HostPlan:
        return self.plan.host(name)

    def agent(self, name: str) -> httpx.Client:
        host = self.host(name)
        token = (host.state_dir / "api-token").read_text().strip()
        return httpx.Client(
            base_url=f"https://{host.address.ip}:8470",
            headers={"Authorization": f"Bearer {token}"},
            verify=ssl.create_default_context(cafile=self.settings.root / "ca" / "ca.crt"),
            timeout=30,
        )

    def agent_call(self, host: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.agent(host) as client:
            return client.request(method, path, **kwargs)

    def virsh(self, host: str, *argv: str) -> str:
        command = ["virsh", "-c", "qemu:///system", *argv]
        return lab_hosts.exec_in(self.host(host), command, check=False).stdout

    def nodes(self, cluster: str) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.zone.cluster(cluster)["status"]["nodes"]}

    def wait_phase(self, cluster: str, phase: str, timeout_s: float = 600.0) -> None:
        def reached() -> bool:
            return bool(self.zone.cluster(cluster)["status"]["phase"] == phase)

        poll(reached, timeout_s, f"{cluster} {phase}", 1.0)

    def publish(self, prefix: str, cmdline: str | None = None) -> dict[str, Any]:
        """The lab image's files under /<prefix>/ on the server; the source naming them."""
        folder = self.settings.images / "lab"
        source: dict[str, Any] = {"cmdline": cmdline or image_cmdline(folder)}
        for part, name in (("disk", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img")):
            data = (folder / name).read_bytes()
            self.files.files[f"/{prefix}/{name}"] = data
            entry = {"url": f"{self.files.base}/{prefix}/{name}", "sha256": sha256(data)}
            if part == "disk":
                source.update(entry)
            else:
                source[part] = entry
        return source

    def cli(self, *args: str) -> tuple[int, str]:
        """`hostagent ARGS --zone-context <the lab's>` with this checkout: its exit code and
        output, as written (a console's \\r kept)."""
        done = subprocess.run(
            [sys.executable, "-m", "hostagent", *args, "--zone-context", str(CONTEXT)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        return done.returncode, done.stdout.decode()

    def delete_cluster(self, cluster: str) -> None:
        self.zone.delete_cluster(cluster)
        self.zone.wait(cluster, "Gone", timeout_s=300)


CONTEXT = ROOT / "zone-client.json"


def image_cmdline(folder: Path) -> str:
    cmdline: str = json.loads((folder / "image.json").read_text())["cmdline"]
    return cmdline


@pytest.fixture(scope="module")
def lab(lab_image_dir: Path) -> Iterator[ImagesLab]:
    require(os.path.exists("/usr/bin/unshare"), "needs util-linux unshare")
    settings = LabSettings(
        hosts=3,
        root=ROOT,
        subnet=SUBNET,
        bridge="haimg16",
        veth_prefix="haimgv",
        context_file=CONTEXT,
        agent_extra_toml=AGENT_EXTRA,
        zone_extra_toml=ZONE_EXTRA,
        image_dir=lab_image_dir,
    )
    down(settings, purge=True, progress=print)  # a crashed earlier run
    files: FileServer | None = None
    try:
        context = up(settings, progress=print)
        files = FileServer(str(settings.plan().gateway.ip))
        zone = ZoneClient(context)
        try:
            yield ImagesLab(settings, zone, files)
        finally:
            zone.close()
    finally:
        if files is not None:
            files.close()
        for host in settings.plan().hosts:
            log = host.command_log
            if log.exists() and not IN_CI:
                print(f"--- {host.name} agent log (tail)\n" + log.read_text()[-3000:])
        down(settings, purge=True, progress=print)


def in_order(kinds: list[str], expected: list[str]) -> bool:
    """Whether expected occur in kinds in this order (others may come between)."""
    rest = iter(kinds)
    return all(kind in rest for kind in expected)


def test_a_catalogue_image_is_pulled_verified_refused_kept_and_collected(lab: ImagesLab) -> None:
    source = lab.publish("labimg16")
    kernel, initrd = source["kernel"], source["initrd"]
    code, out = lab.cli(
        "image", "push", "labimg16", "--url", source["url"], "--sha256", source["sha256"],
        "--kernel-url", kernel["url"], "--kernel-sha256", kernel["sha256"],
        "--initrd-url", initrd["url"], "--initrd-sha256", initrd["sha256"],
        "--cmdline", source["cmdline"],
    )  # fmt: skip
    assert code == 0 and out.startswith("image labimg16: sha256:"), out
    (image,) = [i for i in lab.zone.images() if i["name"] == "labimg16"]
    digest = image["digest"]
    # A corrupted copy: the server's disk is not the one the sha256 names.
    disk = lab.files.files["/labimg16/disk.qcow2"]
    lab.files.files["/corrupt16/disk.qcow2"] = disk[:-1] + bytes([disk[-1] ^ 0xFF])
    lab.zone.put_image("labimg16-bad", {**source, "url": f"{lab.files.base}/corrupt16/disk.qcow2"})

    spec = {"kubernetes_version": "1.31.2", "image": "labimg16", "masters": {"count": 1, **POOL}}
    spec["workers"] = {"count": 2, **POOL}
    lab.zone.put_cluster("imgs", spec)
    bad_spec = {"kubernetes_version": "1.31.2", "image": "labimg16-bad"}
    lab.zone.put_cluster("imgbad", {**bad_spec, "masters": {"count": 1, **POOL}})
    lab.wait_phase("imgs", "Ready")
    placed = {n["host"] for n in lab.nodes("imgs").values()}
    assert placed == set(HOSTS), lab.nodes("imgs")
    for host in HOSTS:
        pulled = lab.agent_call(host, "GET", "/v1/images/labimg16").json()
        assert pulled["status"]["phase"] == "Ready" and pulled["digest"] == digest, pulled
        folder = lab.host(host).state_dir / "pulled" / "sha256" / digest.removeprefix("sha256:")
        assert (folder / "disk.qcow2").read_bytes() == disk
    listed = lab.agent_call("h1", "GET", "/v1/images/labimg16").json()
    assert listed["used_by"], listed

    def bad_failed() -> dict[str, Any] | None:
        (node,) = lab.zone.cluster("imgbad")["status"]["nodes"]
        return node if node["phase"] == "Failed" else None

    bad = poll(bad_failed, 300, "imgbad's node Failed for its image", 1.0)
    assert bad["message"].startswith(f"host {bad['host']} could not pull image labimg16-bad:")
    assert "disk: sha256 mismatch" in bad["message"], bad
    assert lab.zone.cluster("imgbad")["status"]["phase"] == "Degraded"
    refused = lab.agent_call(bad["host"], "GET", "/v1/images/labimg16-bad").json()
    assert refused["status"]["phase"] == "Failed", refused
    assert "sha256 mismatch" in refused["status"]["message"], refused
    agent_nodes = lab.agent_call(bad["host"], "GET", "/v1/nodes").json()["items"]
    assert [n for n in agent_nodes if n["cluster"] == "imgbad"] == []
    assert "imgbad-m1" not in lab.virsh(bad["host"], "list", "--all", "--name").split()

    with pytest.raises(ApiError) as in_use:
        lab.zone.delete_image("labimg16")
    assert in_use.value.status == 409 and "named by cluster imgs" in str(in_use.value)
    answer = lab.agent_call("h2", "DELETE", "/v1/images/labimg16")
    assert answer.status_code == 409 and "used by imgs/" in answer.json()["error"]["message"]

    lab.delete_cluster("imgs")
    lab.delete_cluster("imgbad")
    gone_at = time.monotonic()
    for host in HOSTS:
        folder = lab.host(host).state_dir / "pulled" / "sha256" / digest.removeprefix("sha256:")

        def collected(host: str = host, folder: Path = folder) -> bool:
            answer = lab.agent_call(host, "GET", "/v1/images/labimg16")
            return answer.status_code == 404 and not folder.exists()

        poll(collected, 120, f"labimg16 collected on {host}", 0.5)
    print(f"collected on every host {time.monotonic() - gone_at:.1f} s after the clusters went")
    assert time.monotonic() - gone_at < UNUSED_TTL_S + 2 * GC_INTERVAL_S + 30
    lab.zone.delete_image("labimg16")
    lab.zone.delete_image("labimg16-bad")


def test_a_kernel_panic_fails_the_node_with_its_console(lab: ImagesLab) -> None:
    lab.zone.put_image("labpanic16", lab.publish("labpanic16", cmdline=PANIC))
    spec = {"kubernetes_version": "1.31.2", "image": "labpanic16", "masters": {"count": 1, **POOL}}
    lab.zone.put_cluster("panic", spec)
    started = time.monotonic()

    def failed() -> dict[str, Any] | None:
        node = lab.nodes("panic")["m1"]
        return node if node["phase"] == "Failed" else None

    node = poll(failed, BOOT_TIMEOUT_S + 300, "panic/m1 Failed", 1.0)
    print(f"panic/m1 Failed {time.monotonic() - started:.0f} s after the request")
    host = node["host"]
    path = "/v1/clusters/panic/nodes/m1"
    agent_node = lab.agent_call(host, "GET", path).json()
    message = agent_node["status"]["message"]
    assert f"did not phone home within {BOOT_TIMEOUT_S:.0f}s" in message, message
    assert "Kernel panic - not syncing" in message, message
    assert "Kernel panic - not syncing" in node["message"], node  # the zone's view

    most = {"tail_bytes": console.MAX_TAIL_BYTES}
    whole = lab.agent_call(host, "GET", path + "/console", params=most)
    assert whole.status_code == 200 and whole.headers["content-type"].startswith("text/plain")
    assert "Linux version" in whole.text and "Kernel panic - not syncing" in whole.text
    tail = lab.agent_call(host, "GET", path + "/console", params={"tail_bytes": 300})
    assert len(tail.content) == 300 and whole.content.endswith(tail.content)
    too_much = console.MAX_TAIL_BYTES + 1
    refused = lab.agent_call(host, "GET", path + "/console", params={"tail_bytes": too_much})
    assert refused.status_code == 400 and "tail_bytes" in refused.json()["error"]["message"]

    code, out = lab.cli("cluster", "console", "panic", "m1", "--tail-bytes", "300")
    assert (code, out) == (0, tail.text)
    assert lab.zone.console("panic", "m1", console.MAX_TAIL_BYTES) == whole.text
    with pytest.raises(ApiError) as bounds:
        lab.zone.console("panic", "m1", too_much)
    assert bounds.value.status == 400 and "tail_bytes" in str(bounds.value)

    lab.delete_cluster("panic")
    lab.zone.delete_image("labpanic16")


def test_events_follow_create_crash_restart_and_delete(lab: ImagesLab) -> None:
    spec = {"kubernetes_version": "1.31.2", "image": "lab", "masters": {"count": 1, **POOL}}
    lab.zone.put_cluster("events16", spec)
    lab.wait_phase("events16", "Ready")
    host = lab.nodes("events16")["m1"]["host"]
    path = "/v1/clusters/events16/nodes/m1"

    def kinds() -> list[str]:
        return [e["kind"] for e in lab.agent_call(host, "GET", path).json()["events"]]

    assert kinds()[:3] == ["created", "started", "phoned-home"], kinds()
    lab.virsh(host, "destroy", "events16-m1")  # crashed: its VM stopped by itself

    def restarted_and_ready() -> bool:
        node = lab.agent_call(host, "GET", path).json()
        seen = [e["kind"] for e in node["events"]]
        return in_order(seen, ["phoned-home", "restarted", "phoned-home"]) and (
            node["status"]["phase"] == "Ready"
        )

    poll(restarted_and_ready, 300, "events16/m1 restarted and Ready", 1.0)
    events = lab.agent_call(host, "GET", path).json()["events"]
    restarted = next(e for e in events if e["kind"] == "restarted")
    assert "stopped by itself" in restarted["message"], restarted

    # Paused, the guest ignores the shutdown request: the node stays Deleting on its host
    # until the agent's shutdown timeout, long enough to read both lists.
    lab.virsh(host, "suspend", "events16-m1")
    lab.zone.delete_cluster("events16")
    deleting = poll(lambda: "deleting" in kinds() and kinds(), 60, "the deleting event", 0.2)
    assert in_order(deleting, ["created", "started", "phoned-home", "restarted", "deleting"])
    assert deleting[-1] == "deleting", deleting
    view = lab.zone.cluster("events16")
    assert view["status"]["phase"] == "Deleting", view["status"]
    cluster_events = [e for e in view["status"]["events"][::-1] if not e["node"]]  # oldest first
    assert [e["kind"] for e in cluster_events] == ["created", "deleted"], cluster_events
    assert host in cluster_events[1]["message"], cluster_events
    lab.zone.wait("events16", "Gone", timeout_s=300)
    assert lab.agent_call(host, "GET", path).status_code == 404
