"""The lab guest image: built from Debian's packages, then booted for real under libvirt.

The boot test runs a transient TCG domain with direct kernel boot, a qcow2 overlay on
the image's disk, a NoCloud cidata ISO on a virtio-scsi cdrom, a 9p PKI share and a NIC
on a bridge made for the test, and waits for the guest's phone-home POST; then it asks
for an ACPI shutdown and waits for the domain to go away.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import queue
import random
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from hostagent.labimage.build import CMDLINE, build_lab_image
from tests.conftest import IMAGE_CACHE, require
from tests.guestxml import GuestXml, guest_xml

pytestmark = pytest.mark.integration

GIB = 1 << 30
PHONE_HOME_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 60
HEALTH_INTERVAL_S = 3


def _unavailable(reason: str) -> None:
    require(False, reason)


def _require_root() -> None:
    if os.geteuid() != 0:
        _unavailable("needs root (apt-get download, bridges, libvirt qemu:///system)")


# --- the build ------------------------------------------------------------------------


def test_build_layout_cache_and_force(tmp_path: Path) -> None:
    _require_root()
    lines: list[str] = []
    folder = build_lab_image(tmp_path, progress=lines.append)
    assert folder == tmp_path / "lab"
    assert any("downloading linux-image-" in line for line in lines)
    assert any("making initramfs" in line for line in lines)
    meta = json.loads((folder / "image.json").read_text())
    assert set(meta) == {"name", "kernel", "initrd", "disk", "cmdline", "recipe", "created_at"}
    assert (meta["name"], meta["kernel"], meta["initrd"], meta["disk"]) == (
        "lab", "vmlinuz", "initrd.img", "disk.qcow2",
    )  # fmt: skip
    assert meta["cmdline"] == CMDLINE and meta["cmdline"].startswith("console=ttyS0")
    assert len(meta["recipe"]) == 64 and int(meta["recipe"], 16) >= 0
    assert datetime.fromisoformat(meta["created_at"]).utcoffset() is not None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".lab-")]
    _check_files(folder)

    before = _mtimes(folder)
    lines.clear()
    assert build_lab_image(tmp_path, progress=lines.append) == folder
    assert _mtimes(folder) == before, "a cached image must not be rebuilt"
    assert any("cached" in line for line in lines)

    build_lab_image(tmp_path, force=True, progress=lines.append)
    assert _mtimes(folder)["image.json"] != before["image.json"]
    assert json.loads((folder / "image.json").read_text())["recipe"] == meta["recipe"]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _check_files(folder: Path) -> None:
    assert (folder / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # bzImage header
    listing = subprocess.run(
        f"zcat {folder / 'initrd.img'} | cpio -it", shell=True, capture_output=True, text=True
    ).stdout.split()
    for name in ("init", "bin/busybox", "bin/sh", "bin/wget", "bin/acpid", "dev/console"):
        assert name in listing
    modules = {Path(n).name for n in listing if n.endswith(".ko")}
    assert {"virtio_pci.ko", "virtio_blk.ko", "virtio_net.ko", "sr_mod.ko", "cdrom.ko"} <= modules
    assert {"isofs.ko", "9p.ko", "9pnet_virtio.ko", "button.ko", "evdev.ko"} <= modules
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(folder / "disk.qcow2")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(info.stdout)["format"] == "qcow2"


def test_missing_package_lists_say_run_apt_get_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lists").mkdir()
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::State::lists "{tmp_path / "lists"}";\n'
        f'Dir::Cache::pkgcache "{tmp_path / "pkgcache.bin"}";\n'
        f'Dir::Cache::srcpkgcache "{tmp_path / "srcpkgcache.bin"}";\n'
        f'Dir::State::status "{tmp_path / "status"}";\n'
    )
    (tmp_path / "status").write_text("")
    monkeypatch.setenv("APT_CONFIG", str(conf))
    with pytest.raises(RuntimeError, match="apt-get update"):
        build_lab_image(tmp_path / "images", progress=lambda _line: None)
    assert not (tmp_path / "images" / "lab").exists()


# --- booting it -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_image() -> Path:
    _require_root()
    return build_lab_image(IMAGE_CACHE)


@pytest.fixture
def conn() -> Iterator[Any]:
    _require_root()
    try:
        import libvirt
    except ImportError:
        _unavailable("libvirt-python is not installed")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway
    try:
        connection = libvirt.open("qemu:///system")
    except libvirt.libvirtError as err:
        _unavailable(f"libvirt qemu:///system unreachable: {err}")
    yield connection
    connection.close()


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
        index = ipr.link_lookup(ifname=name)[0]
        try:
            ipr.addr("add", index=index, address=f"{subnet}.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
        except BaseException:
            ipr.link("del", index=index)
            raise
    try:
        yield Bridge(name, f"{subnet}.1", f"{subnet}.11")
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = field(default_factory=time.monotonic)


class PhoneHome(ThreadingHTTPServer):
    """Answers the first POST with 503 (the guest must retry), later ones with 201."""

    def __init__(self, address: str) -> None:
        super().__init__((address, 0), _Handler)
        self.received: queue.Queue[Received] = queue.Queue()
        self.attempts = 0
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: PhoneHome

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.attempts += 1
            status = 503 if self.server.attempts == 1 else 201
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.received.put(Received(self.path, dict(self.headers.items()), body, status))

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def phone_home(bridge: Bridge) -> Iterator[PhoneHome]:
    server = PhoneHome(bridge.gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path: QEMU runs as libvirt-qemu and must traverse the path.
    path = Path(tempfile.mkdtemp(prefix="hatest-lab-", dir="/var/tmp"))
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
    token: str
    console: Path


def _cidata(path: Path, guest: Guest, bridge: Bridge, url: str) -> None:
    import pycdlib

    network = {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": guest.mac},
                "set-name": "eth0",
                "addresses": [f"{bridge.guest}/24"],
                "routes": [{"to": "default", "via": bridge.gateway}],
                "mtu": 1450,
            }
        },
    }
    meta = {"instance-id": f"iid-{guest.node}", "local-hostname": guest.node}
    env = f"PHONE_HOME_URL={url}\nPHONE_HOME_TOKEN={guest.token}\n"
    env += f"PHONE_HOME_HEALTH_INTERVAL_S={HEALTH_INTERVAL_S}\n"
    user = {"write_files": [{"path": "/etc/hostagent/phone-home.env", "content": env}]}
    files = {
        "meta-data": yaml.safe_dump(meta),
        "network-config": yaml.safe_dump(network, sort_keys=False),
        "user-data": "#cloud-config\n" + yaml.safe_dump(user),
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text.encode()
        iso_name = "/" + name.replace("-", "").upper() + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    iso.write(str(path))
    iso.close()


def _pki_share(path: Path) -> None:
    (path / "etcd").mkdir(parents=True)
    (path / "probe.txt").write_text("probe\n")
    (path / "etcd" / "ca.crt").write_text("not really a certificate\n")
    qemu = pwd.getpwnam("libvirt-qemu")
    for item in (path, path / "etcd", path / "probe.txt", path / "etcd" / "ca.crt"):
        os.chown(item, qemu.pw_uid, qemu.pw_gid)


def _domain_xml(image: Path, work: Path, guest: Guest, bridge: Bridge) -> str:
    iso = work / "cidata.iso"
    return guest_xml(
        GuestXml(
            name=guest.name,
            memory_mib=256,
            image=image,
            meta=json.loads((image / "image.json").read_text()),
            overlay=work / "overlay.qcow2",
            iso=iso if iso.exists() else None,
            share=work / "pki",
            share_tag="hostagent-pki",
            share_access="passthrough",
            mac=guest.mac,
            bridge=bridge.name,
            console=guest.console,
        )
    )


def _prepare(image: Path, work: Path, guest: Guest, bridge: Bridge, url: str | None) -> str:
    """Overlay disk, PKI share and (unless url is None) the cidata ISO; the domain XML."""
    base = image / json.loads((image / "image.json").read_text())["disk"]
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
         str(work / "overlay.qcow2"), "2G"],
        check=True,
    )  # fmt: skip
    if url is not None:
        _cidata(work / "cidata.iso", guest, bridge, url)
    _pki_share(work / "pki")
    return _domain_xml(image, work, guest, bridge)


def _wait_accepted(server: PhoneHome, timeout: float) -> list[Received]:
    seen: list[Received] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1].status >= 300:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no accepted phone-home within {timeout} s; got {seen}")
        try:
            seen.append(server.received.get(timeout=remaining))
        except queue.Empty:
            continue
    return seen


def _wait_health_report(server: PhoneHome, timeout: float) -> Received:
    """The first POST to .../health: the guest keeps reporting after its phone-home."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            call = server.received.get(timeout=remaining)
        except queue.Empty:
            break
        if call.path.endswith("/health"):
            return call
    raise AssertionError(f"no health report within {timeout} s of the phone-home")


def _wait_gone(dom: Any, timeout: float) -> float:
    import libvirt

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if not dom.isActive():
                return time.monotonic() - started
        except libvirt.libvirtError:  # transient domain: gone once it is shut off
            return time.monotonic() - started
        time.sleep(0.2)  # polling interval, not a synchronisation
    raise AssertionError(f"domain still running {timeout} s after the ACPI shutdown request")


def _check_phone_home(calls: list[Received], guest: Guest, bridge: Bridge) -> None:
    assert len(calls) >= 2, "the first POST got a 503; the guest must have retried"
    call = calls[-1]
    assert call.path == f"/v1/phone-home/lab/{guest.node}"
    assert call.headers["Authorization"] == f"Bearer {guest.token}"
    assert call.headers["Content-Type"] == "application/json"
    body = json.loads(call.body)
    assert body["hostname"] == guest.node
    assert body["instance_id"] == f"iid-{guest.node}"
    assert body["addresses"] == [f"{bridge.guest}/24"]
    assert sorted(body["pki_files"]) == ["etcd/ca.crt", "probe.txt"]
    assert body["disk_bytes"] == 2 * GIB
    assert body["kernel"].endswith("-amd64")
    assert isinstance(body["uptime_s"], float) and body["uptime_s"] > 0
    assert body["health_interval_s"] == HEALTH_INTERVAL_S


def _destroy(conn: Any, name: str) -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(name).destroy()


def _new_guest(workdir: Path) -> Guest:
    node = f"lab-node-{secrets.token_hex(2)}"
    mac = "52:54:00:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(3))
    return Guest(f"hatest-{node}", node, mac, secrets.token_hex(16), workdir / "console.log")


def _wait_console(guest: Guest, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if guest.console.exists() and text in guest.console.read_text(errors="replace"):
            return
        time.sleep(0.2)  # polling interval, not a synchronisation
    raise AssertionError(f"{text!r} not on the guest console within {timeout} s")


@contextlib.contextmanager
def _running(conn: Any, xml: str, guest: Guest) -> Iterator[Any]:
    """A started transient domain; destroyed at the end, its console printed on failure."""
    try:
        yield conn.createXML(xml, 0)
    except BaseException:
        if guest.console.exists():
            print("---- guest console ----\n" + guest.console.read_text(errors="replace"))
        raise
    finally:
        _destroy(conn, guest.name)


def _shutdown(dom: Any, guest: Guest) -> None:
    dom.shutdown()
    print(f"ACPI shutdown took {_wait_gone(dom, SHUTDOWN_TIMEOUT_S):.1f} s")
    assert "hostagent-lab: ACPI power button pressed" in guest.console.read_text()


def test_boots_phones_home_and_powers_off(
    lab_image: Path, conn: Any, bridge: Bridge, phone_home: PhoneHome, workdir: Path
) -> None:
    guest = _new_guest(workdir)
    url = f"http://{bridge.gateway}:{phone_home.port}/v1/phone-home/lab/{guest.node}"
    xml = _prepare(lab_image, workdir, guest, bridge, url)
    started = time.monotonic()
    with _running(conn, xml, guest) as dom:
        calls = _wait_accepted(phone_home, PHONE_HOME_TIMEOUT_S)
        print(f"phone-home accepted {calls[-1].at - started:.1f} s after domain start")
        _check_phone_home(calls, guest, bridge)
        report = _wait_health_report(phone_home, PHONE_HOME_TIMEOUT_S)
        assert report.path == f"/v1/phone-home/lab/{guest.node}/health"
        assert report.headers["Authorization"] == f"Bearer {guest.token}"
        assert json.loads(report.body) == {}
        _shutdown(dom, guest)


def test_without_config_drive_logs_error_and_stays_up(
    lab_image: Path, conn: Any, bridge: Bridge, workdir: Path
) -> None:
    guest = _new_guest(workdir)
    xml = _prepare(lab_image, workdir, guest, bridge, url=None)
    with _running(conn, xml, guest) as dom:
        _wait_console(guest, "hostagent-lab: ERROR no config drive", 120)
        _wait_console(guest, "hostagent-lab: ready; idling", 10)
        assert dom.isActive()
        _shutdown(dom, guest)
