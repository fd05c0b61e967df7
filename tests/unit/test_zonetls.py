"""hostagent.zonetls against a stand-in certificate endpoint (real HTTP, a real CA): the
bootstrap sends the token from the file and a CSR for a key that stays here, the files
are written 0600, failures (refusals, a crash writing the files) are retried with the
backoff and shown, and a saved usable certificate is loaded at start without a call."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509

from hostagent.config import Config, ZoneConfig
from hostagent.zonetls import ZoneIdentity
from pki import controlca
from tests.fakezone import free_port

TOKEN = "host.h1.1.mac"


@dataclass
class StandIn:
    ca: tuple[str, str] = field(default_factory=controlca.make_ca)
    failures: list[int] = field(default_factory=list)  # statuses to answer first
    refuse_renewals: int = 0  # answer so many renewals (no token) 401, as a new CA would
    calls: list[tuple[str | None, str]] = field(default_factory=list)  # (bearer, csr)
    ttl: dt.timedelta = dt.timedelta(days=30)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.headers.get("Authorization"), body["csr"]))
        if self.refuse_renewals and "Authorization" not in request.headers:
            self.refuse_renewals -= 1
            return web.json_response({"error": {"code": "u", "message": "who?"}}, status=401)
        if self.failures:
            status = self.failures.pop(0)
            return web.json_response({"error": {"code": "x", "message": "no"}}, status=status)
        issued = controlca.sign_host(*self.ca, body["csr"], request.match_info["host"], self.ttl)
        return web.json_response(
            {"certificate": issued.cert_pem, "ca": issued.ca_pem, "not_after": "…"}, status=201
        )


@pytest.fixture
async def zone() -> AsyncIterator[tuple[StandIn, str]]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_post("/v1/hosts/{host}/certificate", stand_in.handle)
    async with TestServer(app) as server:
        yield stand_in, str(server.make_url("")).rstrip("/")


def identity(tmp_path: Path, url: str) -> ZoneIdentity:
    token_file = tmp_path / "zone-token"
    if not token_file.exists():
        token_file.write_text(TOKEN + "\n")
    config = Config(
        host_id="h1", state_dir=tmp_path, zone=ZoneConfig(url=url, token_file=token_file)
    )
    return ZoneIdentity(config, retry_initial_s=0.01, retry_max_s=0.05)


async def until(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_bootstrap_with_the_token_then_files_and_context(
    tmp_path: Path, zone: tuple[StandIn, str]
) -> None:
    stand_in, url = zone
    agent = identity(tmp_path, url)
    assert not agent.ready.is_set() and agent.status().not_after is None
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
    finally:
        task.cancel()
    (bearer, csr_pem), *_ = stand_in.calls
    assert bearer == f"Bearer {TOKEN}"
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    pem = agent.pem_file.read_text()
    assert agent.pem_file.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" in pem and "PRIVATE KEY" not in csr_pem
    assert x509.load_pem_x509_certificate(pem.encode()).public_key() == csr.public_key()
    assert agent.ca_file.read_text() == stand_in.ca[0]
    status = agent.status()
    assert status.problem is None and status.not_after is not None
    assert status.as_dict()["not_after"] == status.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    # a new process finds the certificate usable and calls nobody
    again = identity(tmp_path, url)
    assert again.ready.is_set() and again.not_after == agent.not_after
    assert len(stand_in.calls) == 1


async def test_refusals_are_retried_with_the_backoff_and_shown(
    tmp_path: Path, zone: tuple[StandIn, str]
) -> None:
    stand_in, url = zone
    stand_in.failures = [403, 503, 503]
    agent = identity(tmp_path, url)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.problem and "403" in agent.problem)
        assert "no" in (agent.problem or "")
        await asyncio.wait_for(agent.ready.wait(), 10)
    finally:
        task.cancel()
    assert len(stand_in.calls) == 4 and agent.problem is None


async def test_a_crash_writing_the_files_does_not_end_the_loop(
    tmp_path: Path, zone: tuple[StandIn, str]
) -> None:
    _, url = zone
    agent = identity(tmp_path, url)
    blocked = agent.directory / "client.pem"
    blocked.mkdir(parents=True)  # the file cannot replace a directory: OSError
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.problem and "crashed" in agent.problem)
        assert not task.done()
        blocked.rmdir()
        await asyncio.wait_for(agent.ready.wait(), 10)
    finally:
        task.cancel()


async def test_renewal_presents_the_certificate_and_swaps_it(
    tmp_path: Path, zone: tuple[StandIn, str]
) -> None:
    stand_in, url = zone
    stand_in.ttl = dt.timedelta(seconds=3)  # renewed after 2 s, while still valid
    agent = identity(tmp_path, url)
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        first = agent.not_after
        await until(lambda: agent.not_after != first and len(stand_in.calls) >= 2)
    finally:
        task.cancel()
    assert stand_in.calls[1][0] is None  # renewed without the token


async def test_a_refused_certificate_is_replaced_with_the_token(
    tmp_path: Path, zone: tuple[StandIn, str]
) -> None:
    """The zone refuses the certificate (its CA made anew): the next attempt is a
    bootstrap with the token from the file, and heartbeats never stopped meanwhile."""
    stand_in, url = zone
    stand_in.ttl = dt.timedelta(seconds=3)
    stand_in.refuse_renewals = 1
    agent = identity(tmp_path, url)
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        await until(lambda: len(stand_in.calls) >= 3 and agent.problem is None)
        assert agent.ready.is_set()
    finally:
        task.cancel()
    bearers = [bearer for bearer, _ in stand_in.calls[:3]]
    assert bearers == [f"Bearer {TOKEN}", None, f"Bearer {TOKEN}"]


async def test_the_bootstrap_moves_on_from_a_dead_and_a_503_replica(
    tmp_path: Path, zone: tuple[StandIn, str]
) -> None:
    """Zone replicas: the first URL refuses connections, the second answers 503 (its store
    is out of reach); the bootstrap goes on to the third in the same attempt."""
    stand_in, url = zone
    busy = StandIn(failures=[503] * 10)
    app = web.Application()
    app.router.add_post("/v1/hosts/{host}/certificate", busy.handle)
    dead = f"http://127.0.0.1:{free_port()}"
    token_file = tmp_path / "zone-token"
    token_file.write_text(TOKEN + "\n")
    async with TestServer(app) as server:
        urls = [dead, str(server.make_url("")).rstrip("/"), url]
        zone_config = ZoneConfig.model_validate({"url": urls, "token_file": token_file})
        config = Config(host_id="h1", state_dir=tmp_path, zone=zone_config)
        agent = ZoneIdentity(config, retry_initial_s=5.0, retry_max_s=5.0)
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.ready.wait(), 4)  # before any retry's backoff
        finally:
            task.cancel()
    assert len(busy.calls) == 1 and len(stand_in.calls) == 1
    assert agent.url == url and agent.problem is None
