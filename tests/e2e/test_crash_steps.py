"""The agent SIGKILLed right after each step of making or deleting a node, then restarted:
the node converges (Ready, or gone) with nothing leaked and nothing twice.

A real agent process, libvirtd, lab VMs and the root namespace's network; the agent
kills itself with the test-only hook (HOSTAGENT_TEST_CRASH_AFTER, hostagent/testhooks.py).
The agent has an underlay (an address on a veth of the test's own) and one static
peer, so the cluster gets a VXLAN device with FDB entries besides its bridge, isolation
rule, nftables table and the VM's tap. Each test has its own agent (host id, state_dir),
cluster, VNI and bridge, and one VM; everything is removed whatever the test's end.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.client import ApiError, Client
from hostagent.testhooks import CRASH_AFTER, Point
from network.firewall import table_name
from network.names import bridge_name, tap_name, vxlan_name
from network.netlink import Netlink
from tests.conftest import require_libvirt
from tests.e2e.agent import (
    Agent,
    assert_whole_certificate_set,
    cleanup,
    isolation_rules,
    lab_master,
    leftovers,
    owned_domains,
    poll,
)

pytestmark = pytest.mark.e2e

TAG = secrets.token_hex(2)
BASE = Path("/var/lib/hostagent-e2e") / f"crash-{TAG}"
VNI_BASE = 700_000 + secrets.randbelow(1000) * 100
UNDERLAY_NET = f"10.247.{secrets.randbelow(250)}"
UNDERLAY_DEVICE, UNDERLAY_PEER = f"hacrul{TAG}", f"hacrup{TAG}"
LOCAL, PEER = f"{UNDERLAY_NET}.1", f"{UNDERLAY_NET}.2"
PEER_MAC = "52:54:00:c7:a5:01"
SUBNET = f"10.246.{secrets.randbelow(250)}"
READY_S = 300
CRASH_S = 120
NODE_FILES = {"cidata.iso", "console.log", "disk.qcow2", "etcd.qcow2", "pki"}
STATE_FILES = {"api-token", "ca", "nodes", "state.db", "state.db-shm", "state.db-wal"}

CREATE = [
    Point.NETWORK,
    Point.DIRECTORIES,
    Point.CERTIFICATES,
    Point.CONFIG_DRIVE,
    Point.DISK,
    Point.FILES,
    Point.DEFINE,
    Point.START,
    Point.RUNNING,
]
DELETE = [
    Point.SHUTDOWN,
    Point.UNDEFINE,
    Point.REMOVE_FILES,
    Point.CLUSTER_GONE,
    Point.FORGET,
    Point.NETWORK_TEARDOWN,
]
ORPHAN = [Point.DESTROY, Point.REMOVE_FILES, Point.CLUSTER_GONE, Point.UNDEFINE]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(lab_image_dir: Path) -> Iterator[Path]:
    """The lab image, and the underlay: an address on a veth pair of the module's own."""
    require_libvirt()
    # Content only, as in test_node_lifecycle.py: no libvirt xattrs on the copies.
    folder = BASE / "images"
    shutil.copytree(lab_image_dir / "lab", folder / "lab", copy_function=shutil.copyfile)
    try:
        ip("link", "add", UNDERLAY_DEVICE, "type", "veth", "peer", "name", UNDERLAY_PEER)
        ip("addr", "add", f"{LOCAL}/24", "dev", UNDERLAY_DEVICE)
        ip("link", "set", UNDERLAY_DEVICE, "up")
        yield folder
    finally:
        subprocess.run(["ip", "link", "del", UNDERLAY_DEVICE], capture_output=True)
        shutil.rmtree(BASE, ignore_errors=True)


class Case:
    """One test's cluster (vni and bridge of its own) and the agent that serves it."""

    def __init__(self, index: int, images: Path) -> None:
        self.cluster = f"cr{TAG}-{index}"
        self.vni = VNI_BASE + index
        self.bridge, self.vxlan = bridge_name(self.vni), vxlan_name(self.vni)
        self.tap = tap_name(self.cluster, "m1")
        self.domain = f"{self.cluster}-m1"
        home = BASE / self.cluster
        self.agent = Agent(state_dir=home / "state", image_dir=images, home=home)
        self.agent.write_config(
            f'[network]\nunderlay_address = "{LOCAL}"\n'
            f'[[network.clusters]]\ncluster = "{self.cluster}"\n'
            f'peers = [{{address = "{PEER}", macs = ["{PEER_MAC}"]}}]\n'
        )

    @property
    def node_dir(self) -> Path:
        return self.agent.state_dir / "nodes" / self.cluster / "m1"

    def start(self, crash_after: Point | None = None) -> Client:
        return self.agent.start(env={CRASH_AFTER: crash_after.value} if crash_after else None)

    def ready(self, client: Client) -> None:
        phases = client.wait([(self.cluster, "m1")], timeout_s=READY_S, progress=print)
        assert phases == {(self.cluster, "m1"): "Ready"}
        poll(
            lambda: client.host()["reconciler"] == {"queued": 0, "active": 0},
            60,
            "a settled agent",
        )

    def remove_leftovers(self) -> None:
        """What the agent may have left: its VM, devices, rules and table, its state."""
        cleanup(self.agent, [self.bridge, self.vxlan])
        shutil.rmtree(self.agent.home or self.agent.state_dir, ignore_errors=True)


CASES = itertools.count(1)


@pytest.fixture
def case(images: Path) -> Iterator[Case]:
    case = Case(next(CASES), images)
    try:
        yield case
    finally:
        print(case.agent.log_tail())
        case.remove_leftovers()


# --- what the host holds for a cluster ----------------------------------------------------


def nft_rules(host_id: str) -> list[str] | None:
    """The rules of the agent's table, as nft prints them; None when there is no table."""
    table = f"inet {table_name(host_id)}"
    done = subprocess.run(["nft", "list", "table", *table.split()], capture_output=True, text=True)
    if done.returncode != 0:
        assert "No such file or directory" in done.stderr, done.stderr
        return None
    return [line.strip() for line in done.stdout.splitlines() if "iifname" in line]


def network_of(case: Case) -> dict[str, Any]:
    """The cluster's devices, FDB entries, rules and tap, as the kernel has them."""
    seen = Netlink().observe()
    bridges = [b for b in seen.bridges if b.name == case.bridge]
    vxlans = [v for v in seen.vxlans if v.name == case.vxlan]
    taps = [t for t in seen.taps if t.name == case.tap]
    rules = nft_rules(case.agent.host_id)
    return {
        "bridge": [(b.addresses, b.mtu, b.up) for b in bridges],
        "vxlan": [(v.vni, v.local, v.master, v.up) for v in vxlans],
        "fdb": sorted((e.mac, e.dst) for v in vxlans for e in v.fdb),
        "tap": [t.master for t in taps],
        "rules": isolation_rules(case.bridge),
        "nft": None if rules is None else sum(case.bridge in rule for rule in rules),
    }


def assert_one_node(case: Case) -> None:
    """Exactly one of everything the node and its cluster need, and nothing else."""
    assert owned_domains(case.agent.host_id) == [case.domain]
    assert network_of(case) == {
        "bridge": [((f"{SUBNET}.1/24",), 1450, True)],
        "vxlan": [(case.vni, LOCAL, case.bridge, True)],
        "fdb": sorted([("00:00:00:00:00:00", PEER), (PEER_MAC, PEER)]),
        "tap": [case.bridge],
        "rules": 1,
        "nft": 6,  # input: phone-home port, ping, replies, drop; forward: in, out
    }
    state = case.agent.state_dir
    assert {p.name for p in state.iterdir()} <= STATE_FILES
    assert [p.name for p in (state / "nodes").iterdir()] == [case.cluster]
    assert [p.name for p in (state / "nodes" / case.cluster).iterdir()] == ["m1"]
    assert {p.name for p in case.node_dir.iterdir()} == NODE_FILES
    assert [p.name for p in (state / "ca").iterdir()] == [case.cluster]
    assert leftovers(state) == []
    assert_whole_certificate_set(case.node_dir / "pki")


def assert_nothing_left(case: Case) -> None:
    assert owned_domains(case.agent.host_id) == []
    assert network_of(case) == {
        "bridge": [],
        "vxlan": [],
        "fdb": [],
        "tap": [],
        "rules": 0,
        "nft": None,
    }
    state = case.agent.state_dir
    assert {p.name for p in state.iterdir()} <= STATE_FILES
    assert list((state / "nodes").iterdir()) == []
    assert list((state / "ca").iterdir()) == []
    assert leftovers(state) == []


def gone(client: Client, case: Case) -> bool:
    try:
        client.get_node(case.cluster, "m1")
    except ApiError as exc:
        assert exc.status == 404, exc
        return True
    return False


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("point", CREATE, ids=[p.value for p in CREATE])
def test_killed_while_making_a_node(case: Case, point: Point) -> None:
    client = case.start(crash_after=point)
    client.put_node(case.cluster, "m1", lab_master(case.vni, SUBNET))
    case.agent.wait_killed(CRASH_S)

    client = case.start()
    case.ready(client)
    assert_one_node(case)
    guest = client.get_node(case.cluster, "m1")["status"]["guest"]
    assert f"{SUBNET}.11/24" in guest["addresses"]


@pytest.mark.parametrize("point", DELETE, ids=[p.value for p in DELETE])
def test_killed_while_deleting_a_node(case: Case, point: Point) -> None:
    client = case.start(crash_after=point)
    client.put_node(case.cluster, "m1", lab_master(case.vni, SUBNET))
    case.ready(client)
    client.delete_node(case.cluster, "m1")
    case.agent.wait_killed(CRASH_S)

    client = case.start()
    poll(lambda: gone(client, case), READY_S, "the node to be gone")
    poll(lambda: client.host()["reconciler"] == {"queued": 0, "active": 0}, 60, "a settled agent")
    assert_nothing_left(case)


@pytest.mark.parametrize("point", ORPHAN, ids=[p.value for p in ORPHAN])
def test_killed_while_removing_a_domain_without_a_node(case: Case, point: Point) -> None:
    """A node deleted from the store while the agent was down leaves an orphan domain,
    which the agent destroys (no shutdown) and removes; killed after one of those steps."""
    client = case.start()
    client.put_node(case.cluster, "m1", lab_master(case.vni, SUBNET))
    case.ready(client)
    case.agent.kill()
    with sqlite3.connect(case.agent.state_dir / "state.db") as db:
        db.execute("DELETE FROM nodes WHERE cluster = ?", (case.cluster,))
    case.start(crash_after=point)
    case.agent.wait_killed(CRASH_S)

    client = case.start()
    poll(lambda: owned_domains(case.agent.host_id) == [], READY_S, "the orphan to be removed")
    poll(lambda: client.host()["reconciler"] == {"queued": 0, "active": 0}, 60, "a settled agent")
    poll(lambda: network_of(case)["bridge"] == [], 60, "the cluster network to go")
    assert_nothing_left(case)
    assert gone(client, case)
