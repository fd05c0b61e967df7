"""A full disk under a real agent: its state_dir (the SQLite store and the node files; the
images live elsewhere) is a small tmpfs, filled by the test after the agent started.

While nothing fits, a PUT is refused with a clear 503 (the store cannot record it) and
the agent keeps serving. With room for the store but not for the node's files, the node
goes Failed naming the full disk, and nothing half-written stays behind. Once space
returns, PUT again (the documented retry) makes it Ready; then it is deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent.client import ApiError
from network.names import bridge_name
from tests.conftest import require_libvirt
from tests.e2e.agent import Agent, assert_whole_certificate_set, cleanup, lab_master, leftovers

pytestmark = pytest.mark.e2e

CLUSTER = f"full-{secrets.token_hex(3)}"
VNI = 100_000 + secrets.randbelow(100_000)
SUBNET = f"10.252.{secrets.randbelow(250)}"
MAX_ATTEMPTS = 2
# Room for the store's transactions (about 16 KiB each in the WAL: accepted, preparing,
# attempt 1 failed, Failed) and the cluster's local CA (32 KiB), but for none of the
# node's other files, each written whole or not at all: the config drive takes 88 KiB
# on tmpfs, the certificate set 136 KiB, each qcow2 overlay 196 KiB.
HEADROOM = 112 * 1024
SPEC = lab_master(VNI, SUBNET)


@pytest.fixture
def agent(lab_image_dir: Path) -> Iterator[Agent]:
    require_libvirt()
    base = Path("/var/lib/hostagent-e2e") / CLUSTER
    state = base / "state"
    state.mkdir(parents=True)
    # Content only, as in test_node_lifecycle.py: no libvirt xattrs on the copies.
    shutil.copytree(lab_image_dir / "lab", base / "images" / "lab", copy_function=shutil.copyfile)
    # The agent books a node's whole disk_gib on the state_dir's filesystem: 1 GiB it is
    # (tmpfs takes memory only for what is written; the filler holds it for seconds).
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1100m,mode=0711", "tmpfs", state], check=True
    )
    agent = Agent(state_dir=state, image_dir=base / "images", home=base / "home")
    agent.write_config(
        extra=f"max_attempts = {MAX_ATTEMPTS}\nbackoff_max_s = 2\n"
        "[capacity]\nreserved_disk_gib = 0\n"
    )
    try:
        yield agent
    finally:
        print(agent.log_tail())
        cleanup(agent, [bridge_name(VNI)])  # stops the agent, removes the VM and bridge
        subprocess.run(["umount", state], check=False)
        shutil.rmtree(base, ignore_errors=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(filler: Path) -> None:
    """Write filler until the filesystem has no page left."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 2**20)
    except OSError as exc:
        assert exc.errno == 28, exc
    finally:
        os.close(fd)
    assert free_bytes(filler.parent) == 0


def test_a_full_disk_fails_the_node_clearly_and_it_recovers(agent: Agent) -> None:
    state = agent.state_dir
    client = agent.start()
    filler = state / "filler"
    fill(filler)

    with pytest.raises(ApiError) as refused:
        client.put_node(CLUSTER, "m1", SPEC)
    assert (refused.value.status, refused.value.code) == (503, "store_full"), refused.value
    assert f"state store {state}/state.db cannot be written, its disk is full" in str(refused.value)
    assert client.healthy() and agent.process is not None and agent.process.poll() is None
    assert client.nodes() == []

    os.truncate(filler, filler.stat().st_size - HEADROOM)
    client.put_node(CLUSTER, "m1", SPEC)
    client.wait([(CLUSTER, "m1")], until="Failed", timeout_s=120, progress=print)
    message = client.get_node(CLUSTER, "m1")["status"]["message"]
    node_dir = state / "nodes" / CLUSTER / "m1"
    assert f"failed after {MAX_ATTEMPTS} attempts: " in message
    assert "No space left on device" in message
    assert f"the filesystem holding {node_dir} is full (see `df -h {node_dir}`)" in message
    assert "PUT the node again" in message
    assert leftovers(state) == []
    assert_whole_certificate_set(node_dir / "pki")
    assert agent.process.poll() is None

    filler.unlink()
    client.put_node(CLUSTER, "m1", SPEC)  # the documented retry of a Failed node
    phases = client.wait([(CLUSTER, "m1")], timeout_s=300, progress=print)
    assert phases == {(CLUSTER, "m1"): "Ready"}
    assert leftovers(state) == []
    assert_whole_certificate_set(node_dir / "pki")

    client.delete_node(CLUSTER, "m1")
    client.wait([(CLUSTER, "m1")], until="Gone", timeout_s=120, progress=print)
    assert not node_dir.exists()
