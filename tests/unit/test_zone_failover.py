"""Zone URLs as a list: the agent's heartbeat, its PKI through the zone and the CLI move on
from a replica that is unreachable or answers 503 to the next, and stay there; other
answers do not move them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.failover import Urls, first_serving, split_urls
from hostagent.client import ApiError
from hostagent.config import ZoneConfig
from hostagent.zone.client import ZoneClient as CliClient
from hostagent.zone.client import ZoneContext, resolve_context
from hostagent.zoneclient import ZoneClient
from pki.backend import CaName
from pki.errors import BackendUnavailable
from pki.local import LocalBackend
from pki.zone import ZoneBackend, ZoneSettings
from tests.fakezone import FakeZone, free_port

TOKEN = "host-token-h1"


def test_urls_go_round_from_the_current_one() -> None:
    urls = Urls(["http://a/", "http://b", "http://c"])
    assert urls.round() == ["http://a", "http://b", "http://c"]
    urls.failed("http://a")
    assert urls.current == "http://b"
    assert urls.round() == ["http://b", "http://c", "http://a"]
    urls.failed("http://a")  # an older call's failure moves nothing
    assert urls.current == "http://b"
    assert split_urls(" http://a, http://b ,") == ["http://a", "http://b"]
    with pytest.raises(ValueError):
        Urls([])


async def test_first_serving_stops_at_an_error_that_does_not_move_on() -> None:
    urls = Urls(["a", "b", "c"])
    tried: list[str] = []

    async def attempt(url: str) -> str:
        tried.append(url)
        if url == "a":
            raise ConnectionError(url)
        if url == "b":
            raise PermissionError(url)
        return url

    with pytest.raises(PermissionError):
        await first_serving(urls, attempt, lambda e: isinstance(e, ConnectionError))
    assert tried == ["a", "b"] and urls.current == "b"
    with pytest.raises(PermissionError):  # every URL failing: the last error
        await first_serving(Urls(["b"]), attempt, lambda e: True)


def test_the_agents_zone_url_may_be_a_list(tmp_path: Path) -> None:
    token = tmp_path / "t"
    one = ZoneConfig(url="https://10.0.0.1:8471", token_file=token)
    assert one.urls == ("https://10.0.0.1:8471",)
    several = ZoneConfig.model_validate(
        {"url": ["https://10.0.0.1:8471", "https://10.0.0.2:8471"], "token_file": token}
    )
    assert several.url == "https://10.0.0.1:8471"
    assert several.urls == ("https://10.0.0.1:8471", "https://10.0.0.2:8471")
    with pytest.raises(ValueError, match="url"):
        ZoneConfig.model_validate({"url": ["https://10.0.0.1:8471", "http://10.0.0.2:1"]})
    with pytest.raises(ValueError, match="empty"):
        ZoneConfig.model_validate({"url": [], "token_file": token})


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[FakeZone, FakeZone, list[str]]]:
    """A dead replica (nothing listens), one that answers 503, one that serves."""
    busy = FakeZone({"h1": TOKEN}, heartbeat_interval_s=0.02, failures=[503] * 100)
    good = FakeZone({"h1": TOKEN}, heartbeat_interval_s=0.02)
    async with TestServer(busy.app()) as b, TestServer(good.app()) as g:
        urls = [f"http://127.0.0.1:{free_port()}"]
        urls += [str(s.make_url("")).rstrip("/") for s in (b, g)]
        yield busy, good, urls


async def test_the_agent_beats_to_the_first_replica_that_serves(
    replicas: tuple[FakeZone, FakeZone, list[str]],
) -> None:
    busy, good, urls = replicas
    beats = ZoneClient(urls[0], "h1", TOKEN, lambda: {"x": 1}, urls=urls, timeout_s=2.0)
    async with beats.session() as session:
        assert await beats.beat(session)
        assert beats.status().url == urls[2] and beats.status().connected
        assert len(good.reports) == 1 and len(busy.headers) == 1  # the 503 was tried once
        assert await beats.beat(session)  # it stays on the replica that serves
        assert len(good.reports) == 2 and len(busy.headers) == 1


async def test_the_agent_does_not_move_on_from_a_refusal(
    replicas: tuple[FakeZone, FakeZone, list[str]],
) -> None:
    _, good, urls = replicas
    refusing = FakeZone({"h1": "another-token"})
    async with TestServer(refusing.app()) as server:
        first = str(server.make_url("")).rstrip("/")
        beats = ZoneClient(first, "h1", TOKEN, lambda: {}, urls=[first, urls[2]])
        async with beats.session() as session:
            assert not await beats.beat(session)
    assert beats.status().last_error is not None and "401" in beats.status().last_error
    assert good.reports == []


async def test_the_cli_calls_the_first_replica_that_serves(tmp_path: Path) -> None:
    calls: list[str] = []

    async def unavailable(request: web.Request) -> web.Response:
        calls.append("busy")
        body = {"error": {"code": "store_unavailable", "message": "etcd is away"}}
        return web.json_response(body, status=503)

    async def clusters(request: web.Request) -> web.Response:
        calls.append("good")
        return web.json_response({"items": [{"name": "demo"}]})

    async def not_found(request: web.Request) -> web.Response:
        calls.append("good")
        return web.json_response({"error": {"code": "not_found", "message": "no"}}, status=404)

    busy, good = web.Application(), web.Application()
    busy.router.add_get("/v1/clusters", unavailable)
    good.router.add_get("/v1/clusters", clusters)
    good.router.add_get("/v1/clusters/{c}", not_found)
    async with TestServer(busy) as b, TestServer(good) as g:
        dead = f"http://127.0.0.1:{free_port()}"
        urls = ",".join([dead, str(b.make_url("")), str(g.make_url(""))])
        context = resolve_context(urls, "admin", None, {})
        assert len(context.urls) == 3
        client = CliClient(context, timeout_s=2.0)
        try:
            items: list[dict[str, Any]] = await asyncio.to_thread(client.clusters)
            assert items == [{"name": "demo"}]
            assert calls == ["busy", "good"]
            with pytest.raises(ApiError) as refused:  # a 404 is an answer: no failover
                await asyncio.to_thread(client.cluster, "nope")
            assert refused.value.status == 404 and calls[-1] == "good"
        finally:
            client.close()
    saved = tmp_path / "ctx.json"
    context.save(saved)
    assert resolve_context(None, None, saved, {}) == context  # a list in the file
    assert ZoneContext("http://a", "t").urls == ("http://a",)


async def test_pki_through_the_zone_retries_on_the_next_replica(tmp_path: Path) -> None:
    serving = FakeZone({"h1": TOKEN}, pki=LocalBackend(tmp_path / "zone"))
    serving.add_cluster("demo")
    busy = FakeZone({"h1": TOKEN}, failures=[503])
    async with TestServer(busy.app()) as b, TestServer(serving.app()) as g:
        dead = f"http://127.0.0.1:{free_port()}"
        urls = (dead, str(b.make_url("")).rstrip("/"), str(g.make_url("")).rstrip("/"))
        backend = ZoneBackend(ZoneSettings(url=dead, token=TOKEN, timeout=2.0, urls=urls))
        for why in ("not reachable", "503"):  # each failure: the retry goes to the next
            with pytest.raises(BackendUnavailable, match=why):
                await asyncio.to_thread(backend.ca_certificates, "demo")
        cas = await asyncio.to_thread(backend.ca_certificates, "demo")
        assert set(cas) == set(CaName)
        assert len(busy.headers) == 1
