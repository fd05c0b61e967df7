"""Simulated hosts speaking the real agent-to-zone protocol (register, then heartbeat
`PUT /v1/hosts/{host}` every --interval s with an unchanged report, a random phase each)
against (a) one zone on SQLite and (b) 3 zone replicas on a 3-member etcd, all on
loopback, for a bounded time. Measured after a warm-up (the registrations): heartbeats
served per second, p50/p99 latency, zone and etcd CPU (psutil, % of one core), hosts Ready
on every replica at the end and Ready->NotReady flaps seen by polling GET /v1/hosts; with
etcd also the failover: the leader replica SIGKILLed, the time until a survivor shows
another leader, and the heartbeats that failed over meanwhile (each simulated host has the
three replicas as its URL list, a different one first: common.failover). Halfway through
the measurement a cluster of 100 nodes (3 masters, 97 workers) is created: the time until
the zone answers (placed, allocations acknowledged) and until every node was delivered to
the stand-in agent all simulated hosts point at (Agents: it acknowledges every PUT, and
each simulated host reports the nodes it holds, as an agent does, so nothing is sent
twice). At the end, with the hosts still beating, the (leading) zone is sent SIGTERM: the
time it took to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from bench.zone_profiled import figures, probe
from common import http
from common.failover import FAILOVER_STATUS, Urls, first_serving
from common.files import ensure_secret
from hostagent.model import NodeSpec
from hostagent.zone.auth import host_token
from tests import etcd
from tests.fakezone import free_port

ROOT = Path(__file__).resolve().parents[1]
GROUP = 20  # simulated hosts per HTTP connection pool
BIG: dict[str, Any] = {
    "kubernetes_version": "1.31.2",
    "masters": {"count": 3, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
    "workers": {"count": 97, "vcpus": 1, "memory_mib": 256, "disk_gib": 1},
}


def report(i: int, agent_url: str) -> dict[str, Any]:
    return {
        "api_url": agent_url,
        "api_token": f"token-{i}",
        "underlay_address": f"10.{i // 250}.{i % 250}.1",
        "failure_domain": f"rack-{i % 20}",
        "allocatable": {"vcpus": 32, "memory_mib": 131072, "disk_gib": 2000},
        "allocated": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0},
    }


class Agents:
    """One stand-in for every simulated host's agent (each host's API token names it):
    node and peer PUTs are acknowledged and the nodes remembered per host, with the
    spec_hash the host reports for them."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, str]] = {}  # host -> node key -> spec_hash
        self.runner: web.AppRunner | None = None

    @property
    def nodes(self) -> set[str]:
        return {key for held in self.held.values() for key in held}

    def reported(self, host: str) -> list[dict[str, str]]:
        return [
            {"cluster": key.split("/")[0], "name": key.split("/")[1], "phase": "Running"}
            | {"spec_hash": digest}
            for key, digest in sorted(self.held.get(host, {}).items())
        ]

    async def start(self) -> str:
        app = web.Application()
        app.router.add_put("/v1/clusters/{c}/nodes/{n}", self.put_node)
        app.router.add_put("/v1/clusters/{c}/peers", self.put_peers)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def put_node(self, request: web.Request) -> web.Response:
        host = request.headers["Authorization"].removeprefix("Bearer token-")
        body = await request.json()
        key = f"{request.match_info['c']}/{request.match_info['n']}"
        self.held.setdefault(f"h{host}", {})[key] = NodeSpec.model_validate(body).spec_hash()
        return web.json_response({"spec": body}, status=201)

    async def put_peers(self, request: web.Request) -> web.Response:
        return web.json_response(await request.json())


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, after the warm-up
    errors: int = 0
    failovers: int = 0  # beats another replica took after the first failed


def zone_config(state_dir: Path, port: int, interval: float, store: str) -> str:
    return (
        f'state_dir = "{state_dir}"\n[api]\nlisten = "127.0.0.1:{port}"\n'
        f"[hosts]\nheartbeat_interval_s = {interval}\nheartbeat_timeout_s = {4 * interval}\n"
        f"{store}"
    )


def serve(path: Path, log: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    """A zone process; with profile, under bench.zone_profiled (profile and loop lag to
    profile/<name>.prof and .lag.json)."""
    command = ["-m", "hostagent", "zone", "serve", "--zone-config", str(path)]
    if profile is not None:
        command = ["-m", "bench.zone_profiled", str(profile / path.stem), *command[2:]]
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def wait_up(client: http.AsyncClient, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await client.get(f"{url}/healthz")).status_code == 200:
                return
        except http.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"zone at {url} did not come up")


def cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


async def host_loop(
    i: int,
    urls: Urls,
    client: http.AsyncClient,
    secret: str,
    interval: float,
    measure_from: float,
    stop: float,
    stats: Stats,
    agents: Agents,
    agent_url: str,
) -> None:
    headers = {"Authorization": f"Bearer {host_token(secret, f'h{i}')}"}
    body = report(i, agent_url)
    await asyncio.sleep(random.uniform(0, interval))
    while time.monotonic() < stop:
        started = time.monotonic()
        body["nodes"] = agents.reported(f"h{i}")
        first = urls.current

        async def put(url: str) -> int:
            response = await client.put(f"{url}/v1/hosts/h{i}", json=body, headers=headers)
            if response.status_code == FAILOVER_STATUS:
                raise ConnectionError("503")
            return response.status_code

        try:
            status = await first_serving(
                urls, put, lambda e: isinstance(e, ConnectionError | http.TransportError)
            )
            ok = status < 300
        except (ConnectionError, http.HTTPError):
            ok = False
        took = time.monotonic() - started
        if started >= measure_from:
            if ok:
                stats.latencies.append(took)
                stats.failovers += urls.current != first
            else:
                stats.errors += 1
        await asyncio.sleep(max(0.0, interval - took))


async def poll_states(
    client: http.AsyncClient, urls: list[str], admin: str, stop: float, flaps: list[int]
) -> dict[str, int]:
    """Poll every replica's GET /v1/hosts until stop; count Ready->NotReady transitions."""
    last: dict[tuple[str, str], str] = {}
    ready: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {admin}"}
    while time.monotonic() < stop:
        for url in urls:
            try:
                response = await client.get(f"{url}/v1/hosts", headers=headers, timeout=30)
                items = response.json()["items"]
            except (http.HTTPError, ValueError, KeyError):
                continue
            ready[url] = sum(h["state"] == "Ready" for h in items)
            for h in items:
                key = (url, h["host"])
                if last.get(key) == "Ready" and h["state"] == "NotReady":
                    flaps[0] += 1
                last[key] = h["state"]
        await asyncio.sleep(5)
    return ready


async def run(
    backend: str, hosts: int, seconds: float, interval: float, profile: Path | None
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"zone-load-{backend}-"))
    state = work / "state"
    state.mkdir(mode=0o700)
    admin = ensure_secret(state / "api-token")
    secret = ensure_secret(state / "host-secret")
    members: list[etcd.Member] = []
    zones: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    result: dict[str, Any] = {"backend": backend, "hosts": hosts}
    agent = Agents()
    agent_url = await agent.start()
    try:
        if backend == "etcd":
            members = etcd.cluster(3)
            endpoints = ", ".join(f'"{m.endpoint}"' for m in members)
            store = f'[store]\nbackend = "etcd"\nendpoints = [{endpoints}]\n'
            names = ["z0", "z1", "z2"]
        else:
            store, names = "", ["z0"]
        for name in names:
            port = free_port()
            extra = f'[replica]\nid = "{name}"\n' if backend == "etcd" else ""
            path = work / f"{name}.toml"
            path.write_text(zone_config(state, port, interval, store + extra))
            zones.append(serve(path, work / f"{name}.log", profile))
            urls.append(f"http://127.0.0.1:{port}")
        # A connection per simulated host, as every agent has its own, in small pools:
        # httpx's pool assigns requests in time linear in its connections, so one pool of
        # a thousand made the generator the bottleneck.
        pools = [
            http.async_client(timeout_s=30.0, max_connections=GROUP) for _ in range(0, hosts, GROUP)
        ]
        client = http.async_client(timeout_s=30.0)
        async with contextlib.AsyncExitStack() as stack:
            for pool in [client, *pools]:
                await stack.enter_async_context(pool)
            for url in urls:
                await wait_up(client, url)
            zone_procs = [psutil.Process(z.pid) for z in zones]
            etcd_procs = [psutil.Process(m.process.pid) for m in members if m.process]
            me = psutil.Process()
            stats = Stats()
            start = time.monotonic()
            warmup = max(2 * interval, 10.0)
            measure_from, stop = start + warmup, start + warmup + seconds
            loops = [
                host_loop(
                    i,
                    Urls(urls[i % len(urls) :] + urls[: i % len(urls)]),
                    pools[i // GROUP],
                    secret,
                    interval,
                    measure_from,
                    stop,
                    stats,
                    agent,
                    agent_url,
                )
                for i in range(hosts)
            ]
            flaps = [0]
            big = asyncio.create_task(
                big_cluster(client, urls[0], admin, agent, measure_from + seconds / 2, stop + 60)
            )

            async def measured() -> tuple[float, float, float]:
                await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
                return cpu(zone_procs), cpu(etcd_procs), cpu([me])

            before_task = asyncio.create_task(measured())
            # The generator's own loop lag: a beat is timed by this loop, so a late wake-up
            # here counts in the latencies as if the zone had been slow.
            lags: list[float] = []

            async def lag_probe() -> None:
                await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
                await probe(lags)

            lag_task = asyncio.create_task(lag_probe())
            states = asyncio.create_task(
                poll_states(client, urls, admin, stop, flaps)  # from the start: flaps too
            )
            await asyncio.gather(*loops)
            lag_task.cancel()
            zone_before, etcd_before, me_before = await before_task
            result["cluster_100"] = await big
            ready = await states
            span = stop - measure_from
            lat = sorted(stats.latencies)
            result.update(
                {
                    "seconds": round(span, 1),
                    "beats_per_s": round(len(lat) / span, 1),
                    "target_per_s": round(hosts / interval, 1),
                    "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
                    "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
                    "errors": stats.errors,
                    "zone_cpu_pct": round(100 * (cpu(zone_procs) - zone_before) / span, 1),
                    "etcd_cpu_pct": round(100 * (cpu(etcd_procs) - etcd_before) / span, 1),
                    "loadgen_cpu_pct": round(100 * (cpu([me]) - me_before) / span, 1),
                    "loadgen_loop_lag": figures(lags),
                    "ready_at_end": ready,
                    "flaps": flaps[0],
                }
            )
            alive = list(range(len(zones)))
            if backend == "etcd":
                result["failover"] = await failover(
                    client, zones, urls, admin, secret, agent, agent_url
                )
                alive = [i for i, z in enumerate(zones) if z.poll() is None]
            tail = [
                host_loop(
                    i,
                    Urls([urls[alive[i % len(alive)]]]),
                    pools[i // GROUP],
                    secret,
                    interval,
                    float("inf"),
                    time.monotonic() + 2 * interval,
                    Stats(),
                    agent,
                    agent_url,
                )
                for i in range(hosts)
            ]
            term = asyncio.create_task(sigterm(zones[alive[-1]], interval))
            await asyncio.gather(*tail)
            result["sigterm_exit_s"] = await term
        return result
    except BaseException:
        for log in sorted(work.glob("*.log")):  # the work folder goes: say what they said
            tail = log.read_text(errors="replace").splitlines()[-20:]
            print(f"--- {log.name}, last lines:", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        await agent.close()
        for zone in zones:
            if zone.poll() is None:
                zone.terminate()
        for zone in zones:
            try:
                zone.wait(timeout=20)
            except subprocess.TimeoutExpired:
                zone.kill()
                zone.wait()
        for member in members:
            member.__exit__()
        if profile is not None:
            for log in work.glob("*.log"):
                log.replace(profile / log.name)
        subprocess.run(["rm", "-rf", str(work)], check=False)


async def big_cluster(
    client: http.AsyncClient,
    url: str,
    admin: str,
    agent: Agents,
    at: float,
    deadline: float,
) -> dict[str, Any]:
    """At time `at`, create a cluster of 100 nodes: seconds until the zone answered (placed)
    and until the stand-in agent holds every node (delivered)."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    headers = {"Authorization": f"Bearer {admin}"}
    started = time.monotonic()
    response = await client.put(f"{url}/v1/clusters/big", json=BIG, headers=headers)
    placed = time.monotonic() - started
    if response.status_code != 201:
        return {"status": response.status_code, "error": response.text[:300]}
    count = BIG["masters"]["count"] + BIG["workers"]["count"]
    while sum(key.startswith("big/") for key in agent.nodes) < count:
        if time.monotonic() > deadline:
            return {"placed_s": round(placed, 2), "delivered": len(agent.nodes)}
        await asyncio.sleep(0.05)
    return {"placed_s": round(placed, 2), "delivered_s": round(time.monotonic() - started, 2)}


async def sigterm(zone: subprocess.Popen[bytes], after: float) -> float | None:
    """SIGTERM a zone while the hosts beat: seconds until it exited (None: not in 60 s)."""
    await asyncio.sleep(after)
    started = time.monotonic()
    zone.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(zone.wait, 60)
    except subprocess.TimeoutExpired:
        return None
    return round(time.monotonic() - started, 2)


async def failover(
    client: http.AsyncClient,
    zones: list[subprocess.Popen[bytes]],
    urls: list[str],
    admin: str,
    secret: str,
    agent: Agents,
    agent_url: str,
) -> dict[str, Any]:
    """SIGKILL the leader replica: when a survivor acknowledges a write (a host's report),
    when a survivor shows another leader, and when a cluster created on a survivor right
    after the kill reached its agent (the first delivery: the new leader's work)."""
    headers = {"Authorization": f"Bearer {admin}"}

    async def leader(url: str) -> str | None:
        try:
            view = (await client.get(f"{url}/v1/zone", headers=headers)).json()
        except (http.HTTPError, ValueError):
            return None
        leader = view.get("leader")
        return str(leader) if leader else None

    old = await leader(urls[0])
    if old is None:
        return {"error": "no leader"}
    index = int(old.removeprefix("z"))
    zones[index].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivors = [u for i, u in enumerate(urls) if i != index]
    beat = {"Authorization": f"Bearer {host_token(secret, 'h0')}"}
    response = await client.put(
        f"{survivors[0]}/v1/hosts/h0", json=report(0, agent_url), headers=beat
    )
    written = time.monotonic() - killed
    small = {**BIG, "workers": {**BIG["workers"], "count": 0}}
    created = await client.put(f"{survivors[0]}/v1/clusters/after", json=small, headers=headers)
    while time.monotonic() - killed < 30:
        now = await leader(survivors[0])
        if now is not None and now != old:
            break
        await asyncio.sleep(0.05)
    took = time.monotonic() - killed
    while "after/m1" not in agent.nodes and time.monotonic() - killed < 60:
        await asyncio.sleep(0.05)
    delivered = time.monotonic() - killed if "after/m1" in agent.nodes else None
    return {
        "delivered_after_s": None if delivered is None else round(delivered, 2),
        "create_status": created.status_code,
        "killed": old,
        "new_leader": now,
        "new_leader_after_s": round(took, 2),
        "write_after_s": round(written, 2),
        "write_status": response.status_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--backends", default="sqlite,etcd")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the zones under cProfile with a loop-lag probe; profiles, lag figures "
        "and the zones' logs go to PROFILE/<backend>/",
    )
    args = parser.parse_args()
    for backend in args.backends.split(","):
        profile = None
        if args.profile is not None:
            profile = args.profile / backend
            profile.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(backend, args.hosts, args.seconds, args.interval, profile))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
