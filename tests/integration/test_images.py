"""Pulled images with the real parts: an HTTP server on loopback (aiohttp) serves the files,
the agent's API (real app, store, puller over common.http, qemu-img) pulls, verifies,
stores them by digest; nodes wait for an image still downloading; an image in use cannot
be deleted; an unused one is collected after its time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_mock import MockerFixture

from common import http
from hostagent.api import api_app
from hostagent.capacity import Resources
from hostagent.certificates import make_backend
from hostagent.config import Config
from hostagent.daemon import Agent as DaemonAgent
from hostagent.errors import ImageNotReady
from hostagent.imagecache import ImageCollector
from hostagent.imagepull import ImagePuller
from hostagent.images import ImageCatalog, ImageLayout
from hostagent.imageservice import ImageService
from hostagent.imagesource import ImagePhase
from hostagent.metrics import Metrics
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.networks import StoredPeers
from hostagent.nodes import NodeService
from hostagent.provisioner import Provisioner
from hostagent.reconciler import Reconciler
from hostagent.store import Store
from hostagent.virt.libvirt import Libvirt
from tests.conftest import require, require_libvirt
from tests.fakezone import free_port

pytestmark = pytest.mark.integration

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 60.0
SPEC: dict[str, Any] = {
    "role": "worker",
    "vcpus": 1,
    "memory_mib": 256,
    "disk_gib": 2,
    "image": "pulled",
    "kubernetes_version": "1.31.2",
    "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Files:
    """What the loopback server serves, by path; a path in `held` sends its first half
    and then waits for the event to be set."""

    content: dict[str, bytes] = field(default_factory=dict)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    gets: list[str] = field(default_factory=list)
    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=dict
    )


FILES = web.AppKey("files", Files)


async def serve_file(request: web.Request) -> web.StreamResponse:
    files = request.app[FILES]
    path = request.match_info["path"]
    files.gets.append(path)
    if path in files.handlers:
        return await files.handlers[path](request)
    if path not in files.content:
        raise web.HTTPNotFound()
    data = files.content[path]
    response = web.StreamResponse(headers={"Content-Length": str(len(data))})
    await response.prepare(request)
    gate = files.held.get(path)
    if gate is not None:
        await response.write(data[: len(data) // 2])
        await gate.wait()
        data = data[len(data) // 2 :]
    await response.write(data)
    await response.write_eof()
    return response


@dataclass
class Agent:
    client: TestClient[Any, Any]
    files: Files
    base: str
    store: Store
    service: NodeService
    images: ImageService
    puller: ImagePuller
    layout: ImageLayout
    metrics: Metrics
    config: Config


def qcow2(path: Path) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path.read_bytes()


@dataclass
class AgentParts:
    """An agent's image and node parts, wired as the daemon wires them, and its API."""

    store: Store
    layout: ImageLayout
    puller: ImagePuller
    metrics: Metrics
    images: ImageService
    service: NodeService
    app: web.Application


def agent_parts(config: Config, token: str) -> AgentParts:
    store = Store(config.database)
    layout = ImageLayout(config.pulled_images)
    puller: ImagePuller
    metrics = Metrics(dict, lambda: 0, dict, dict, image_bytes=lambda: puller.held_bytes())
    puller = ImagePuller(
        store, layout, config.image_cache, qemu_img_timeout_s=30, counted=metrics.image_pulled
    )
    catalog = ImageCatalog(config.images, puller)
    images = ImageService(store, catalog, puller)
    service = NodeService(config, store, catalog, Resources(8, 16384, 200), lambda _key: None)

    async def nothing() -> dict[str, Any]:
        return {}

    async def healthy() -> bool:
        return True

    app = api_app(
        service,
        token,
        peers=StoredPeers(store, lambda _cluster: None),
        host_info=nothing,
        healthy=healthy,
        metrics_text=metrics.render,
        images=images,
    )
    return AgentParts(store, layout, puller, metrics, images, service, app)


async def file_server(files: Files) -> TestServer:
    """A loopback HTTP server of files (started)."""
    app = web.Application()
    app[FILES] = files
    app.router.add_get("/{path}", serve_file)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    require(shutil.which("qemu-img") is not None, "needs qemu-utils")
    files = Files()
    server = await file_server(files)
    config = Config.model_validate(
        {"host_id": "h1", "state_dir": str(tmp_path), "images": {"download_attempts": 2}}
    )
    parts = agent_parts(config, TOKEN)
    store, layout, puller, metrics = parts.store, parts.layout, parts.puller, parts.metrics
    images, service, app = parts.images, parts.service, parts.app
    try:
        async with TestClient(TestServer(app)) as client:
            yield Agent(
                client,
                files,
                f"http://127.0.0.1:{server.port}",
                store,
                service,
                images,
                puller,
                layout,
                metrics,
                config,
            )
    finally:
        for gate in files.held.values():
            gate.set()
        await puller.close()
        await server.close()
        store.close()


def publish(agent: Agent, tmp_path: Path, prefix: str = "") -> dict[str, Any]:
    """A qcow2 image's three files on the server; the source naming them."""
    disk = qcow2(tmp_path / f"{prefix}disk.qcow2")
    kernel, initrd = f"{prefix}kernel".encode() * 1000, f"{prefix}initrd".encode() * 1000
    agent.files.content.update(
        {f"{prefix}disk.qcow2": disk, f"{prefix}vmlinuz": kernel, f"{prefix}initrd.img": initrd}
    )
    return {
        "url": f"{agent.base}/{prefix}disk.qcow2",
        "sha256": sha256(disk),
        "kernel": {"url": f"{agent.base}/{prefix}vmlinuz", "sha256": sha256(kernel)},
        "initrd": {"url": f"{agent.base}/{prefix}initrd.img", "sha256": sha256(initrd)},
        "cmdline": "console=ttyS0 root=/dev/vda",
    }


async def until(what: str, check: Callable[[], Awaitable[Any]]) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def phase_of(agent: Agent, name: str, phase: str) -> dict[str, Any] | None:
    response = await agent.client.get(f"/v1/images/{name}", headers=AUTH)
    body: dict[str, Any] = await response.json()
    return body if body["status"]["phase"] == phase else None


async def put_image(agent: Agent, name: str, source: dict[str, Any], status: int) -> Any:
    response = await agent.client.put(f"/v1/images/{name}", json=source, headers=AUTH)
    assert response.status == status, await response.text()
    return await response.json()


async def test_an_image_is_pulled_verified_and_stored_by_digest(
    agent: Agent, tmp_path: Path
) -> None:
    source = publish(agent, tmp_path)
    created = await put_image(agent, "pulled", source, 201)
    assert created["status"]["phase"] == "Downloading"
    ready = await until("Ready", lambda: phase_of(agent, "pulled", "Ready"))
    total = sum(len(agent.files.content[p]) for p in ("disk.qcow2", "vmlinuz", "initrd.img"))
    assert ready["status"]["bytes_done"] == ready["status"]["bytes_total"] == total
    digest = ready["digest"].removeprefix("sha256:")
    folder = agent.layout.folder(digest)
    assert json.loads((folder / "image.json").read_text())["cmdline"] == source["cmdline"]
    image = agent.images.catalog.get("pulled")
    assert image is not None and image.disk == folder / "disk.qcow2"
    assert image.disk.read_bytes() == agent.files.content["disk.qcow2"]
    assert not any(agent.layout.partial.iterdir())
    # The same source again changes nothing and downloads nothing.
    gets = len(agent.files.gets)
    assert (await put_image(agent, "pulled", source, 200))["status"]["phase"] == "Ready"
    assert len(agent.files.gets) == gets
    listed = await (await agent.client.get("/v1/images", headers=AUTH)).json()
    assert [item["name"] for item in listed["items"]] == ["pulled"]
    metrics = agent.metrics.render().decode()
    assert 'hostagent_image_pulls_total{result="ready"} 1.0' in metrics
    held = total + (folder / "image.json").stat().st_size
    assert agent.puller.held_bytes() == held
    assert f"hostagent_image_bytes {float(held)}" in metrics


async def test_a_wrong_digest_is_refused_and_nothing_stays(agent: Agent, tmp_path: Path) -> None:
    source = publish(agent, tmp_path)
    wrong = "0" * 64
    source["kernel"]["sha256"] = wrong
    await put_image(agent, "pulled", source, 201)
    failed = await until("Failed", lambda: phase_of(agent, "pulled", "Failed"))
    actual = sha256(agent.files.content["vmlinuz"])
    message = failed["status"]["message"]
    assert f"kernel: sha256 mismatch: expected {wrong}, got {actual}" in message
    assert not agent.layout.by_digest.exists() or not any(agent.layout.by_digest.iterdir())
    assert not any(agent.layout.partial.iterdir())
    assert agent.images.catalog.get("pulled") is None
    # A node cannot name it: 422 with why.
    response = await agent.client.put("/v1/clusters/c1/nodes/w1", json=SPEC, headers=AUTH)
    assert response.status == 422
    assert "could not be pulled: kernel: sha256 mismatch" in await response.text()
    assert 'hostagent_image_pulls_total{result="failed"} 1.0' in agent.metrics.render().decode()


async def test_a_missing_file_fails_the_pull_with_the_servers_answer(
    agent: Agent, tmp_path: Path
) -> None:
    source = publish(agent, tmp_path)
    del agent.files.content["initrd.img"]
    await put_image(agent, "pulled", source, 201)
    failed = await until("Failed", lambda: phase_of(agent, "pulled", "Failed"))
    assert failed["status"]["message"].startswith("initrd: GET http://127.0.0.1:")
    assert "answered 404 Not Found" in failed["status"]["message"]


async def test_a_node_naming_a_downloading_image_waits_for_it(agent: Agent, tmp_path: Path) -> None:
    source = publish(agent, tmp_path)
    agent.files.held["disk.qcow2"] = gate = asyncio.Event()
    await put_image(agent, "pulled", source, 201)

    async def half() -> Any:
        image = await phase_of(agent, "pulled", "Downloading")
        return image and image["status"]["bytes_total"] and image["status"]["bytes_done"]

    await until("half of the disk", half)
    response = await agent.client.put("/v1/clusters/c1/nodes/w1", json=SPEC, headers=AUTH)
    assert response.status == 201, await response.text()
    provisioner = Provisioner(
        agent.config,
        agent.images.catalog,
        *([None] * 5),  # type: ignore[arg-type]  # libvirt, netlink, ...: not reached
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        image_waiting=agent.images.waiting,
    )
    spec = NodeSpec.model_validate(SPEC)
    with pytest.raises(ImageNotReady, match=r"waiting for image 'pulled': \d+ % downloaded"):
        provisioner.image(spec)
    gate.set()
    await until("Ready", lambda: phase_of(agent, "pulled", "Ready"))
    assert provisioner.image(spec).disk.read_bytes() == agent.files.content["disk.qcow2"]


async def test_an_image_in_use_is_not_deleted_an_unused_one_is(
    agent: Agent, tmp_path: Path
) -> None:
    await put_image(agent, "pulled", publish(agent, tmp_path), 201)
    await put_image(agent, "spare", publish(agent, tmp_path, "spare-"), 201)
    for name in ("pulled", "spare"):
        await until(name, lambda name=name: phase_of(agent, name, "Ready"))  # type: ignore[misc]
    response = await agent.client.put("/v1/clusters/c1/nodes/w1", json=SPEC, headers=AUTH)
    assert response.status == 201
    refused = await agent.client.delete("/v1/images/pulled", headers=AUTH)
    assert refused.status == 409
    assert "image 'pulled' is used by c1/w1; delete them first" in await refused.text()
    # Nor can it get other content while the node names it.
    other = publish(agent, tmp_path, "other-")
    await put_image(agent, "pulled", other, 409)
    spare = agent.layout.folder((await phase_of(agent, "spare", "Ready") or {})["digest"][7:])
    assert spare.is_dir()
    deleted = await agent.client.delete("/v1/images/spare", headers=AUTH)
    assert deleted.status == 204
    assert not spare.exists()
    assert (await agent.client.get("/v1/images/spare", headers=AUTH)).status == 404
    assert agent.images.catalog.get("pulled") is not None


async def test_a_tar_of_an_image_folder_is_pulled(agent: Agent, tmp_path: Path) -> None:
    folder = tmp_path / "lab"
    folder.mkdir()
    qcow2(folder / "disk.qcow2")
    (folder / "vmlinuz").write_bytes(b"k" * 4096)
    (folder / "initrd.img").write_bytes(b"i" * 4096)
    manifest = {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"}
    (folder / "image.json").write_text(json.dumps({**manifest, "cmdline": "x", "recipe": "r"}))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(folder, arcname="lab")
    agent.files.content["lab.tar"] = archive.getvalue()
    source = {"url": f"{agent.base}/lab.tar", "sha256": sha256(archive.getvalue()), "format": "tar"}
    await put_image(agent, "from-tar", source, 201)
    await until("Ready", lambda: phase_of(agent, "from-tar", "Ready"))
    image = agent.images.catalog.get("from-tar")
    assert image is not None and image.cmdline == "x"
    assert image.kernel.read_bytes() == b"k" * 4096


async def test_an_unused_image_is_collected_after_its_time(agent: Agent, tmp_path: Path) -> None:
    await put_image(agent, "pulled", publish(agent, tmp_path), 201)
    await put_image(agent, "spare", publish(agent, tmp_path, "spare-"), 201)
    for name in ("pulled", "spare"):
        await until(name, lambda name=name: phase_of(agent, name, "Ready"))  # type: ignore[misc]
    response = await agent.client.put("/v1/clusters/c1/nodes/w1", json=SPEC, headers=AUTH)
    assert response.status == 201
    spare = agent.layout.folder(agent.store.image("spare").digest)  # type: ignore[union-attr]
    held = agent.puller.held_bytes()
    freed: list[int] = []
    ttl = agent.config.image_cache.unused_ttl_s
    now = time.time()
    early = ImageCollector(agent.store, agent.puller, agent.config.image_cache, freed.append, list)
    assert await early.collect() == []  # within its time: kept
    late = ImageCollector(
        agent.store,
        agent.puller,
        agent.config.image_cache,
        agent.metrics.image_removed,
        list,
        clock=lambda: now + ttl + 60,
    )
    assert await late.collect() == ["spare"]
    assert not spare.exists()
    assert agent.store.image("pulled") is not None  # named by a node: kept however old
    assert agent.images.catalog.get("pulled") is not None
    removed = held - agent.puller.held_bytes()
    assert removed > 0
    metrics = agent.metrics.render().decode()
    assert f"hostagent_image_removed_bytes_total {float(removed)}" in metrics
    # Once its node is gone, the other one goes too.
    await agent.store.remove(next(r.key for r in agent.store.all()))
    assert await early.collect() == []  # unused from now on: its time starts
    assert await late.collect() == ["pulled"]
    assert agent.puller.held_bytes() == 0


async def test_a_failed_copy_of_the_same_content_keeps_nothing(
    agent: Agent, tmp_path: Path
) -> None:
    """A corrupted copy under another name fails; the good one (the same digest: the same
    content) is collected all the same once unused, the failed record staying."""
    source = publish(agent, tmp_path)
    disk = agent.files.content["disk.qcow2"]
    agent.files.content["corrupt.qcow2"] = disk[:-1] + bytes([disk[-1] ^ 0xFF])
    await put_image(agent, "bad", {**source, "url": f"{agent.base}/corrupt.qcow2"}, 201)
    await until("Failed", lambda: phase_of(agent, "bad", "Failed"))
    await put_image(agent, "pulled", source, 201)
    ready = await until("Ready", lambda: phase_of(agent, "pulled", "Ready"))
    folder = agent.layout.folder(ready["digest"].removeprefix("sha256:"))
    assert agent.store.image("bad").digest == folder.name  # type: ignore[union-attr]
    late = ImageCollector(
        agent.store,
        agent.puller,
        agent.config.image_cache,
        agent.metrics.image_removed,
        list,
        clock=lambda: time.time() + agent.config.image_cache.unused_ttl_s + 60,
    )
    assert await late.collect() == ["pulled"]
    assert not folder.exists()
    assert agent.puller.held_bytes() == 0
    assert agent.store.image("bad").phase is ImagePhase.FAILED  # type: ignore[union-attr]


async def test_a_node_waits_for_its_image_then_boots_from_it(
    agent: Agent, tmp_path: Path, mocker: MockerFixture
) -> None:
    """The real Reconciler and Provisioner on libvirt's in-process test driver: the node
    waits Pending while its image downloads (no attempt counted), then its overlay is made
    on the pulled disk and its domain started. The host network is the one stand-in."""
    config = Config.model_validate(
        {
            "host_id": "h1",
            "state_dir": str(agent.config.state_dir),
            "libvirt": {"uri": "test:///default", "qemu_user": pwd.getpwuid(os.getuid()).pw_name},
            "reconciler": {"max_attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        }
    )
    virt = Libvirt(config.libvirt.uri, workers=2, on_lifecycle=print, on_reconnect=print)
    virt._conn = libvirt.open(config.libvirt.uri)  # connect() minus the keepalive
    virt.connected.set()
    provisioner = Provisioner(
        config,
        agent.images.catalog,
        virt,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "test",
        None,  # type: ignore[arg-type]
        make_backend(config),
        None,  # type: ignore[arg-type]
        image_waiting=agent.images.waiting,
    )
    mocker.patch.object(provisioner, "ensure_networks", mocker.AsyncMock(return_value=None))
    reconciler = Reconciler(agent.store, provisioner, config.reconciler, agent.metrics, "h1", 1.0)
    key = NodeKey(cluster=f"img{secrets.token_hex(4)}", name="w1")
    source = publish(agent, tmp_path)
    agent.files.held["disk.qcow2"] = gate = asyncio.Event()
    await put_image(agent, "pulled", source, 201)
    running = asyncio.create_task(reconciler.run())
    try:
        path = f"/v1/clusters/{key.cluster}/nodes/{key.name}"
        master = {**SPEC, "role": "master"}  # a worker would need its cluster's masters
        response = await agent.client.put(path, json=master, headers=AUTH)
        assert response.status == 201
        reconciler.enqueue(key)

        def waiting() -> Any:
            record = agent.store.get(key)
            return record and re.fullmatch(
                r"waiting for image 'pulled': \d+ % downloaded", record.message
            )

        await until("the node to wait", lambda: asyncio.sleep(0, waiting()))
        assert agent.store.get(key).phase is Phase.PENDING  # type: ignore[union-attr]
        gate.set()

        def phase() -> Any:
            record = agent.store.get(key)
            assert record is not None and record.phase is not Phase.FAILED, record
            return record.phase is Phase.RUNNING

        await until("the node to run", lambda: asyncio.sleep(0, phase()))
        assert agent.metrics.registry.get_sample_value("hostagent_reconcile_errors_total") == 0
        image = agent.images.catalog.get("pulled")
        assert image is not None
        overlay = config.nodes_dir / key.cluster / key.name / "disk.qcow2"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", "-U", str(overlay)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        assert info["backing-filename"] == str(image.disk)
        assert await virt.is_active(key.domain)
        refused = await agent.client.delete("/v1/images/pulled", headers=AUTH)
        assert refused.status == 409
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        conn = libvirt.open(config.libvirt.uri)
        with contextlib.suppress(libvirt.libvirtError):
            domain = conn.lookupByName(key.domain)
            domain.destroy()
            domain.undefine()
        conn.close()
        await virt.close()


async def test_a_download_cut_off_resumes_where_it_stopped(agent: Agent, tmp_path: Path) -> None:
    """The server drops the connection half-way through the disk once; the next GET asks
    for the rest (Range) and the whole still hashes to the digest."""
    source = publish(agent, tmp_path)
    data = agent.files.content.pop("disk.qcow2")
    ranges: list[str | None] = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()  # cut off
            return response
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
        return web.Response(
            status=206,
            body=data[start:],
            headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
        )

    agent.files.handlers["disk.qcow2"] = flaky
    await put_image(agent, "pulled", source, 201)
    ready = await until("Ready", lambda: phase_of(agent, "pulled", "Ready"))
    assert ranges == [None, f"bytes={len(data) // 2}-"]
    image = agent.images.catalog.get("pulled")
    assert image is not None and image.disk.read_bytes() == data
    assert ready["status"]["bytes_done"] == ready["status"]["bytes_total"]


async def test_a_restarted_agent_pulls_again_what_was_under_way(
    agent: Agent, tmp_path: Path
) -> None:
    source = publish(agent, tmp_path)
    agent.files.held["disk.qcow2"] = gate = asyncio.Event()
    await put_image(agent, "pulled", source, 201)
    await until("the disk to start", lambda: asyncio.sleep(0, "disk.qcow2" in agent.files.gets))
    await agent.puller.close()  # the agent stops: the record stays Downloading
    leftover = agent.layout.partial / "pulled-killed"
    leftover.mkdir()
    (leftover / "disk").write_bytes(b"half")
    gate.set()
    assert agent.store.image("pulled").phase is ImagePhase.DOWNLOADING  # type: ignore[union-attr]
    await agent.puller.start()
    await until("Ready", lambda: phase_of(agent, "pulled", "Ready"))
    assert not leftover.exists()


async def test_the_agent_pulls_through_its_api_and_collects_what_nothing_uses(
    agent: Agent, tmp_path: Path
) -> None:
    """The whole agent (hostagent serve's Agent, real libvirtd) with a short unused_ttl_s:
    the image comes through its API, shows in /metrics, and its collection loop removes it
    once it has been unused for its time."""
    require_libvirt()
    source = publish(agent, tmp_path)
    state = Path(tempfile.mkdtemp(prefix="hostagent-images-", dir="/var/tmp"))
    state.chmod(0o711)
    config = Config.model_validate(
        {
            "host_id": "images16-agent",
            "state_dir": str(state),
            "api": {"listen": f"127.0.0.1:{free_port()}"},
            "libvirt": {"domain_type": "qemu"},
            "images": {"unused_ttl_s": 2, "gc_interval_s": 0.2},
        }
    )
    daemon = DaemonAgent(config)
    try:
        await daemon.start()
        async with http.async_client(f"http://{config.api.listen}", token=daemon.token) as client:
            created = await client.put("/v1/images/pulled", json=source)
            assert created.status_code == 201, created.text

            async def ready() -> Any:
                image = (await client.get("/v1/images/pulled")).json()
                return image if image["status"]["phase"] == "Ready" else None

            image = await until("Ready", ready)
            folder = Path(config.images) / ".pulled" / "sha256" / image["digest"][7:]
            assert folder.is_dir()
            metrics = (await client.get("/metrics")).text
            assert 'hostagent_images{phase="Ready"} 1.0' in metrics

            async def collected() -> bool:
                return (await client.get("/v1/images/pulled")).status_code == 404

            started = time.monotonic()
            await until("collected", collected)
            assert time.monotonic() - started > 1.0  # not before its time
            assert not folder.exists()
            metrics = (await client.get("/metrics")).text
            assert "hostagent_image_bytes 0.0" in metrics
            assert "hostagent_image_removed_bytes_total 0.0" not in metrics
    finally:
        await daemon.stop()
        shutil.rmtree(state)


async def test_a_redirect_is_followed(agent: Agent, tmp_path: Path) -> None:
    source = publish(agent, tmp_path)

    async def moved(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/disk.qcow2")

    agent.files.handlers["old-disk.qcow2"] = moved
    source["url"] = f"{agent.base}/old-disk.qcow2"
    await put_image(agent, "pulled", source, 201)
    await until("Ready", lambda: phase_of(agent, "pulled", "Ready"))
    assert agent.files.gets.count("disk.qcow2") == 1
