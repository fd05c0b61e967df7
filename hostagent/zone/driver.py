"""The Deliverer: one task per host makes the host's agent hold what the zone wants.

Each pass compares the host's work (desired.host_work) with what the agent acknowledged
(the store's deliveries) and sends only the difference through the agent API: PUT the
NodeSpecs and peer lists it lacks, DELETE what it should no longer have, until a DELETE
answers 404. A failed pass (or one the store could not serve) is retried with exponential
backoff, jittered so that hosts that failed together are not all retried in the same
instant; each host has its own task, so a slow or dead agent delays nobody else, and one
that comes back catches up on its next pass (its report kicks the task).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from typing import Any

from common import http
from common import tasks as tasks_
from common.backoff import Backoff
from hostagent.errors import StoreUnavailable
from hostagent.imagesource import ImagePhase
from hostagent.zone.config import AgentsConfig
from hostagent.zone.desired import HostWork, peers_digest
from hostagent.zone.hostimages import reported
from hostagent.zone.service import ZoneService

log = logging.getLogger(__name__)


class AgentError(Exception):
    """The agent could not be reached or answered with a server error: retry later."""


class Deliverer:
    def __init__(self, service: ZoneService, config: AgentsConfig, tls: ssl.SSLContext) -> None:
        """tls: trust for the agents' certificates, and the zone's client certificate."""
        self.service = service
        self.config = config
        self._tls = tls
        self._kicks: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failing: dict[str, str] = {}
        # One client per host: httpx's pool assigns each request in time linear in its
        # open connections, so one pool for every agent cost the zone more than its
        # heartbeats at 1,000 hosts.
        self._http: dict[str, http.AsyncClient] = {}
        self.passes = 0
        self._closed = False

    async def start(self) -> None:
        self.service.on_change = self.kick
        self.kick(self.service.hosts_with_work())

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        await tasks_.cancel(*tasks)
        self._tasks.clear()
        clients, self._http = list(self._http.values()), {}
        for client in clients:
            await client.aclose()

    def kick(self, hosts: Any) -> None:
        """Make each host's task run a pass soon (starting the task when it has none)."""
        if self._closed:
            return
        for host in hosts:
            event = self._kicks.setdefault(host, asyncio.Event())
            event.set()
            if host not in self._tasks or self._tasks[host].done():
                self._tasks[host] = asyncio.create_task(self._run(host), name=f"deliver-{host}")

    def failing(self) -> dict[str, str]:
        """Hosts whose last pass failed, with why."""
        return dict(self._failing)

    async def _run(self, host: str) -> None:
        event = self._kicks[host]
        retry = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        while True:
            # asyncio.timeout, not wait_for: wait_for in 3.11 can swallow a cancel that
            # arrives as the event is set, and close() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.resync_interval_s):
                    await event.wait()
            event.clear()
            try:
                settled = await self._pass(host)
            except (AgentError, StoreUnavailable) as exc:
                if self._failing.get(host) != str(exc):
                    log.warning("host %s: delivery failed, retrying: %s", host, exc)
                self._failing[host] = str(exc)
                await asyncio.sleep(retry.next())
                event.set()
                continue
            if host in self._failing:
                log.info("host %s: deliveries go through again", host)
                self._failing.pop(host)
            retry.reset()
            if not settled:  # deletions under way: look again shortly
                await asyncio.sleep(self.config.retry_initial_s)
                event.set()

    async def _pass(self, host: str) -> bool:
        """One comparison and the calls it needs; True when the host holds its work."""
        self.passes += 1
        api = self.service.api_of(host)
        if api is None:
            return True  # never registered: nothing to reach yet
        url, token = api
        store = self.service.store
        work = self.service.work(host)
        acked = store.deliveries(host)
        images = await self._images(host, url, token, work, acked)
        settled = "" not in images.values()  # an image downloading: look again shortly
        for key, spec in work.nodes.items():
            digest = spec.spec_hash()
            if acked.get(("node", key)) == digest:
                continue
            problem = images.get(spec.image)
            if problem is not None:  # its image is not Ready on the host: not sent yet
                if problem:
                    self._not_sent(key, problem)
                else:
                    self.service.refused.pop(key, None)
                continue
            # Fields at their defaults are left out, as from the spec's hash: an agent that
            # predates a field (the zone's generation) takes the specs that do not use it.
            payload = spec.model_dump(mode="json", exclude_defaults=True)
            status, body = await self._call(host, "PUT", url, token, _node_path(key), payload)
            if status in (200, 201):
                await store.set_delivery(host, "node", key, digest)
                self.service.refused.pop(key, None)
            else:
                self._refused(host, key, status, body)
        for cluster, peers in work.peers.items():
            digest = peers_digest(peers)
            if acked.get(("peers", cluster)) == digest:
                continue
            payload = {"peers": [peer.body() for peer in peers]}
            path = _peers_path(cluster)
            status, body = await self._call(host, "PUT", url, token, path, payload)
            if status != 200:
                raise AgentError(f"PUT peers of {cluster} answered {status}: {_message(body)}")
            await store.set_delivery(host, "peers", cluster, digest)
        for key in work.remove:
            status, body = await self._call(host, "DELETE", url, token, _node_path(key))
            if status == 404:
                await store.set_delivery(host, "node", key, None)
                await self.service.node_gone(host, key)
            elif status == 202:
                settled = False
            else:
                raise AgentError(f"DELETE {key} answered {status}: {_message(body)}")
        for kind, key in list(acked):
            if kind == "peers" and key not in work.peers:
                path = _peers_path(key)
                status, body = await self._call(host, "DELETE", url, token, path)
                if status not in (204, 404):
                    raise AgentError(f"DELETE peers of {key} answered {status}: {_message(body)}")
                await store.set_delivery(host, "peers", key, None)
        return settled

    async def _images(
        self, host: str, url: str, token: str | None, work: HostWork, acked: dict[Any, str]
    ) -> dict[str, str]:
        """Each catalogue image the host's nodes name, PUT to its agent unless the agent
        acknowledged that content; the images not Ready there, with why their nodes wait:
        "" while it downloads, or the failure. Images not in the catalogue are the host's
        own and not listed."""
        report = self.service.store.host(host)
        waiting: dict[str, str] = {}
        for name in sorted({spec.image for spec in work.nodes.values()}):
            image = self.service.store.image(name)
            if image is None:
                continue
            status, body = 0, None
            if acked.get(("image", name)) != image.digest:
                source = image.source.model_dump(mode="json", exclude_none=True)
                status, body = await self._call(host, "PUT", url, token, _image_path(name), source)
                if status in (200, 201):
                    await self.service.store.set_delivery(host, "image", name, image.digest)
            elif report is not None and (entry := reported(report.report, image)) is not None:
                status, body = 200, {"status": {"phase": entry.phase, "message": entry.message}}
            else:  # an agent that reports no images, or its report lags: ask it
                status, body = await self._call(host, "GET", url, token, _image_path(name))
            problem = _image_problem(host, name, status, body)
            if problem is not None:
                waiting[name] = problem
        return waiting

    def _not_sent(self, key: str, problem: str) -> None:
        if self.service.refused.get(key) != problem:
            log.warning("%s: %s", key, problem)
        self.service.refused[key] = problem

    def _refused(self, host: str, key: str, status: int, body: Any) -> None:
        if status not in (400, 409, 422, 507):
            raise AgentError(f"PUT {key} answered {status}: {_message(body)}")
        message = f"host {host} refused the node ({status}): {_message(body)}"
        if self.service.refused.get(key) != message:
            log.warning("%s: %s", key, message)
        self.service.refused[key] = message

    async def _call(
        self, host: str, method: str, url: str, token: str | None, path: str, body: Any = None
    ) -> tuple[int, Any]:
        client = self._http.get(host)
        if client is None:
            client = self._http[host] = http.async_client(
                tls=self._tls, timeout_s=self.config.request_timeout_s, max_connections=1
            )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with asyncio.timeout(self.config.request_timeout_s):  # for the whole call
                response = await client.request(method, url + path, json=body, headers=headers)
            text = response.text
            return response.status_code, json.loads(text) if text else None
        except (http.HTTPError, TimeoutError, ValueError) as exc:
            raise AgentError(f"{method} {url}{path}: {type(exc).__name__}: {exc}") from exc


def _image_problem(host: str, name: str, status: int, body: Any) -> str | None:
    """From the agent's answer about an image: None when Ready, "" while it downloads, the
    failure (a pull that failed, a refused PUT); AgentError for anything else."""
    if status in (200, 201) and isinstance(body, dict):
        phase = body.get("status", {}).get("phase")
        if phase == ImagePhase.READY.value:
            return None
        if phase == ImagePhase.DOWNLOADING.value:
            return ""
        message = body.get("status", {}).get("message", "")
        return f"host {host} could not pull image {name}: {message}"
    if status in (404, 409, 422):
        return f"host {host} refused image {name} ({status}): {_message(body)}"
    raise AgentError(f"image {name} on host {host}: answered {status}: {_message(body)}")


def _image_path(name: str) -> str:
    return f"/v1/images/{name}"


def _node_path(key: str) -> str:
    cluster, _, node = key.partition("/")
    return f"/v1/clusters/{cluster}/nodes/{node}"


def _peers_path(cluster: str) -> str:
    return f"/v1/clusters/{cluster}/peers"


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return str(body)[:200]
