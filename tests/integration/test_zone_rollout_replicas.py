"""Rollouts through the whole zone: two replicas on one etcd, their Deliverers calling
agents over HTTP (the StandInAgent of the driver's unit tests, which hold what they are
sent), the agents' heartbeats reporting each node Ready at the spec it holds, and the
`hostagent cluster upgrade --wait` command. The leader is stopped in the middle of a
rollout and the other replica carries it on; a rollout whose master never becomes
Ready stops, and the command exits non-zero with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hostagent.config import ApiConfig
from hostagent.model import NodeSpec
from hostagent.zone.auth import host_token
from hostagent.zone.config import (
    AgentsConfig,
    HostsConfig,
    RemediationConfig,
    ReplicaConfig,
    RolloutConfig,
    StoreConfig,
    ZoneServerConfig,
)
from hostagent.zone.etcd import Delete
from hostagent.zone.server import Zone
from tests.conftest import etcd_client
from tests.etcd import Member
from tests.fakezone import free_port
from tests.integration.test_zone_ha import until
from tests.unit.test_zone_driver import StandInAgent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POOL = {"vcpus": 1, "memory_mib": 256, "disk_gib": 1}


def cluster(version: str, **extra: Any) -> dict[str, Any]:
    return {
        "kubernetes_version": version,
        "masters": {"count": 3, **POOL},
        "workers": {"count": 2, **POOL},
        **extra,
    }


@dataclass
class Lab:
    tmp_path: Path
    endpoint: str
    prefix: str
    session: aiohttp.ClientSession
    agents: dict[str, StandInAgent] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)  # agent URLs
    zones: list[Zone] = field(default_factory=list)
    not_ready: set[str] = field(default_factory=set)  # "cluster/node" reported Running
    unhealthy: dict[str, str] = field(default_factory=dict)  # "cluster/node" -> since

    @property
    def token(self) -> str:
        return (self.tmp_path / "zone" / "api-token").read_text().strip()

    async def start_zone(self, replica: str) -> Zone:
        zone = Zone(
            ZoneServerConfig(
                state_dir=self.tmp_path / "zone",
                api=ApiConfig(listen=f"127.0.0.1:{free_port()}"),
                hosts=HostsConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0),
                agents=AgentsConfig(retry_initial_s=0.1, retry_max_s=0.5),
                store=StoreConfig(backend="etcd", endpoints=(self.endpoint,), prefix=self.prefix),
                replica=ReplicaConfig(id=replica, leader_lease_ttl_s=2),
                rollout=RolloutConfig(interval_s=0.2),
                remediation=RemediationConfig(unhealthy_for_s=1.0),
            )
        )
        await zone.start()
        self.zones.append(zone)
        return zone

    def live(self) -> list[Zone]:
        return [z for z in self.zones if z.runner is not None]

    async def beat(self) -> None:
        """Each agent reports what it holds to a live replica: Ready at its spec."""
        secret = (self.tmp_path / "zone" / "host-secret").read_text().strip()
        for host, agent in self.agents.items():
            nodes = [
                {
                    "cluster": key.partition("/")[0],
                    "name": key.partition("/")[2],
                    "phase": "Running" if key in self.not_ready else "Ready",
                    "spec_hash": NodeSpec.model_validate(spec).spec_hash(),
                    "health": {"healthy": False, "reason": "crash-loop", "since": since}
                    if (since := self.unhealthy.get(key))
                    else {"healthy": True},
                }
                for key, spec in agent.nodes.items()
                if key not in agent.deleting
            ]
            body = {
                "api_url": self.urls[host],
                "api_token": agent.token,
                "underlay_address": f"10.250.0.{10 + int(host[1:])}",
                "failure_domain": host,
                "allocatable": {"vcpus": 64, "memory_mib": 65536, "disk_gib": 1000},
                "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
                "nodes": nodes,
            }
            headers = {"Authorization": f"Bearer {host_token(secret, host)}"}
            for zone in self.live():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    url = f"{zone.api_url}/v1/hosts/{host}"
                    async with self.session.put(url, json=body, headers=headers) as response:
                        if response.status in (200, 201):
                            break

    async def heartbeats(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(0.2)

    def versions(self) -> dict[str, str]:
        """node -> the Kubernetes version its agent holds."""
        return {
            key.partition("/")[2]: spec["kubernetes_version"]
            for agent in self.agents.values()
            for key, spec in agent.nodes.items()
            if key not in agent.deleting
        }

    async def upgrade(self, *args: str) -> asyncio.subprocess.Process:
        urls = ",".join(z.api_url for z in self.zones)
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hostagent",
            "cluster",
            "upgrade",
            "demo",
            *args,
            "--wait",
            "--timeout",
            "120",
            "--zone",
            urls,
            "--zone-token",
            self.token,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


@pytest.fixture
async def lab(tmp_path: Path, etcd_member: Member) -> AsyncIterator[Lab]:
    prefix = f"/test-rollout/{uuid.uuid4().hex}/"
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        lab = Lab(tmp_path, etcd_member.endpoint, prefix, session)
        beating: asyncio.Task[None] | None = None
        try:
            for host in ("h1", "h2", "h3"):
                agent = lab.agents[host] = StandInAgent(f"agent-{host}")
                agent.server = TestServer(agent.app(), host="127.0.0.1")
                await agent.server.start_server()
                lab.urls[host] = str(agent.server.make_url("")).rstrip("/")
            await lab.start_zone("ra")
            await lab.start_zone("rb")
            beating = asyncio.create_task(lab.heartbeats())
            yield lab
        finally:
            if beating is not None:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
            for zone in lab.live():
                await zone.stop()
            for agent in lab.agents.values():
                if agent.server is not None:
                    await agent.server.close()
            cleanup = etcd_client(etcd_member.endpoint)
            await cleanup.txn([], [Delete(prefix, prefix=True)])
            await cleanup.close()


async def create(lab: Lab, spec: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {lab.token}"}
    url = f"{lab.zones[0].api_url}/v1/clusters/demo"

    async def created() -> bool:  # once the hosts' first heartbeats are in
        async with lab.session.put(url, json=spec, headers=headers) as response:
            return response.status == 201

    await until(created, 30)

    async def ready() -> bool:
        async with lab.session.get(url, headers=headers) as response:
            return bool((await response.json())["status"]["phase"] == "Ready")

    await until(ready, 60)


async def test_a_rollout_goes_on_under_the_next_leader_and_the_cli_shows_it(lab: Lab) -> None:
    await create(lab, cluster("1.30.5"))
    command = await lab.upgrade("--kubernetes-version", "1.31.2")

    async def first_master_rolled() -> bool:
        return lab.versions().get("m1") == "1.31.2"

    await until(first_master_rolled, 60)
    leader = next(z for z in lab.zones if z.deliverer is not None)
    assert len({v for v in lab.versions().values()}) == 2  # in the middle of the roll
    await leader.stop()
    leader.runner = None

    async def all_rolled() -> bool:
        versions = lab.versions()
        return len(versions) == 5 and set(versions.values()) == {"1.31.2"}

    await until(all_rolled, 90)
    output, _ = await asyncio.wait_for(command.communicate(), 60)
    text = output.decode()
    print(text)
    assert command.returncode == 0, text
    assert "nodes at 1.31.2" in text and "every node runs 1.31.2" in text
    assert sorted(lab.versions()) == ["m1", "m2", "m3", "w3", "w4"]  # workers by new ones


async def test_a_master_never_ready_stops_the_rollout_and_the_cli_says_why(lab: Lab) -> None:
    await create(lab, cluster("1.30.5", rollout={"ready_timeout_s": 2}))
    lab.not_ready.add("demo/m1")  # it stays Running once re-created
    command = await lab.upgrade("--kubernetes-version", "1.31.2")
    output, _ = await asyncio.wait_for(command.communicate(), 60)
    text = output.decode()
    assert command.returncode != 0, text
    assert "rollout stopped: master m1 is not Ready" in text
    assert lab.versions()["m2"] == "1.30.5"  # nothing further touched


async def test_a_crash_looping_worker_is_drained_then_replaced_by_the_leader(lab: Lab) -> None:
    seen: list[tuple[bool, bool]] = []  # at each hook call: w1 held by its agent, deleting

    async def drain(request: web.Request) -> web.Response:
        body = await request.json()
        held = [a for a in lab.agents.values() if "demo/w1" in a.nodes]
        seen.append((bool(held), any("demo/w1" in a.deleting for a in held)))
        assert body["node"] == "w1" and body["reason"].startswith("remediation")
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/drain", drain)
    hook = TestServer(app, host="127.0.0.1")
    await hook.start_server()
    try:
        await create(lab, cluster("1.31.2", drain_hook={"url": str(hook.make_url("/drain"))}))
        lab.unhealthy["demo/w1"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        async def replaced() -> bool:
            names = set(lab.versions())
            return "w1" not in names and "w3" in names

        await until(replaced, 60)
    finally:
        await hook.close()
    assert seen == [(True, False)]  # called once, before the agent was told to delete
    leader = next(z for z in lab.zones if z.deliverer is not None)
    events = leader.service.cluster("demo")["status"]["events"]
    assert [e["kind"] for e in events] == ["remediation", "drain"]
    assert events[0]["message"].startswith("replacing worker w1 by w3: crash-loop")
    assert events[1]["message"].startswith("drain hook answered 200 in")
