"""The CLI reaches an agent that serves TLS with the agent's own configuration alone."""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from hostagent.cli import client_for
from hostagent.config import AgentApiConfig, Config
from pki.servicecerts import issue_server_cert


@pytest.fixture
def tls_agent(tmp_path: Path) -> Iterator[Config]:
    cert, key = issue_server_cert(tmp_path / "ca", "agent", "127.0.0.1", tmp_path / "tls")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "api-token").write_text("secret\n")
    config = Config(
        state_dir=tmp_path,
        api=AgentApiConfig(listen=f"127.0.0.1:{port}", tls_cert=cert, tls_key=key),
    )
    loop = asyncio.new_event_loop()
    app = web.Application()

    async def host(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer secret"
        return web.json_response({"host_id": "h1"})

    app.router.add_get("/v1/host", host)
    runner = web.AppRunner(app)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield config
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_https_and_the_agents_own_certificate(tls_agent: Config) -> None:
    args = argparse.Namespace(url=None, token=None)
    client = client_for(args, tls_agent)
    assert str(client.http.base_url).startswith("https://127.0.0.1:")
    assert client.host() == {"host_id": "h1"}
    client.close()
