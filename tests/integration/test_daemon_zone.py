"""A real `hostagent serve` (real libvirt) with a [zone] section, reporting to FakeZone
(tests/fakezone.py) served from this process: registration and heartbeats with the
agent's own URL and token, the zone's state in GET /v1/host and /metrics, a zone that
fails while the agent keeps serving, and the peers API through the daemon's wiring,
persisted across a restart."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from hostagent.client import ApiError
from tests.conftest import require_libvirt
from tests.fakezone import FakeZone, free_port

pytestmark = pytest.mark.integration
HOST_TOKEN = "host-token-for-the-daemon-test"


@pytest.fixture
def zone() -> Iterator[tuple[FakeZone, str]]:
    """FakeZone on its own loop in a thread: the test itself blocks while it polls."""
    fake = FakeZone({}, heartbeat_interval_s=0.2)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(fake.app())
    port = free_port()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_the_daemon_reports_to_the_zone_and_serves_peers(
    zone: tuple[FakeZone, str], tmp_path: Path
) -> None:
    require_libvirt()
    from tests.e2e.agent import Agent, cleanup, poll

    fake, url = zone
    state = Path("/var/lib/hostagent-e2e") / f"zone-{tmp_path.name}"
    agent = Agent(state_dir=state, image_dir=state / "images")  # QEMU must reach both
    fake.tokens[agent.host_id] = HOST_TOKEN
    (state / "images").mkdir(parents=True, exist_ok=True)
    token_file = state / "zone-token"
    token_file.write_text(HOST_TOKEN + "\n")
    agent.write_config(
        f'[zone]\nurl = "{url}"\ntoken_file = "{token_file}"\nfailure_domain = "rack-1"\n'
    )
    try:
        client = agent.start()
        poll(lambda: fake.reports, 30, "the first report")
        host, report = fake.reports[0]
        assert host == agent.host_id
        assert report["api_url"] == f"http://127.0.0.1:{agent.api_port}"
        assert report["api_token"] == (state / "api-token").read_text().strip()
        assert report["failure_domain"] == "rack-1"
        assert report["domain_type"] == "qemu"
        assert report["nodes"] == [] and report["networks"] == []

        zone_state = poll(lambda: client.host()["zone"], 30, "GET /v1/host to show the zone")
        assert zone_state["url"] == url
        poll(lambda: client.host()["zone"]["registered"], 30, "registered")
        count = len(fake.reports)
        poll(lambda: len(fake.reports) >= count + 3, 30, "beats at the zone's 0.2 s")
        metrics = httpx.get(f"http://127.0.0.1:{agent.api_port}/metrics").text
        assert "hostagent_zone_connected 1.0" in metrics

        fake.failures = [503] * 100_000  # the zone fails; the agent keeps serving
        poll(lambda: not client.host()["zone"]["connected"], 30, "the failure to show")
        assert "503" in client.host()["zone"]["last_error"]
        assert client.healthy()
        fake.failures.clear()
        poll(lambda: client.host()["zone"]["connected"], 30, "the zone to be back")

        peers = [{"address": "10.250.0.12", "macs": ["52:54:00:aa:bb:cc"]}]
        assert client.put_peers("alpha", peers) == peers
        agent.stop()
        client = agent.start()
        assert client.get_peers("alpha") == peers  # kept in state.db
        client.delete_peers("alpha")
        with pytest.raises(ApiError) as exc:
            client.get_peers("alpha")
        assert exc.value.status == 404
        assert HOST_TOKEN not in agent.log_tail()
    except AssertionError:
        print(agent.log_tail())
        raise
    finally:
        cleanup(agent, [])
