"""A master and a worker of one cluster as real VMs (libvirtd + QEMU/TCG), end to end.

One agent and one pair of VMs for the whole module. Each test establishes the state it
checks (`ready`: the agent serving, m1 and w1 present and Ready, created or waited for as
needed), so any test passes on its own; in file order each finds what the one before
left (bad input, Ready, domain XML, restart adoption, orphan clean-up, delete).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hostagent.client import ApiError, Client
from network.names import bridge_name
from pki import layout
from tests.conftest import require_libvirt
from tests.e2e.agent import (
    Agent,
    cleanup,
    link_exists,
    owned_domains,
    poll,
    qemu_pid,
    restart_libvirtd,
)

pytestmark = pytest.mark.e2e

CLUSTER = f"e2e-{secrets.token_hex(3)}"
VNI = 100_000 + secrets.randbelow(100_000)
SUBNET = f"10.251.{secrets.randbelow(250)}"
BRIDGE = bridge_name(VNI)
PROBE_FILE = "probe-from-test.txt"


def spec(role: str, host_part: int, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "role": role,
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {
            "vni": VNI,
            "address": f"{SUBNET}.{host_part}/24",
            "gateway": f"{SUBNET}.1",
            "mtu": 1450,
        },
    }
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def agent(lab_image_dir: Path) -> Iterator[Agent]:
    require_libvirt()
    state = Path("/var/lib/hostagent-e2e") / CLUSTER
    # Two images with the same content under two names: changing a node's image
    # re-creates its root disk, which must leave its etcd disk alone.
    images = state / "images"
    for name in ("lab", "lab-b"):
        # Content only: copy2 would carry libvirt's trusted.libvirt.security.* xattrs of
        # the cached files (their owner bookkeeping while another VM used them), and
        # libvirt would then refuse to label the copies ("already in use").
        shutil.copytree(lab_image_dir / "lab", images / name, copy_function=shutil.copyfile)
    agent = Agent(state_dir=state, image_dir=images)
    try:
        yield agent
    finally:
        print(agent.log_tail())
        cleanup(agent, [BRIDGE])


NODES = {"m1": ("master", 11), "w1": ("worker", 21)}


def serving(agent: Agent) -> Client:
    """A client of the agent, started first when it is not running."""
    if agent.process is None or agent.process.poll() is not None:
        return agent.start()
    token = (agent.state_dir / "api-token").read_text().strip()
    return Client(f"http://127.0.0.1:{agent.api_port}", token)


def ready(agent: Agent, *names: str) -> Client:
    """The named nodes (default: m1 and w1) Ready: put with their spec when missing,
    as they are otherwise (an earlier test may have changed a spec), then waited for."""
    client = serving(agent)
    for name in names or tuple(NODES):
        try:
            client.get_node(CLUSTER, name)
        except ApiError as exc:
            if exc.status != 404:
                raise
            role, host_part = NODES[name]
            client.put_node(CLUSTER, name, spec(role, host_part))
    client.wait([(CLUSTER, n) for n in names or NODES], timeout_s=420, progress=print)
    wait_settled(client)
    return client


@pytest.fixture(scope="module")
def client(agent: Agent) -> Client:
    return serving(agent)


@pytest.fixture
def pair(agent: Agent) -> Client:
    return ready(agent)


def raw(client: Client, method: str, path: str, body: bytes | None = None) -> httpx.Response:
    return client.http.request(method, path, content=body)


def wait_settled(client: Client) -> None:
    poll(lambda: client.host()["reconciler"] == {"queued": 0, "active": 0}, 60, "a settled agent")


def test_bad_input_is_refused_and_changes_nothing(agent: Agent, client: Client) -> None:
    before = client.nodes()
    domains = owned_domains(agent.host_id)
    good = json.dumps(spec("master", 11)).encode()
    cases = [
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/m1", b"{not json", 400),
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/m1", b"[1, 2]", 400),
        (
            "PUT",
            f"/v1/clusters/{CLUSTER}/nodes/m1",
            json.dumps({**spec("master", 11), "gpu": 1}).encode(),
            422,
        ),
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/M1", good, 422),
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/a..b", good, 422),
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/a%2Fb", good, 422),
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/{'n' * 64}", good, 422),
        (
            "PUT",
            f"/v1/clusters/{CLUSTER}/nodes/m1",
            json.dumps(spec("master", 11, image="nope")).encode(),
            422,
        ),
        (
            "PUT",
            f"/v1/clusters/{CLUSTER}/nodes/m1",
            json.dumps(spec("master", 11, memory_mib=4 * 1024 * 1024)).encode(),
            422,
        ),
        ("PUT", f"/v1/clusters/{CLUSTER}/nodes/m1", json.dumps(spec("chief", 11)).encode(), 422),
        (
            "PUT",
            f"/v1/clusters/{CLUSTER}/nodes/m1",
            json.dumps(spec("master", 11, kubernetes_version="1.29.1")).encode(),
            422,
        ),
    ]
    old_version = json.dumps(spec("master", 11, kubernetes_version="1.29.1")).encode()
    unsupported = raw(client, "PUT", f"/v1/clusters/{CLUSTER}/nodes/m1", old_version)
    assert "1.30, 1.31" in unsupported.json()["error"]["message"]
    for method, path, body, status in cases:
        response = raw(client, method, path, body)
        assert response.status_code == status, (path, body[:60], response.text)
        error = response.json()["error"]
        assert error["code"] and error["message"], response.text
    unauthenticated = httpx.get(f"http://127.0.0.1:{agent.api_port}/v1/nodes")
    assert unauthenticated.status_code == 401
    assert client.nodes() == before
    assert owned_domains(agent.host_id) == domains


def test_master_and_worker_become_ready(agent: Agent, client: Client) -> None:
    for node in ("m1", "w1"):
        with contextlib.suppress(ApiError):
            client.delete_node(CLUSTER, node)  # made by a test before: made anew here
    client.wait([(CLUSTER, "m1"), (CLUSTER, "w1")], until="Gone", timeout_s=120)
    for node in ("m1", "w1"):
        pki = agent.state_dir / "nodes" / CLUSTER / node / "pki"
        pki.mkdir(parents=True)
        (pki / PROBE_FILE).write_text(f"placed by the test for {node}\n")
    created = client.put_node(CLUSTER, "m1", spec("master", 11))
    assert created["status"]["phase"] == "Pending"
    client.put_node(CLUSTER, "w1", spec("worker", 21))
    phases = client.wait([(CLUSTER, "m1"), (CLUSTER, "w1")], timeout_s=420, progress=print)
    assert phases == {(CLUSTER, "m1"): "Ready", (CLUSTER, "w1"): "Ready"}
    for node, host_part in (("m1", 11), ("w1", 21)):
        guest = client.get_node(CLUSTER, node)["status"]["guest"]
        assert guest["hostname"] == node
        assert f"{SUBNET}.{host_part}/24" in guest["addresses"]
        assert PROBE_FILE in guest["pki_files"]
        assert guest["disk_bytes"] == 2 * 1024**3
    assert sorted(owned_domains(agent.host_id)) == [f"{CLUSTER}-m1", f"{CLUSTER}-w1"]
    assert link_exists(BRIDGE)


def test_certificates_are_readable_in_the_guest_and_read_only(pair: Client) -> None:
    client = pair
    for node, role in (("m1", "master"), ("w1", "worker")):
        status = client.get_node(CLUSTER, node)["status"]
        guest, expiries = status["guest"], status["certificates"]
        wanted = set(layout.files_for(role))
        assert wanted <= set(guest["pki_files"]), sorted(wanted - set(guest["pki_files"]))
        assert guest["pki_read_bytes"] > 1000 * len(wanted) // 4
        assert guest["pki_writable"] is False
        assert ("apiserver" in expiries) == (role == "master")
        assert "kubelet-client" in expiries
        for when in expiries.values():
            assert datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ") > datetime(2027, 1, 1)


def test_same_node_with_another_role_is_a_conflict(pair: Client) -> None:
    client = pair
    with pytest.raises(ApiError) as error:
        client.put_node(CLUSTER, "m1", spec("worker", 11))
    assert error.value.status == 409
    assert client.get_node(CLUSTER, "m1")["spec"]["role"] == "master"


def test_same_spec_again_changes_nothing(pair: Client) -> None:
    client = pair
    before = client.get_node(CLUSTER, "m1")
    response = raw(
        client, "PUT", f"/v1/clusters/{CLUSTER}/nodes/m1", json.dumps(before["spec"]).encode()
    )
    assert response.status_code == 200
    assert client.get_node(CLUSTER, "m1")["status"] == before["status"]


def test_beyond_free_capacity_is_507(pair: Client) -> None:
    client = pair
    host = client.host()
    free = host["allocatable"]["memory_mib"] - host["allocated"]["memory_mib"]
    # Fits the host's allocatable memory but not what is left: overhead takes the rest.
    too_much = spec("worker", 31, memory_mib=free - 64)
    response = raw(client, "PUT", f"/v1/clusters/{CLUSTER}/nodes/w2", json.dumps(too_much).encode())
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "out_of_capacity"
    assert len(client.nodes()) == 2


def test_domain_xml_validates(pair: Client) -> None:
    for node in ("m1", "w1"):
        xml = subprocess.run(
            ["virsh", "-c", "qemu:///system", "dumpxml", f"{CLUSTER}-{node}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = subprocess.run(
            ["virt-xml-validate", "-", "domain"], input=xml, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr + result.stdout


def test_phone_home_with_another_nodes_token_is_refused(agent: Agent, pair: Client) -> None:
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        (w1_token,) = db.execute(
            "SELECT token FROM nodes WHERE cluster = ? AND name = 'w1'", (CLUSTER,)
        ).fetchone()
    url = f"http://127.0.0.1:{agent.api_port}/v1/phone-home/{CLUSTER}/m1"
    refused = httpx.post(url, headers={"Authorization": f"Bearer {w1_token}"}, json={})
    assert refused.status_code == 401
    assert httpx.post(url, json={}).status_code == 401


def test_changed_spec_recreates_the_domain_and_grows_the_disk(agent: Agent, pair: Client) -> None:
    client = pair
    pid = qemu_pid(f"{CLUSTER}-w1")
    changed = spec("worker", 21, memory_mib=320, disk_gib=3)
    response = raw(client, "PUT", f"/v1/clusters/{CLUSTER}/nodes/w1", json.dumps(changed).encode())
    assert response.status_code == 200
    assert response.json()["status"]["phase"] == "Pending"
    client.wait([(CLUSTER, "w1")], timeout_s=300, progress=print)
    guest = client.get_node(CLUSTER, "w1")["status"]["guest"]
    assert guest["disk_bytes"] == 3 * 1024**3
    assert qemu_pid(f"{CLUSTER}-w1") != pid
    info = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dominfo", f"{CLUSTER}-w1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "327680 KiB" in info  # 320 MiB
    with pytest.raises(ApiError) as error:
        client.put_node(CLUSTER, "w1", spec("worker", 21, memory_mib=320, disk_gib=2))
    assert error.value.status == 422  # disks only grow


def test_new_image_recreates_the_root_disk_but_keeps_etcds(agent: Agent, pair: Client) -> None:
    client = pair
    files = agent.state_dir / "nodes" / CLUSTER / "m1"
    etcd_before = (files / "etcd.qcow2").stat()
    assert "/lab/" in backing_file(files / "disk.qcow2")
    client.put_node(CLUSTER, "m1", spec("master", 11, image="lab-b"))
    client.wait([(CLUSTER, "m1")], timeout_s=300, progress=print)
    assert "/lab-b/" in backing_file(files / "disk.qcow2"), "root disk not re-created"
    etcd_after = (files / "etcd.qcow2").stat()
    assert (etcd_after.st_ino, etcd_after.st_mtime_ns) == (
        etcd_before.st_ino,
        etcd_before.st_mtime_ns,
    )
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", f"{CLUSTER}-m1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "<serial>etcd</serial>" in xml


def backing_file(path: Path) -> str:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return str(json.loads(info)["backing-filename"])


def test_a_vm_stopped_behind_the_agents_back_is_started_again(agent: Agent, pair: Client) -> None:
    client = pair
    pid = qemu_pid(f"{CLUSTER}-w1")
    before = len(w1_phases(client))
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", f"{CLUSTER}-w1"], check=True)
    poll(lambda: qemu_pid(f"{CLUSTER}-w1") not in (None, pid), 60, "w1 to be started again")
    # The phase may still read Ready from before for a moment: wait for the new boot's own
    # transitions, so the test ends (and the next begins) with w1 really back.
    since = poll(
        lambda: (new := w1_phases(client)[before:])[-1:] == ["Ready"] and new,
        300,
        "w1 Ready again after its restart",
    )
    assert "Running" in since and since[-1] == "Ready", since


def w1_phases(client: Client) -> list[str]:
    events = raw(client, "GET", f"/v1/clusters/{CLUSTER}/nodes/w1/events").json()["items"]
    return [e["phase"] for e in events]


def test_metrics_count_nodes_by_phase(agent: Agent, pair: Client) -> None:
    text = httpx.get(f"http://127.0.0.1:{agent.api_port}/metrics").text
    expiry = "hostagent_certificate_soonest_expiry_timestamp_seconds"
    assert f'{expiry}{{cluster="{CLUSTER}",node="w1"}}' in text
    assert 'hostagent_nodes{phase="Ready"} 2.0' in text
    assert "hostagent_reconcile_duration_seconds_count" in text


def test_cli_lists_and_gets_nodes(agent: Agent, pair: Client) -> None:
    base = [sys.executable, "-m", "hostagent", "-c", str(agent.config_path)]
    table = subprocess.run([*base, "list"], check=True, capture_output=True, text=True).stdout
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["CLUSTER", "NODE", "ROLE", "PHASE"]
    assert sorted(row.split()[:4] for row in rows) == [
        [CLUSTER, "m1", "master", "Ready"],
        [CLUSTER, "w1", "worker", "Ready"],
    ]
    got = subprocess.run(
        [*base, "get", CLUSTER, "w1", "-o", "json"], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(got)["status"]["guest"]["hostname"] == "w1"


def test_agent_reconnects_when_libvirtd_restarts(agent: Agent, pair: Client) -> None:
    client = pair
    pid = qemu_pid(f"{CLUSTER}-m1")
    restart_libvirtd()
    health = f"http://127.0.0.1:{agent.api_port}/healthz"
    poll(lambda: httpx.get(health).status_code == 200, 60, "healthz ok after libvirtd restart")
    metric = "hostagent_libvirt_reconnects "
    poll(
        lambda: any(
            line.startswith(metric) and float(line.split()[1]) >= 1
            for line in httpx.get(f"http://127.0.0.1:{agent.api_port}/metrics").text.splitlines()
        ),
        60,
        "the reconnect to show in /metrics",
    )
    assert qemu_pid(f"{CLUSTER}-m1") == pid, "a libvirtd restart must not restart VMs"
    wait_settled(client)
    assert client.get_node(CLUSTER, "m1")["status"]["phase"] == "Ready"


def test_kill_9_and_restart_adopts_running_vms(agent: Agent, pair: Client) -> None:
    client = pair
    domains = [f"{CLUSTER}-m1", f"{CLUSTER}-w1"]
    pids = {name: qemu_pid(name) for name in domains}
    assert all(pids.values()), pids
    history = {
        n: raw(client, "GET", f"/v1/clusters/{CLUSTER}/nodes/{n}/events").json()
        for n in ("m1", "w1")
    }
    agent.kill()
    # While the agent is down, w1 disappears from the desired state: its domain is an orphan.
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        db.execute("DELETE FROM nodes WHERE cluster = ? AND name = 'w1'", (CLUSTER,))
    client = agent.start()
    wait_settled(client)
    poll(lambda: owned_domains(agent.host_id) == [f"{CLUSTER}-m1"], 60, "the orphan w1 to go")
    assert qemu_pid(f"{CLUSTER}-m1") == pids[f"{CLUSTER}-m1"]
    assert client.get_node(CLUSTER, "m1")["status"]["phase"] == "Ready"
    events = raw(client, "GET", f"/v1/clusters/{CLUSTER}/nodes/m1/events").json()
    assert events == history["m1"], "the restart must not re-create or restart m1"
    assert not (agent.state_dir / "nodes" / CLUSTER / "w1").exists()


def test_delete_leaves_nothing_behind(agent: Agent) -> None:
    client = ready(agent, "m1")
    for name in set(NODES) - {"m1"}:
        with contextlib.suppress(ApiError):
            client.delete_node(CLUSTER, name)
    client.wait([(CLUSTER, n) for n in set(NODES) - {"m1"}], until="Gone", timeout_s=120)
    node_dir = agent.state_dir / "nodes" / CLUSTER / "m1"
    assert (node_dir / "disk.qcow2").exists() and (node_dir / "cidata.iso").exists()
    response = raw(client, "DELETE", f"/v1/clusters/{CLUSTER}/nodes/m1")
    assert response.status_code == 202
    assert response.json()["status"]["phase"] == "Deleting"
    client.wait([(CLUSTER, "m1")], until="Gone", timeout_s=120, progress=print)
    assert raw(client, "GET", f"/v1/clusters/{CLUSTER}/nodes/m1").status_code == 404
    assert owned_domains(agent.host_id) == []
    assert not node_dir.exists()
    assert not (agent.state_dir / "nodes" / CLUSTER).exists()
    poll(lambda: not link_exists(BRIDGE), 30, f"bridge {BRIDGE} to go with the cluster's last node")
    assert not (agent.state_dir / "ca" / CLUSTER).exists(), "the cluster's local CA must go too"
