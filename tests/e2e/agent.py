"""A real `hostagent serve` process for end-to-end tests, and cleanup of what it made."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
from pyroute2 import IPRoute

from hostagent.client import Client
from hostagent.virt.domain import parse_meta
from network.firewall import FAMILY, table_name
from network.model import ISOLATION_PRIORITY
from pki import files as pki_files
from tests.fakezone import free_port


def poll(check: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Call check() until it returns something truthy; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Agent:
    state_dir: Path
    image_dir: Path
    host_id: str = field(default_factory=lambda: f"e2e-{secrets.token_hex(3)}")
    api_port: int = field(default_factory=free_port)
    phone_home_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    home: Path | None = None  # config and log; the state_dir when None

    @property
    def config_path(self) -> Path:
        return (self.home or self.state_dir) / "hostagent.toml"

    @property
    def log_path(self) -> Path:
        return (self.home or self.state_dir) / "agent.log"

    def write_config(self, extra: str = "", domain_type: str = "qemu") -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'host_id = "{self.host_id}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'image_dir = "{self.image_dir}"\n'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\n'
            f"[phone_home]\nport = {self.phone_home_port}\n"
            f'[libvirt]\ndomain_type = "{domain_type}"\nshutdown_timeout_s = 20\n'
            "[reconciler]\nbackoff_initial_s = 0.5\n" + extra
        )

    def start(self, timeout_s: float = 60, env: Mapping[str, str] | None = None) -> Client:
        """Start `hostagent serve`, with env added to the environment (a test hook)."""
        if not self.config_path.exists():
            self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hostagent", "-c", str(self.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        client = Client(f"http://127.0.0.1:{self.api_port}", "unused")
        poll(lambda: self._up(client), timeout_s, "the agent to answer /healthz")
        token = (self.state_dir / "api-token").read_text().strip()
        return Client(f"http://127.0.0.1:{self.api_port}", token)

    def _up(self, client: Client) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the agent exited: {self.log_path.read_text()[-3000:]}")
        return client.healthy()

    def kill(self) -> None:
        """kill -9: no chance to clean up, as after a crash."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def wait_killed(self, timeout_s: float) -> None:
        """Wait until the agent has died of SIGKILL (its own test hook's)."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent still runs after {timeout_s:.0f}s") from None
        self.process = None
        assert code == -signal.SIGKILL, f"the agent exited with {code}: {self.log_tail()}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def log_tail(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path.exists() else ""


def lab_master(vni: int, subnet: str) -> dict[str, Any]:
    """The smallest master NodeSpec on the lab image, at <subnet>.11 on VNI vni."""
    return {
        "role": "master",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 1,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": vni, "address": f"{subnet}.11/24", "gateway": f"{subnet}.1"},
    }


def owned_domains(host_id: str) -> list[str]:
    conn = libvirt.open("qemu:///system")
    names = []
    try:
        for dom in conn.listAllDomains(0):
            try:
                meta = parse_meta(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # another test's domain went away meanwhile
            if meta is not None and meta.host == host_id:
                names.append(dom.name())
        return sorted(names)
    finally:
        conn.close()


def qemu_pid(domain: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    return None


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def cleanup(agent: Agent, bridges: list[str]) -> None:
    """Remove everything the agent under test may have left, whatever state the test ended
    in: its domains, the bridges (and VXLAN devices) named, their isolation rules, its
    nftables table, its state_dir."""
    agent.stop()
    conn = libvirt.open("qemu:///system")
    try:
        for name in owned_domains(agent.host_id):
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefine()
    finally:
        conn.close()
    with IPRoute() as ipr:
        for bridge in bridges:
            for index in ipr.link_lookup(ifname=bridge):
                ipr.link("del", index=index)
    for bridge in bridges:
        rule = ["ip", "rule", "del", "iif", bridge, "pref", str(ISOLATION_PRIORITY)]
        for _ in range(isolation_rules(bridge)):
            subprocess.run(rule, capture_output=True)
    table = ["nft", "delete", "table", FAMILY, table_name(agent.host_id)]
    subprocess.run(table, capture_output=True)  # absent when the agent removed it
    if os.environ.get("HOSTAGENT_KEEP_TEST_STATE") != "1":
        shutil.rmtree(agent.state_dir, ignore_errors=True)


def isolation_rules(bridge: str) -> int:
    """How many policy rules match packets arriving on bridge (the agent adds one)."""
    done = subprocess.run(["ip", "-j", "rule", "show"], check=True, capture_output=True)
    return sum(1 for rule in json.loads(done.stdout) if rule.get("iif") == bridge)


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again, the way this machine runs it."""
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
        return
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    poll(
        lambda: subprocess.run(["pgrep", "-x", "libvirtd"]).returncode != 0, 30, "libvirtd to stop"
    )
    subprocess.run(["libvirtd", "-d"], check=True)


def leftovers(state: Path) -> list[Path]:
    """Temporaries (`.<name>.<random>.tmp`, the PKI's `.<name>.tmp-<random>`) and
    half-made disks anywhere in the state_dir."""
    return sorted(
        path for path in state.rglob("*") if path.name.endswith(".partial") or ".tmp" in path.name
    )


def assert_whole_certificate_set(pki: Path) -> None:
    """Either no set at all, or the manifest's set with every file it names intact."""
    manifest = pki_files.read_manifest(pki)
    if manifest is None:
        assert not [p for p in pki.rglob("*") if p.suffix in (".crt", ".key")], "a torn set"
    else:
        assert pki_files.stale_names(pki, manifest) == set()
