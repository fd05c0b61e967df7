"""The Deliverer against agents that answer over real HTTP.

The agents here are StandInAgent: a few routes of the agent API kept in memory, because
these tests need agents that can be stopped, slowed and made to refuse on cue. The real
agents are driven by the zone in the lab end-to-end test (tests/e2e/test_zone_lab.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hostagent.zone.config import AgentsConfig, ZoneServerConfig
from hostagent.zone.driver import Deliverer
from hostagent.zone.model import ClusterSpec, HostReport
from hostagent.zone.service import ZoneService
from hostagent.zone.store import ZoneStore
from pki.local import LocalBackend
from tests.conftest import StoreFactory


class StandInAgent:
    """In-memory stand-in for one agent's node and peer routes (see the module docstring)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.nodes: dict[str, dict[str, Any]] = {}
        self.deleting: set[str] = set()
        self.peers: dict[str, list[dict[str, Any]]] = {}
        self.refuse: str | None = None
        self.delay_s = 0.0
        self.calls = 0
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/v1/clusters/{c}/nodes/{n}", self.put_node)
        app.router.add_delete("/v1/clusters/{c}/nodes/{n}", self.delete_node)
        app.router.add_put("/v1/clusters/{c}/peers", self.put_peers)
        app.router.add_delete("/v1/clusters/{c}/peers", self.delete_peers)
        return app

    async def _check(self, request: web.Request) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()

    async def put_node(self, request: web.Request) -> web.Response:
        await self._check(request)
        key = f"{request.match_info['c']}/{request.match_info['n']}"
        if self.refuse:
            error = {"error": {"code": "invalid", "message": self.refuse}}
            return web.json_response(error, status=422)
        created = key not in self.nodes
        self.nodes[key] = await request.json()
        return web.json_response({"spec": self.nodes[key]}, status=201 if created else 200)

    async def delete_node(self, request: web.Request) -> web.Response:
        await self._check(request)
        key = f"{request.match_info['c']}/{request.match_info['n']}"
        if key not in self.nodes:
            return web.json_response({"error": {"code": "not_found", "message": ""}}, status=404)
        if key in self.deleting:  # the second DELETE finds it gone: deletion takes a while
            del self.nodes[key]
            self.deleting.discard(key)
            return web.json_response({"error": {"code": "not_found", "message": ""}}, status=404)
        self.deleting.add(key)
        return web.json_response({}, status=202)

    async def put_peers(self, request: web.Request) -> web.Response:
        await self._check(request)
        self.peers[request.match_info["c"]] = (await request.json())["peers"]
        return web.json_response({"peers": self.peers[request.match_info["c"]]})

    async def delete_peers(self, request: web.Request) -> web.Response:
        await self._check(request)
        self.peers.pop(request.match_info["c"], None)
        return web.Response(status=204)


def report(i: int, url: str, **extra: Any) -> HostReport:
    return HostReport.model_validate(
        {
            "api_url": url,
            "api_token": f"agent-{i}",
            "underlay_address": f"10.250.0.{10 + i}",
            "failure_domain": f"fd-{i}",
            "allocatable": {"vcpus": 8, "memory_mib": 8192, "disk_gib": 100},
            "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
            **extra,
        }
    )


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Zone:
    def __init__(self, tmp_path: Path, store: ZoneStore) -> None:
        config = ZoneServerConfig(
            state_dir=tmp_path,
            agents=AgentsConfig(retry_initial_s=0.05, retry_max_s=0.2, request_timeout_s=5.0),
        )
        self.store = store
        self.service = ZoneService(self.store, config, LocalBackend(tmp_path / "pki"))
        self.deliverer = Deliverer(self.service, config.agents)
        self.agents: dict[str, StandInAgent] = {}

    async def add_agent(self, i: int) -> StandInAgent:
        agent = StandInAgent(f"agent-{i}")
        agent.server = TestServer(agent.app())
        await agent.server.start_server()
        self.agents[f"h{i}"] = agent
        await self.service.report(f"h{i}", report(i, str(agent.server.make_url("")).rstrip("/")))
        return agent

    def host_of(self, node: str) -> str:
        return next(n.host for n in self.store.nodes() if n.name == node)


@pytest.fixture
async def zone(tmp_path: Path, zone_stores: StoreFactory) -> AsyncIterator[Zone]:
    zone = Zone(tmp_path, await zone_stores())
    for i in (1, 2, 3):
        await zone.add_agent(i)
    await zone.deliverer.start()
    yield zone
    await zone.deliverer.close()
    for agent in zone.agents.values():
        if agent.server is not None:
            await agent.server.close()


def spec(workers: int) -> ClusterSpec:
    pool = {"vcpus": 1, "memory_mib": 256, "disk_gib": 1}
    return ClusterSpec.model_validate(
        {
            "kubernetes_version": "1.31.2",
            "masters": {"count": 3, **pool},
            "workers": {"count": workers, **pool},
        }
    )


async def test_nodes_and_peers_reach_every_host(zone: Zone) -> None:
    await zone.service.put_cluster("demo", spec(0))
    agents = zone.agents
    await until(lambda: all(len(a.nodes) == 1 and "demo" in a.peers for a in agents.values()))
    for host, agent in agents.items():
        peers = agent.peers["demo"]
        assert len(peers) == 2
        assert f"10.250.0.{10 + int(host[1:])}" not in {p["address"] for p in peers}
        assert all(len(p["macs"]) == 1 for p in peers)
    calls = sum(a.calls for a in agents.values())
    zone.deliverer.kick(agents)
    await until(lambda: zone.deliverer.passes >= 6)
    assert sum(a.calls for a in agents.values()) == calls  # nothing new to send


async def test_scaling_updates_every_hosts_peers(zone: Zone) -> None:
    await zone.service.put_cluster("demo", spec(0))
    await until(lambda: all("demo" in a.peers for a in zone.agents.values()))
    await zone.service.put_cluster("demo", spec(3))
    await until(lambda: sum(len(a.nodes) for a in zone.agents.values()) == 6)
    await until(
        lambda: all(
            sum(len(p["macs"]) for p in a.peers["demo"]) == 6 - len(a.nodes)
            for a in zone.agents.values()
        )
    )
    await zone.service.put_cluster("demo", spec(0))
    await until(lambda: sum(len(a.nodes) for a in zone.agents.values()) == 3)
    await until(
        lambda: all(sum(len(p["macs"]) for p in a.peers["demo"]) == 2 for a in zone.agents.values())
    )
    await until(lambda: len(zone.store.nodes("demo")) == 3)


async def test_a_dead_agent_blocks_nobody_and_catches_up(zone: Zone) -> None:
    dead = zone.agents["h3"]
    assert dead.server is not None
    url = str(dead.server.make_url("")).rstrip("/")
    await dead.server.close()
    await zone.service.put_cluster("demo", spec(0))
    await until(lambda: len(zone.agents["h1"].nodes) == 1 and len(zone.agents["h2"].nodes) == 1)
    await until(lambda: "h3" in zone.deliverer.failing())
    assert dead.nodes == {}
    revived = StandInAgent("agent-3")
    revived.server = TestServer(revived.app(), port=int(url.rsplit(":", 1)[1]))
    await revived.server.start_server()
    zone.agents["h3"] = revived
    await zone.service.report("h3", report(3, url))
    await until(lambda: len(revived.nodes) == 1 and "demo" in revived.peers)
    await until(lambda: "h3" not in zone.deliverer.failing())


async def test_a_slow_agent_delays_only_itself(zone: Zone) -> None:
    zone.agents["h1"].delay_s = 2.0
    started = time.monotonic()
    await zone.service.put_cluster("demo", spec(0))
    fast = [zone.agents["h2"], zone.agents["h3"]]
    await until(lambda: all(len(a.nodes) == 1 and "demo" in a.peers for a in fast))
    assert time.monotonic() - started < 2.0  # did not wait for h1's first answer
    await until(lambda: len(zone.agents["h1"].nodes) == 1)


async def test_a_refused_node_fails_with_the_agents_reason(zone: Zone) -> None:
    for agent in zone.agents.values():
        agent.refuse = "image lab is not on this host"
    await zone.service.put_cluster("demo", spec(0))
    await until(lambda: zone.service.cluster("demo")["status"]["phase"] == "Degraded")
    status = zone.service.cluster("demo")["status"]
    assert "image lab is not on this host" in status["message"]
    assert {n["phase"] for n in status["nodes"]} == {"Failed"}


async def test_delete_waits_for_every_host_then_forgets_the_cluster(zone: Zone) -> None:
    await zone.service.put_cluster("demo", spec(1))
    await until(lambda: sum(len(a.nodes) for a in zone.agents.values()) == 4)
    await zone.service.delete_cluster("demo")
    await until(lambda: zone.store.cluster("demo") is None)
    assert all(a.nodes == {} and a.peers == {} for a in zone.agents.values())


async def test_a_restarted_zone_redrives_what_was_in_flight(tmp_path: Path, zone: Zone) -> None:
    await zone.deliverer.close()  # the zone "crashes" before delivering anything
    await zone.service.put_cluster("demo", spec(0))
    assert all(a.nodes == {} for a in zone.agents.values())
    zone.deliverer = Deliverer(zone.service, zone.deliverer.config)
    await zone.deliverer.start()
    await until(lambda: all(len(a.nodes) == 1 for a in zone.agents.values()))
