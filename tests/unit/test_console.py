"""The serial console: its tail across virtlogd's rotation, the lines a Failed message
shows, the endpoint's bounds, and the boot timeout that puts those lines in the message."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hostagent import console
from hostagent.api import api_app
from hostagent.bootwatch import BootWatch
from hostagent.capacity import Resources
from hostagent.config import Config
from hostagent.images import ImageCatalog
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.nodes import NodeService
from hostagent.store import Store

KEY = NodeKey(cluster="alpha", name="m1")
SPEC = NodeSpec.model_validate(
    {
        "role": "worker",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_gib": 2,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
    }
)
TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_tail_reaches_into_the_rotated_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console.tail(log, 100) == b""
    log.with_name("console.log.0").write_bytes(b"older-" * 10)
    log.write_bytes(b"newest")
    assert console.tail(log, 6) == b"newest"
    assert console.tail(log, 10) == b"der-newest"
    assert console.tail(log, 1000) == b"older-" * 10 + b"newest"


def test_the_last_lines_are_sanitised() -> None:
    data = b"boot\r\n\x1b[1;31m[ 1.0] Kernel panic - not syncing: VFS\x1b[0m\r\n\x07\n" + (
        b"x" * 300 + b"\n"
    )
    lines = console.last_lines(data, count=2, width=50)
    assert lines == ["[ 1.0] Kernel panic - not syncing: VFS", "x" * 50]
    assert console.last_lines(b"\xff\xfeok\n") == ["\ufffd\ufffdok"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


async def test_a_guest_that_does_not_phone_home_fails_with_its_console(
    tmp_path: Path, store: Store
) -> None:
    await store.create(KEY, SPEC, "token")
    await store.set_phase(KEY, Phase.RUNNING, "")
    log = console.log_path(tmp_path, KEY)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"Linux version 6.1\r\n" * 50 + b"Kernel panic - not syncing: no init\r\n")
    now = time.time()
    watch = BootWatch(store, tmp_path, 300, 10, list, clock=lambda: now + 299)
    assert await watch.check() == []
    assert store.get(KEY).phase is Phase.RUNNING  # type: ignore[union-attr]
    late = BootWatch(store, tmp_path, 300, 10, list, clock=lambda: now + 301)
    assert await late.check() == [KEY]
    record = store.get(KEY)
    assert record is not None and record.phase is Phase.FAILED
    assert "did not phone home within 300s" in record.message
    assert "Linux version 6.1 | Kernel panic - not syncing: no init." in record.message
    assert record.message.count("Linux version") == 9  # the last 10 lines
    assert str(log) in record.message
    assert await late.check() == []  # Failed stays Failed, no second message
    assert [e.kind for e in store.events(KEY)][-1:] == ["failed"]
    assert store.events(KEY)[-1].message == record.message  # the node's events say why


@pytest.fixture
async def client(tmp_path: Path, store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    config = Config(host_id="h1", state_dir=tmp_path)
    physical = Resources(vcpus=8, memory_mib=8192, disk_gib=100)
    service = NodeService(config, store, ImageCatalog(tmp_path), physical, lambda _key: None)
    nothing: Any = None
    app = api_app(
        service,
        TOKEN,
        peers=nothing,
        host_info=nothing,
        healthy=nothing,
        metrics_text=nothing,
        images=nothing,
    )
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_the_console_endpoint_serves_the_tail_within_bounds(
    client: TestClient[Any, Any], store: Store, tmp_path: Path
) -> None:
    path = "/v1/clusters/alpha/nodes/m1/console"
    assert (await client.get(path, headers=AUTH)).status == 404  # no such node
    await store.create(KEY, SPEC, "token")
    empty = await client.get(path, headers=AUTH)
    assert (empty.status, await empty.text()) == (200, "")
    log = console.log_path(tmp_path / "nodes", KEY)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"a" * (2 * console.MAX_TAIL_BYTES) + b"end\n")
    whole = await client.get(path, headers=AUTH)
    assert whole.content_type == "text/plain"
    assert len(await whole.read()) == console.DEFAULT_TAIL_BYTES
    tail = await client.get(path, params={"tail_bytes": "4"}, headers=AUTH)
    assert await tail.text() == "end\n"
    most = await client.get(path, params={"tail_bytes": console.MAX_TAIL_BYTES}, headers=AUTH)
    assert len(await most.read()) == console.MAX_TAIL_BYTES
    for wrong in (str(console.MAX_TAIL_BYTES + 1), "0", "-1", "x"):
        refused = await client.get(path, params={"tail_bytes": wrong}, headers=AUTH)
        assert refused.status == 400, wrong
        assert (await refused.json())["error"]["code"] == "malformed"
