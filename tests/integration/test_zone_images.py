"""The zone's image catalogue and console relay with the real parts: a zone (`Zone`, SQLite,
its Deliverer) and three agents served on loopback (the agent's real API app, store, image
puller over common.http with qemu-img, node service; no reconciler, so a node stays as the
agent accepted it), each reporting to the zone with the agent's own report (zoneclient's
host_report, images included); an aiohttp server on loopback serves the image's files.

A cluster naming a catalogue image gets it on exactly the hosts it is placed on, verified,
before its nodes; an image with a wrong digest is the host's image failure in the cluster's
view, and the node is never sent; the console relay returns the agent's log within the
agent's bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from hostagent import console
from hostagent.capacity import Resources
from hostagent.config import ApiConfig, Config
from hostagent.imagepull import ImagePuller
from hostagent.imageservice import ImageService
from hostagent.model import NodeHealth, NodeKey
from hostagent.store import Store
from hostagent.zone.auth import host_token
from hostagent.zone.config import AgentsConfig, HostsConfig, ZoneServerConfig
from hostagent.zone.server import Zone
from hostagent.zoneclient import host_report
from tests.conftest import require
from tests.fakezone import free_port
from tests.integration.test_images import Files, agent_parts, file_server, qcow2, sha256

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[2]
AGENT_TOKEN = "agent-token-of-the-zone-images-test"
POOL = {"vcpus": 1, "memory_mib": 256, "disk_gib": 2}


@dataclass
class Host:
    id: str
    config: Config
    store: Store
    images: ImageService
    puller: ImagePuller
    server: TestServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def report(self) -> dict[str, Any]:
        body = host_report(
            self.config,
            api_token=AGENT_TOKEN,
            allocatable=Resources(8, 16384, 200),
            allocated=Resources(0, 0, 0),
            domain_type="qemu",
            records=self.store.all(),
            health=lambda _key: NodeHealth(),
            images=self.images.all(),
        )
        return {**body, "api_url": self.url}


@dataclass
class Lab:
    tmp_path: Path
    zone: Zone
    files: Files
    base: str
    session: aiohttp.ClientSession
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        token = (self.tmp_path / "zone" / "api-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = f"{self.zone.api_url}{path}"
        async with self.session.request(method, url, json=body, headers=self.auth) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def cli(self, *args: str) -> tuple[int, str]:
        """`hostagent ARGS --zone URL --zone-token T`: its exit code and output."""
        token = self.auth["Authorization"].removeprefix("Bearer ")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hostagent",
            *args,
            "--zone",
            self.zone.api_url,
            "--zone-token",
            token,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        async with asyncio.timeout(TIMEOUT_S):
            output, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, output.decode()

    async def heartbeats(self) -> None:
        secret = (self.tmp_path / "zone" / "host-secret").read_text().strip()
        while True:
            for host in self.hosts.values():
                headers = {"Authorization": f"Bearer {host_token(secret, host.id)}"}
                url = f"{self.zone.api_url}/v1/hosts/{host.id}"
                async with self.session.put(url, json=host.report(), headers=headers) as answer:
                    assert answer.status in (200, 201), await answer.text()
            await asyncio.sleep(0.2)

    def publish(self, prefix: str) -> dict[str, Any]:
        """A qcow2 image's three files on the server; the source naming them."""
        disk = qcow2(self.tmp_path / f"{prefix}disk.qcow2")
        kernel, initrd = f"{prefix}kernel".encode() * 1000, f"{prefix}initrd".encode() * 1000
        self.files.content.update(
            {f"{prefix}disk.qcow2": disk, f"{prefix}vmlinuz": kernel, f"{prefix}initrd.img": initrd}
        )
        return {
            "url": f"{self.base}/{prefix}disk.qcow2",
            "sha256": sha256(disk),
            "kernel": {"url": f"{self.base}/{prefix}vmlinuz", "sha256": sha256(kernel)},
            "initrd": {"url": f"{self.base}/{prefix}initrd.img", "sha256": sha256(initrd)},
            "cmdline": "console=ttyS0 root=/dev/vda",
        }


async def start_host(tmp_path: Path, index: int) -> Host:
    host_id = f"zi{index}"
    state = tmp_path / host_id
    config = Config.model_validate(
        {
            "host_id": host_id,
            "state_dir": str(state),
            "images": {"download_attempts": 2},
            "network": {"underlay_address": f"10.250.0.{10 + index}"},
        }
    )
    parts = agent_parts(config, AGENT_TOKEN)
    store, images, puller, app = parts.store, parts.images, parts.puller, parts.app
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Host(host_id, config, store, images, puller, server)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    require(shutil.which("qemu-img") is not None, "needs qemu-utils")
    files = Files()
    files_server = await file_server(files)
    zone = Zone(
        ZoneServerConfig(
            state_dir=tmp_path / "zone",
            api=ApiConfig(listen=f"127.0.0.1:{free_port()}"),
            hosts=HostsConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0),
            agents=AgentsConfig(retry_initial_s=0.1, retry_max_s=0.5, resync_interval_s=2.0),
        )
    )
    hosts: list[Host] = []
    beating: asyncio.Task[None] | None = None
    try:
        await zone.start()
        for i in (1, 2, 3):
            hosts.append(await start_host(tmp_path, i))
        async with aiohttp.ClientSession() as session:
            lab = Lab(tmp_path, zone, files, f"http://127.0.0.1:{files_server.port}", session)
            lab.hosts = {h.id: h for h in hosts}
            beating = asyncio.create_task(lab.heartbeats())

            async def registered() -> bool:
                _, body = await lab.call("GET", "/v1/hosts")
                return [h["state"] for h in body["items"]] == ["Ready"] * 3

            await until("the hosts to register", registered)
            yield lab
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
    finally:
        if beating is not None:
            beating.cancel()
        await zone.stop()
        for host in hosts:
            await host.server.close()
            await host.puller.close()
            host.store.close()
        await files_server.close()


async def until(what: str, check: Callable[[], Awaitable[Any]]) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def cluster(image: str) -> dict[str, Any]:
    return {
        "kubernetes_version": "1.31.2",
        "image": image,
        "masters": {"count": 1, **POOL},
        "workers": {"count": 1, **POOL},
    }


async def test_a_catalogue_image_reaches_the_placed_hosts_before_their_nodes(lab: Lab) -> None:
    source = lab.publish("debian-")
    status, image = await lab.call("PUT", "/v1/images/debian", source)
    assert status == 201, image
    status, view = await lab.call("PUT", "/v1/clusters/demo", cluster("debian"))
    assert status == 201, view
    placed = {n["host"] for n in view["status"]["nodes"]}
    assert len(placed) == 2

    async def nodes_arrived() -> bool:
        return all(lab.hosts[h].store.all() for h in placed)

    await until("the nodes on their hosts", nodes_arrived)
    for host_id in placed:
        host = lab.hosts[host_id]
        info = host.images.get("debian")
        assert info.status.phase == "Ready" and info.digest == image["digest"]  # verified
        (record,) = host.store.all()
        assert record.spec.image == "debian"
        assert record.updated_at >= host.store.image("debian").updated_at  # type: ignore[union-attr]
    (other,) = set(lab.hosts) - placed
    assert lab.hosts[other].store.image("debian") is None  # not placed there: not sent

    async def copies() -> Any:
        _, body = await lab.call("GET", "/v1/images/debian")
        return body if len(body["hosts"]) == 2 else None

    listed = await until("both copies in the catalogue's view", copies)
    assert {h["host"] for h in listed["hosts"]} == placed
    assert {h["phase"] for h in listed["hosts"]} == {"Ready"}
    assert listed["used_by"] == ["demo"]
    status, body = await lab.call("DELETE", "/v1/images/debian")
    assert status == 409 and "named by cluster demo" in body["error"]["message"]


async def test_a_wrong_digest_is_the_hosts_image_failure_and_no_node_is_sent(lab: Lab) -> None:
    source = {**lab.publish("broken-"), "sha256": "0" * 64}
    status, body = await lab.call("PUT", "/v1/images/broken", source)
    assert status == 201, body
    status, view = await lab.call("PUT", "/v1/clusters/bad", cluster("broken"))
    assert status == 201, view

    async def failed() -> Any:
        _, body = await lab.call("GET", "/v1/clusters/bad")
        nodes = body["status"]["nodes"]
        return body if all(n["phase"] == "Failed" for n in nodes) else None

    seen = await until("the image failure in the cluster's view", failed)
    assert seen["status"]["phase"] == "Degraded"
    for node in seen["status"]["nodes"]:
        message = node["message"]
        assert message.startswith(f"host {node['host']} could not pull image broken:"), message
        assert "sha256" in message
        assert lab.hosts[node["host"]].store.all() == []  # the node never went
    _, listed = await lab.call("GET", "/v1/images/broken")
    assert {h["phase"] for h in listed["hosts"]} == {"Failed"}


async def test_the_console_is_relayed_within_the_agents_bounds(lab: Lab) -> None:
    await lab.call("PUT", "/v1/images/debian", lab.publish("debian-"))
    status, view = await lab.call("PUT", "/v1/clusters/logs", cluster("debian"))
    assert status == 201, view
    node = next(n for n in view["status"]["nodes"] if n["name"] == "m1")
    host = lab.hosts[node["host"]]
    key = NodeKey(cluster="logs", name="m1")

    async def arrived() -> bool:
        return host.store.get(key) is not None

    await until("the node on its host", arrived)
    status, text = await lab.call("GET", "/v1/clusters/logs/nodes/m1/console")
    assert (status, text) == (200, "")  # never started: no log yet
    log = console.log_path(host.config.nodes_dir, key)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"early boot\n" + b"x" * 100 + b"\nKernel panic - not syncing\n")
    status, text = await lab.call("GET", "/v1/clusters/logs/nodes/m1/console?tail_bytes=27")
    assert (status, text) == (200, "Kernel panic - not syncing\n")
    status, text = await lab.call("GET", "/v1/clusters/logs/nodes/m1/console")
    assert status == 200 and text.startswith("early boot\n")
    for bad in ("0", str(console.MAX_TAIL_BYTES + 1), "ten"):
        path = f"/v1/clusters/logs/nodes/m1/console?tail_bytes={bad}"
        status, body = await lab.call("GET", path)
        assert status == 400 and "tail_bytes" in body["error"]["message"]
    status, body = await lab.call("GET", "/v1/clusters/logs/nodes/m9/console")
    assert status == 404 and "has no node m9" in body["error"]["message"]
    status, body = await lab.call("GET", "/v1/clusters/nope/nodes/m1/console")
    assert status == 404


async def test_the_cli_pushes_lists_and_removes_images_and_reads_a_console(lab: Lab) -> None:
    source = lab.publish("cli-")
    kernel, initrd = source["kernel"], source["initrd"]
    code, out = await lab.cli(
        "image", "push", "cli-image", "--url", source["url"], "--sha256", source["sha256"],
        "--kernel-url", kernel["url"], "--kernel-sha256", kernel["sha256"],
        "--initrd-url", initrd["url"], "--initrd-sha256", initrd["sha256"],
        "--cmdline", source["cmdline"],
    )  # fmt: skip
    assert code == 0 and out.startswith("image cli-image: sha256:"), out
    code, out = await lab.cli("image", "push", "bad", "--url", source["url"], "--sha256", "x")
    assert code != 0 and "sha256" in out, out  # the zone's 422, said
    status, view = await lab.call("PUT", "/v1/clusters/cli", cluster("cli-image"))
    assert status == 201, view
    code, out = await lab.cli("image", "list", "-o", "json")
    assert code == 0, out
    (listed,) = json.loads(out)["items"]
    assert listed["name"] == "cli-image" and listed["used_by"] == ["cli"]
    host = lab.hosts[next(n["host"] for n in view["status"]["nodes"] if n["name"] == "w1")]
    key = NodeKey(cluster="cli", name="w1")

    async def arrived() -> bool:
        return host.store.get(key) is not None

    await until("the node on its host", arrived)
    log = console.log_path(host.config.nodes_dir, key)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"booting\nlogin: \n")
    code, out = await lab.cli("cluster", "console", "cli", "w1", "--tail-bytes", "8")
    assert (code, out) == (0, "login: \n")
    code, out = await lab.cli("image", "rm", "cli-image")
    assert code != 0 and "named by cluster cli" in out, out
    status, _ = await lab.call("PUT", "/v1/images/spare", source)  # named by no cluster
    assert status == 201
    code, out = await lab.cli("image", "rm", "spare")
    assert code == 0 and "removed from the zone's catalogue" in out, out
    code, out = await lab.cli("image", "list")
    assert code == 0 and "cli-image" in out and "spare" not in out, out
