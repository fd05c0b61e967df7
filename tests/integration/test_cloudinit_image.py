"""The lab-cloudinit image: Debian 12 + cloud-init 22.4 built with debootstrap, booted.

The boot test starts a transient TCG domain (direct kernel boot, a 4 GiB qcow2 overlay
on the image's base disk, a NoCloud cidata ISO, a 9p share and a NIC on a bridge made
for the test) with a small cloud-config of its own. Once cloud-init's final stage is
done the guest POSTs a JSON report (hostname, addresses, a written file's mode, root
file system size, `cloud-init status`, the versions of etcd and keepalived and that
neither starts by itself) to a listener on the bridge.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.configdrive import build_config_drive
from hostagent.labimage.cloudinit import (
    CMDLINE,
    IMAGE_NAME,
    apt_mirror,
    build_cloudinit_image,
)
from tests.conftest import require, require_libvirt
from tests.guestxml import GuestXml, guest_xml

pytestmark = pytest.mark.integration

GIB = 1 << 30
OVERLAY_BYTES = 4 * GIB
MEMORY_MIB = 512
REPORT_TIMEOUT_S = 600  # measured far below this under TCG; see the printed figure
PROBE_FILE = "/etc/hostagent/probe.conf"
PKI_TEXT = "shared over 9p\n"

# Runs once cloud-init is done (started in the background from runcmd, which is part
# of the final stage it waits for) and prints the report as JSON.
REPORT_PY = f"""\
import json, socket, subprocess, time


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


uptime = float(open("/proc/uptime").read().split()[0])
status = json.load(open("/run/cloud-init/status.json"))["v1"]
booted = time.time() - uptime
print(json.dumps({{
    "hostname": socket.gethostname(),
    "ip_addr": sh("ip -4 -o addr show"),
    "mode": sh("stat -c %a {PROBE_FILE}"),
    "df": sh("df -B1 /"),
    "status": sh("cloud-init status --long"),
    "pki": sh("mkdir -p /mnt/pki && mount -t 9p -o trans=virtio,ro pki /mnt/pki"
              " && cat /mnt/pki/probe.txt"),
    "uptime_s": uptime,
    "final_done_uptime_s": status["modules-final"]["finished"] - booted,
    "machine_id": open("/etc/machine-id").read().strip(),
    "etcd": sh("etcd --version | head -n 1"),
    "keepalived": sh("keepalived --version 2>&1 | head -n 1"),
    "enabled": sh("systemctl is-enabled etcd.service keepalived.service"),
}}))
"""


# --- the build ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(cloudinit_image_dir: Path) -> Path:
    return cloudinit_image_dir / IMAGE_NAME


def test_layout_and_initramfs(image: Path) -> None:
    meta = json.loads((image / "image.json").read_text())
    assert set(meta) == {"name", "kernel", "initrd", "disk", "cmdline", "recipe", "created_at"}
    assert (meta["name"], meta["kernel"], meta["initrd"], meta["disk"]) == (
        IMAGE_NAME, "vmlinuz", "initrd.img", "disk.qcow2",
    )  # fmt: skip
    assert meta["cmdline"] == CMDLINE and meta["cmdline"].startswith("root=/dev/vda rw")
    assert (image / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # bzImage header
    assert _qemu_img_info(image / "disk.qcow2")["format"] == "qcow2"
    # The root disk and the config drive must be reachable before the root is mounted.
    names = {Path(n).name for n in _initramfs_listing(image / "initrd.img")}
    for module in ("virtio_pci", "virtio_blk", "virtio_scsi", "sr_mod", "ext4", "virtio_net"):
        assert f"{module}.ko" in names, f"{module} missing from the initramfs"


def test_cached_build_returns_at_once(image: Path) -> None:
    before = _mtimes(image)
    lines: list[str] = []
    started = time.monotonic()
    assert build_cloudinit_image(image.parent, progress=lines.append) == image
    elapsed = time.monotonic() - started
    assert _mtimes(image) == before, "a cached image must not be rebuilt"
    assert any("cached" in line for line in lines), lines
    assert elapsed < 5, f"a cached build took {elapsed:.1f} s"
    assert not [p.name for p in image.parent.iterdir() if p.name.startswith(f".{IMAGE_NAME}-")]


def test_missing_tool_and_unreachable_mirror_are_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(os.geteuid() == 0, "needs root")
    import hostagent.labimage.cloudinit as cloudinit

    monkeypatch.setattr(shutil, "which", lambda _name, path=None: None)
    with pytest.raises(RuntimeError, match=r"debootstrap not found.*setup-host\.sh"):
        build_cloudinit_image(tmp_path, progress=lambda _line: None)
    monkeypatch.undo()
    monkeypatch.setattr(cloudinit, "apt_mirror", lambda _suite: "http://127.0.0.1:9/debian")
    with pytest.raises(RuntimeError, match="mirror unreachable"):
        build_cloudinit_image(tmp_path, progress=lambda _line: None)
    assert not (tmp_path / IMAGE_NAME).exists()


def test_mirror_is_read_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64] http://one.example/debian/ bookworm-updates main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
    )
    assert apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    with pytest.raises(RuntimeError, match="no 'deb' source for trixie"):
        apt_mirror("trixie", tmp_path)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _qemu_img_info(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def _initramfs_listing(path: Path) -> list[str]:
    """File names in a gzip or zstd initramfs (initramfs-tools' default compressions)."""
    magic = path.read_bytes()[:4]
    unpack = "zcat" if magic[:2] == b"\x1f\x8b" else "zstdcat"
    proc = subprocess.run(f"{unpack} {path} | cpio -it", shell=True, capture_output=True, text=True)
    return proc.stdout.split()


# --- booting it -----------------------------------------------------------------------


@dataclass
class Bridge:
    name: str
    gateway: str
    guest: str


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    from pyroute2 import IPRoute

    name = f"hatest{secrets.token_hex(3)}"
    subnet = f"10.250.{random.randint(0, 255)}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        try:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=index, address=f"{subnet}.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
        except BaseException:
            _delete_link(name)
            raise
    try:
        yield Bridge(name, f"{subnet}.1", f"{subnet}.11")
    finally:
        _delete_link(name)


def _delete_link(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)


class Listener(ThreadingHTTPServer):
    """Collects the JSON bodies POSTed to it."""

    def __init__(self, address: str) -> None:
        super().__init__((address, 0), _Handler)
        self.reports: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: Listener

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.reports.put((time.monotonic(), json.loads(body)))

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def listener(bridge: Bridge) -> Iterator[Listener]:
    server = Listener(bridge.gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def conn() -> Iterator[Any]:
    require_libvirt()
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway
    connection = libvirt.open("qemu:///system")
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path: QEMU runs as libvirt-qemu and must traverse the path.
    path = Path(tempfile.mkdtemp(prefix="hatest-ci-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Guest:
    name: str
    node: str
    mac: str
    work: Path

    @property
    def console(self) -> Path:
        return self.work / "console.log"


def new_guest(work: Path) -> Guest:
    node = f"ci-node-{secrets.token_hex(2)}"
    mac = "52:54:00:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))
    return Guest(f"hatest-{node}", node, mac, work)


def config_drive_files(guest: Guest, bridge: Bridge, url: str) -> dict[str, bytes]:
    """meta-data, a static netplan v2 network-config and the test's own cloud-config."""
    network = {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": guest.mac},
                "set-name": "eth0",
                "addresses": [f"{bridge.guest}/24"],
                "routes": [{"to": "0.0.0.0/0", "via": bridge.gateway}],
                "mtu": 1450,
            }
        },
    }
    # Reports only once cloud-init is done; runcmd is part of the final stage, so the
    # waiting runs in the background (cloud-final's KillMode=process lets it live).
    report = (
        "cloud-init status --wait >/dev/null; python3 /etc/hostagent/report.py | curl -sS"
        " --retry 20 --retry-all-errors --retry-delay 2 -H 'Content-Type: application/json'"
        f" --data-binary @- {url}"
    )
    user = {
        "hostname": guest.node,
        "write_files": [
            {"path": PROBE_FILE, "content": "probe\n", "permissions": "0640"},
            {"path": "/etc/hostagent/report.py", "content": REPORT_PY, "permissions": "0644"},
        ],
        "runcmd": [["sh", "-c", f"({report}) >/var/log/hostagent-report.log 2>&1 &"]],
    }
    meta = {"instance-id": f"iid-{guest.node}", "local-hostname": guest.node}
    return {
        "meta-data": yaml.safe_dump(meta).encode(),
        "network-config": yaml.safe_dump(network, sort_keys=False).encode(),
        "user-data": ("#cloud-config\n" + yaml.safe_dump(user, sort_keys=False)).encode(),
    }


def prepare(image: Path, guest: Guest, bridge: Bridge, url: str) -> str:
    """Overlay, cidata ISO and 9p share in the guest's work dir; the domain XML."""
    meta = json.loads((image / "image.json").read_text())
    overlay = guest.work / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image / meta["disk"]),
         "-F", "qcow2", str(overlay), str(OVERLAY_BYTES)],
        check=True,
    )  # fmt: skip
    build_config_drive(guest.work / "cidata.iso", config_drive_files(guest, bridge, url))
    share = guest.work / "pki"
    share.mkdir()
    (share / "probe.txt").write_text(PKI_TEXT)
    share.chmod(0o755)
    return domain_xml(image, meta, guest, bridge)


def domain_xml(image: Path, meta: dict[str, str], guest: Guest, bridge: Bridge) -> str:
    return guest_xml(
        GuestXml(
            name=guest.name,
            memory_mib=MEMORY_MIB,
            image=image,
            meta=meta,
            overlay=guest.work / "overlay.qcow2",
            iso=guest.work / "cidata.iso",
            share=guest.work / "pki",
            share_tag="pki",
            share_access="squash",
            mac=guest.mac,
            bridge=bridge.name,
            console=guest.console,
        )
    )


@contextlib.contextmanager
def running(conn: Any, xml: str, guest: Guest) -> Iterator[Any]:
    """A started transient domain; destroyed at the end, its console printed on failure."""
    try:
        yield conn.createXML(xml, 0)
    except BaseException:
        if guest.console.exists():
            print("---- guest console ----\n" + guest.console.read_text(errors="replace"))
        raise
    finally:
        destroy(conn, guest.name)


def destroy(conn: Any, name: str, attempts: int = 5) -> None:
    """Destroy a domain, retrying: under load QEMU may outlive libvirt's kill timeout."""
    import libvirt

    for attempt in range(attempts):
        try:
            conn.lookupByName(name).destroy()
            return
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            if attempt == attempts - 1:
                raise
            time.sleep(2)  # back-off before asking libvirt to kill it again


def wait_report(server: Listener, timeout: float) -> tuple[float, dict[str, Any]]:
    try:
        return server.reports.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no report from the guest within {timeout} s") from None


def check_report(report: dict[str, Any], guest: Guest, bridge: Bridge, base_bytes: int) -> None:
    assert report["hostname"] == guest.node
    addresses = [line.split()[3] for line in report["ip_addr"].splitlines()]
    assert addresses == ["127.0.0.1/8", f"{bridge.guest}/24"], report["ip_addr"]
    assert report["mode"] == "640"
    root_bytes = int(report["df"].splitlines()[-1].split()[1])
    assert root_bytes > base_bytes, f"root file system not grown: {report['df']}"
    assert root_bytes > 0.9 * OVERLAY_BYTES, report["df"]
    assert "status: done" in report["status"], report["status"]
    assert report["pki"] == PKI_TEXT.strip(), "the 9p share did not mount"
    assert len(report["machine_id"]) == 32
    # A master's control plane without a container runtime: installed, started only by
    # the units a master's cloud-config writes (docs/cloudconfig.md).
    assert report["etcd"].startswith("etcd Version: 3."), report["etcd"]
    assert report["keepalived"].startswith("Keepalived v2."), report["keepalived"]
    assert report["enabled"].split() == ["disabled", "disabled"], report["enabled"]


def test_boots_applies_cloud_config_and_grows_root(
    image: Path, conn: Any, bridge: Bridge, listener: Listener, workdir: Path
) -> None:
    guest = new_guest(workdir)
    url = f"http://{bridge.gateway}:{listener.port}/report/{guest.node}"
    xml = prepare(image, guest, bridge, url)
    base_bytes = int(_qemu_img_info(image / "disk.qcow2")["virtual-size"])
    started = time.monotonic()
    with running(conn, xml, guest):
        at, report = wait_report(listener, REPORT_TIMEOUT_S)
        # The guest's clock starts a little after the domain: the report's arrival less
        # the time the guest took to write it after cloud-init's final stage finished.
        final_done = at - started - (report["uptime_s"] - report["final_done_uptime_s"])
        print(
            f"cloud-init final stage done {final_done:.1f} s after domain start"
            f" (guest uptime {report['final_done_uptime_s']:.1f} s); report received"
            f" after {at - started:.1f} s"
        )
        print(json.dumps(report, indent=2))
        check_report(report, guest, bridge, base_bytes)
