"""The zone driving real agents: a lab of 3 hosts (each its own namespaces, libvirtd and
agent), real lab VMs under TCG, real VXLAN between the hosts.

One module-scoped lab serves every check. Each test establishes the clusters it needs
(`ensure`: created when missing, then Ready), so any test passes on its own, and in file
order each finds what the one before left and waits for nothing more: the cluster of 3
masters and 2 workers reaches Ready with masters on 3 hosts; a second cluster; a new
worker pings the nodes of its cluster on the other hosts across VXLAN and cannot reach
the other cluster's node even with forwarding on in every host; scaling updates every
host's peers; a killed agent makes the cluster Degraded and leaves the other hosts
alone, and it converges when back; a zone restarted mid-creation still completes the
cluster; deleting leaves nothing on any host. Mutual TLS is on throughout: the agents hold
certificates of the zone, their host tokens are spent, the zone holds no agent token.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hostagent.client import ApiError
from hostagent.lab import hosts as lab_hosts
from hostagent.lab.plan import HostPlan
from hostagent.lab.zonelab import (
    LabSettings,
    agent_pids,
    down,
    start_agent,
    start_zone,
    stop_zone,
    up,
    zone_dir,
)
from hostagent.zone.client import ZoneClient, ZoneContext
from network.names import mac_address
from tests.conftest import IN_CI, require
from tests.e2e.agent import poll

pytestmark = pytest.mark.e2e

# Isolated from a lab a person may have up (10.250.0.0/24, halab0, /var/lib/hostagent-lab).
ROOT = Path("/var/lib/hostagent-lab-test")
SUBNET = "10.254.9.0/24"
DEMO_NET = "10.128.0"  # the zone's first node subnet: demo (the first cluster)
OTHER_M1 = "10.128.1.10"  # the second cluster's first node
# Workers ping these at boot (an extension file in every agent's configuration): every
# node of demo, and the other cluster's master.
PING_TARGETS = [f"{DEMO_NET}.{i}" for i in range(10, 16)] + [OTHER_M1]
DEMO_SPEC: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "image": "lab",
    "masters": {"count": 3, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
    "workers": {"count": 2, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}
OTHER_SPEC: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "masters": {"count": 1, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}
AGENT_EXTRA = f"""
[[cloudconfig.worker.files]]
path = "/etc/hostagent/ping-targets"
content = "PING_TARGETS={",".join(PING_TARGETS)}"
"""


class Lab:
    def __init__(self, settings: LabSettings, context: ZoneContext) -> None:
        self.settings = settings
        self.plan = settings.plan()
        self.context = context
        self.zone = ZoneClient(context)

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

    def agent_get(self, host: str, path: str) -> httpx.Response:
        with self.agent(host) as client:
            return client.get(path)

    def nodes(self, cluster: str) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.zone.cluster(cluster)["status"]["nodes"]}

    def phase(self, cluster: str) -> str:
        phase: str = self.zone.cluster(cluster)["status"]["phase"]
        return phase

    def wait_phase(self, cluster: str, phase: str, timeout_s: float = 600.0) -> None:
        poll(lambda: self.phase(cluster) == phase, timeout_s, f"{cluster} {phase}", 1.0)

    def ensure(self, cluster: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The cluster Ready: created with spec when missing, as it is otherwise."""
        try:
            view = self.zone.cluster(cluster)
        except ApiError as exc:
            if exc.status != 404:
                raise
            view = self.zone.put_cluster(cluster, spec)
        self.wait_phase(cluster, "Ready")
        return view

    def ensure_clusters(self) -> None:
        """demo, then other: in this order they get the subnets the tests name."""
        self.ensure("demo", DEMO_SPEC)
        self.ensure("other", OTHER_SPEC)

    def peer_macs(self, host: str, cluster: str) -> set[str]:
        response = self.agent_get(host, f"/v1/clusters/{cluster}/peers")
        if response.status_code == 404:
            return set()
        response.raise_for_status()
        return {mac for peer in response.json()["peers"] for mac in peer["macs"]}

    def inside(self, host: str, argv: list[str]) -> str:
        return lab_hosts.exec_in(self.host(host), argv).stdout


@pytest.fixture(scope="module")
def lab(lab_image_dir: Path) -> Iterator[Lab]:
    require(os.path.exists("/usr/bin/unshare"), "needs util-linux unshare")
    settings = LabSettings(
        hosts=3,
        root=ROOT,
        subnet=SUBNET,
        bridge="halabt9",
        veth_prefix="halabtv",
        context_file=ROOT / "zone-client.json",
        agent_extra_toml=AGENT_EXTRA,
        image_dir=lab_image_dir,
    )
    down(settings, purge=True, progress=print)  # a crashed earlier run
    try:
        context = up(settings, progress=print)
        yield Lab(settings, context)
    finally:
        for host in settings.plan().hosts:
            log = host.command_log
            if log.exists() and not IN_CI:
                print(f"--- {host.name} agent log (tail)\n" + log.read_text()[-3000:])
        down(settings, purge=True, progress=print)


def test_agents_and_zone_use_client_certificates(lab: Lab) -> None:
    """Mutual TLS is on: every agent holds its certificate of the zone, its host token is
    spent (refused for a report and for another bootstrap), the zone holds no agent
    token, and an agent takes the zone's certificate and refuses a call without one."""
    ca = lab.settings.root / "ca" / "ca.crt"
    zone_pem = zone_dir(lab.settings.root) / "state" / "control-ca" / "zone-client.pem"
    for host in lab.plan.hosts:
        pem = host.state_dir / "zone-tls" / "client.pem"
        assert pem.stat().st_mode & 0o777 == 0o600
        assert "PRIVATE KEY" in pem.read_text()
        token = (host.config_dir / "zone-token").read_text().strip()
        with httpx.Client(
            base_url=lab.context.url,
            headers={"Authorization": f"Bearer {token}"},
            verify=ssl.create_default_context(cafile=ca),
            timeout=30,
        ) as spent:
            assert spent.put(f"/v1/hosts/{host.name}", json={}).status_code == 403
            again = spent.post(f"/v1/hosts/{host.name}/certificate", json={"csr": "x"})
            assert again.status_code == 403 and "already used" in again.text
        node = "/v1/clusters/nothing/nodes/n1"
        url = f"https://{host.address.ip}:8470"
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=ca)) as bare:
            assert bare.get(node).status_code == 401
        zone_tls = ssl.create_default_context(cafile=ca)
        zone_tls.load_cert_chain(zone_pem)
        with httpx.Client(base_url=url, verify=zone_tls) as as_zone:
            assert as_zone.get(node).status_code == 404  # past authentication
    db = zone_dir(lab.settings.root) / "state" / "zone.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        reports = [json.loads(row[0]) for row in conn.execute("SELECT report FROM hosts")]
    assert len(reports) == len(lab.plan.hosts)
    assert all(report.get("api_token") is None for report in reports)


def test_cluster_becomes_ready_with_masters_on_three_hosts(lab: Lab) -> None:
    view = lab.zone.put_cluster("demo", DEMO_SPEC)
    assert view["status"]["node_subnet"] == f"{DEMO_NET}.0/24"
    lab.wait_phase("demo", "Ready")
    nodes = lab.nodes("demo")
    assert sorted(nodes) == ["m1", "m2", "m3", "w1", "w2"]
    assert {nodes[m]["host"] for m in ("m1", "m2", "m3")} == {"h1", "h2", "h3"}
    for name, node in nodes.items():
        agent_node = lab.agent_get(node["host"], f"/v1/clusters/demo/nodes/{name}").json()
        assert agent_node["status"]["phase"] == "Ready"
        assert agent_node["spec"]["network"]["address"] == f"{node['address']}/24"
    domains = {h: lab.inside(h, ["virsh", "list", "--name"]).split() for h in ("h1", "h2", "h3")}
    assert sorted(d for names in domains.values() for d in names) == [
        f"demo-{n}" for n in ("m1", "m2", "m3", "w1", "w2")
    ]


def test_second_cluster_gets_its_own_network(lab: Lab) -> None:
    lab.ensure("demo", DEMO_SPEC)
    view = lab.zone.put_cluster("other", OTHER_SPEC)
    assert view["status"]["vni"] != lab.zone.cluster("demo")["status"]["vni"]
    lab.wait_phase("other", "Ready")
    assert lab.nodes("other")["m1"]["address"] == OTHER_M1


def test_new_worker_reaches_its_cluster_across_hosts_and_not_the_other(lab: Lab) -> None:
    # Forwarding turned on in every host after the clusters' bridges exist (as libvirt or
    # an operator might): the kernel turns it back on for every bridge too. The agent's
    # next rewire turns the bridges' switches off again; until then its per-bridge prohibit
    # rule keeps the clusters apart (shown alone in tests/integration/test_network_vxlan.py).
    lab.ensure_clusters()
    switch = f"net.ipv4.conf.habr{lab.zone.cluster('demo')['status']['vni']}.forwarding"
    for host in ("h1", "h2", "h3"):
        # The kernel rewrites every device's switch only when the value changes: 0, then 1.
        lab.inside(host, ["sysctl", "-w", "net.ipv4.ip_forward=0", "net.ipv4.ip_forward=1"])
        assert lab.inside(host, ["sysctl", "-n", switch]).strip() == "1", host
    spec = lab.zone.cluster("demo")["spec"]
    spec["workers"]["count"] = 3
    lab.zone.put_cluster("demo", spec)
    lab.wait_phase("demo", "Ready")
    nodes = lab.nodes("demo")
    w3 = nodes["w3"]
    guest = lab.agent_get(w3["host"], "/v1/clusters/demo/nodes/w3").json()["status"]["guest"]
    pings = guest["pings"]
    elsewhere = [n["address"] for n in nodes.values() if n["host"] != w3["host"]]
    assert elsewhere, "every node on one host: nothing crosses VXLAN"
    for address in elsewhere:
        assert pings[address] is True, (address, pings)
    assert pings[OTHER_M1] is False, pings
    mac = mac_address("demo", "w3")
    for host in {"h1", "h2", "h3"} - {w3["host"]}:
        assert mac in lab.peer_macs(host, "demo"), host


def test_scaling_down_updates_every_hosts_peers(lab: Lab) -> None:
    spec = lab.ensure("demo", DEMO_SPEC)["spec"]
    if spec["workers"]["count"] != 3:
        spec["workers"]["count"] = 3
        lab.zone.put_cluster("demo", spec)
        lab.wait_phase("demo", "Ready")
    w3_host = lab.nodes("demo")["w3"]["host"]
    spec["workers"]["count"] = 2
    lab.zone.put_cluster("demo", spec)
    poll(lambda: "w3" not in lab.nodes("demo"), 300, "w3 gone from the zone")
    response = lab.agent_get(w3_host, "/v1/clusters/demo/nodes/w3")
    assert response.status_code == 404
    mac = mac_address("demo", "w3")
    for host in ("h1", "h2", "h3"):
        poll(lambda host=host: mac not in lab.peer_macs(host, "demo"), 300, f"{host} without w3")
    assert lab.phase("demo") == "Ready"


def test_killed_agent_degrades_the_cluster_and_converges_when_back(lab: Lab) -> None:
    lab.ensure("demo", DEMO_SPEC)
    victim = lab.nodes("demo")["m2"]["host"]
    others = {"h1", "h2", "h3"} - {victim}
    before = {h: lab.inside(h, ["virsh", "list", "--name"]).split() for h in others}
    pids = agent_pids(lab.host(victim))
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    lab.wait_phase("demo", "Degraded", timeout_s=60)
    status = lab.zone.cluster("demo")["status"]
    assert f"host {victim} is not reporting" in status["message"]
    for node in status["nodes"]:
        assert node["phase"] == ("Unknown" if node["host"] == victim else "Ready"), node
    assert {h: lab.inside(h, ["virsh", "list", "--name"]).split() for h in others} == before
    # Its VMs keep running while the agent is away.
    assert "demo-m2" in lab.inside(victim, ["virsh", "list", "--name"]).split()
    start_agent(lab.host(victim))
    lab.wait_phase("demo", "Ready", timeout_s=120)


def test_zone_restarted_mid_creation_still_completes(lab: Lab) -> None:
    # Masters only: workers ping PING_TARGETS at boot, which this cluster cannot reach.
    spec = {
        "kubernetes_version": "1.31.2",
        "masters": {"count": 3, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
    }
    lab.zone.put_cluster("third", spec)
    stop_zone(lab.settings.root, timeout_s=0)  # SIGTERM, then SIGKILL at once
    start_zone(lab.settings, zone_dir(lab.settings.root) / "zone.toml", lab.context)
    lab.wait_phase("third", "Ready")


def test_deleting_leaves_nothing_on_any_host(lab: Lab) -> None:
    lab.ensure("demo", DEMO_SPEC)  # VMs on every host, whatever ran before
    clusters = [c["name"] for c in lab.zone.clusters()]
    for cluster in clusters:
        lab.zone.delete_cluster(cluster)
    for cluster in clusters:
        lab.zone.wait(cluster, "Gone", timeout_s=300)
    for host in ("h1", "h2", "h3"):
        assert lab.inside(host, ["virsh", "list", "--all", "--name"]).split() == [], host
        links = lab.inside(host, ["ip", "-o", "link", "show"])
        assert "habr" not in links and "havx" not in links, links
        assert lab.agent_get(host, "/v1/nodes").json()["items"] == []
        nodes_dir = lab.host(host).state_dir / "nodes"
        assert not nodes_dir.exists() or not any(nodes_dir.iterdir()), host
    assert lab.zone.clusters() == []
