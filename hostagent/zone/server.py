"""`hostagent zone serve`: wires the store, the PKI backend, the service, the Deliverer and
the HTTP server, and runs them until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from common import tasks as tasks_
from common.backoff import Backoff
from common.files import ensure_secret
from hostagent import __version__
from hostagent.certificates import vault_backend
from hostagent.metrics import ZoneMetrics
from hostagent.sdnotify import Notifier
from hostagent.store import now
from hostagent.zone.api import zone_app
from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.controlplane import ControlPlane
from hostagent.zone.driver import Deliverer
from hostagent.zone.election import Election
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.roller import Roller, drain_tls
from hostagent.zone.service import ZoneService
from hostagent.zone.stores import make_store
from pki.backend import Backend
from pki.local import LocalBackend

log = logging.getLogger(__name__)
# On SIGTERM, how long requests under way may take to finish. Short: aiohttp stops reading
# from every connection as its shutdown begins (aio-libs/aiohttp#2298), so a request whose
# body had not all arrived waits for the whole of it (aiohttp's default: 60 s; a replica
# SIGTERMed under 1,000 hosts' heartbeats took 30 s, until the clients gave up).
REQUEST_GRACE_S = 2.0


def make_backend(config: ZoneServerConfig) -> Backend:
    if config.pki.backend == "vault":
        assert config.pki.vault is not None  # the config's validator guarantees it
        return vault_backend(config.pki.vault)
    return LocalBackend(config.state_dir / "pki")


def _count(values: list[str], keys: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(keys, 0)
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


class Zone:
    def __init__(self, config: ZoneServerConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = make_store(config)
        self.service = ZoneService(self.store, config, make_backend(config))
        self.control = ControlPlane(config.control_ca, config.state_dir)
        self._renew_zone_cert_at = self.control.refresh_zone_cert()
        self.agents_tls = self.control.agents_tls(
            config.agents.ca_file,
            self.service.hosts_at if config.agents.verify_host_names else None,
        )
        self.deliverer: Deliverer | None = None  # while this replica leads
        self.roller: Roller | None = None  # likewise
        self.drain_tls = drain_tls(config.rollout)
        self.passes = 0  # of the Deliverers this replica ran before the current one
        self.metrics = ZoneMetrics(
            self._hosts_by_state,
            self._clusters_by_phase,
            lambda: len(self.deliverer.failing()) if self.deliverer else 0,
            lambda: self.passes + (self.deliverer.passes if self.deliverer else 0),
        )
        self.metrics.leading = lambda: self.deliverer is not None
        self.admin_token = ensure_secret(config.state_dir / "api-token")
        self.host_secret = ensure_secret(config.state_dir / "host-secret")
        self.runner: web.AppRunner | None = None
        self._renewal: asyncio.Task[None] | None = None
        replica = config.replica
        self.replica_id = replica.id or f"{socket.gethostname()}-{secrets.token_hex(3)}"
        scheme = "https" if config.api.tls_cert else "http"
        self.api_url = replica.api_url or f"{scheme}://{config.api.listen}"
        self.started = now()
        self.election: Election | None = None
        if isinstance(self.store, EtcdZoneStore):
            self.election = Election(
                self.store,
                self.replica_id,
                {"id": self.replica_id, "api_url": self.api_url, "started": self.started},
                replica.leader_lease_ttl_s,
                on_lead=self._lead,
                on_follow=self._follow,
                on_leader_change=self.metrics.leader_changes.inc,
            )

    async def _lead(self) -> None:
        """Run the deliveries and the rollouts: this replica is the leader (or the only
        zone)."""
        await self.service.finish_deletions()
        deliverer = self.deliverer = Deliverer(self.service, self.config.agents, self.agents_tls)
        await deliverer.start()
        config = self.config
        roller = self.roller = Roller(
            self.service, config.rollout, config.remediation, self.drain_tls
        )
        await roller.start()
        if isinstance(self.store, EtcdZoneStore):
            # Changes other replicas made (a rollout PUT among them) wake hosts and rollouts.
            def changed(hosts: set[str]) -> None:
                deliverer.kick(hosts)
                roller.kick("")

            self.store.mirror.on_hosts = changed

    async def _follow(self) -> None:
        roller, self.roller = self.roller, None
        if roller is not None:
            await roller.close()
        deliverer, self.deliverer = self.deliverer, None
        self.service.on_change = lambda hosts: None
        if isinstance(self.store, EtcdZoneStore):
            self.store.mirror.on_hosts = None
        if deliverer is not None:
            self.passes += deliverer.passes
            await deliverer.close()

    def zone_view(self) -> dict[str, Any]:
        """GET /v1/zone: the replicas, the leader and the store."""
        me = {"id": self.replica_id, "api_url": self.api_url, "started": self.started}
        if not isinstance(self.store, EtcdZoneStore):
            store: dict[str, Any] = {
                "backend": "sqlite",
                "path": str(self.config.state_dir / "zone.db"),
            }
            return {
                "replica": self.replica_id,
                "leader": self.replica_id,
                "replicas": [me],
                "store": store,
            }
        mirror = self.store.view()  # 503 while the store cannot be followed
        leader = mirror.leader[0] if mirror.leader else None
        replicas = [mirror.replicas[r] for r in sorted(mirror.replicas)]
        return {
            "replica": self.replica_id,
            "leader": leader,
            "replicas": [{**r, "leader": r.get("id") == leader} for r in replicas],
            "store": {
                "backend": "etcd",
                "endpoints": self.store.etcd.endpoints,
                "endpoint": self.store.etcd.endpoint,
                "prefix": self.store.layout.prefix,
                "revision": mirror.revision,
            },
        }

    def _hosts_by_state(self) -> dict[str, int]:
        states = [host["state"] for host in self.service.hosts_view()]
        return _count(states, ("Ready", "NotReady"))

    def _clusters_by_phase(self) -> dict[str, int]:
        phases = [cluster["status"]["phase"] for cluster in self.service.clusters()]
        return _count(phases, ("Provisioning", "Ready", "Upgrading", "Degraded", "Deleting"))

    async def start(self) -> None:
        await self.store.start()
        app = zone_app(
            self.service,
            self.admin_token,
            self.host_secret,
            metrics_text=self.metrics.render,
            heartbeat_s=self.config.hosts.heartbeat_interval_s,
            control=self.control,
            zone_view=self.zone_view,
            agents_tls=self.agents_tls,
        )
        grace = min(REQUEST_GRACE_S, self.config.shutdown_timeout_s / 2)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace)
        await self.runner.setup()
        api = self.config.api
        tls = self.control.server_tls(api)
        await web.TCPSite(self.runner, api.host, api.port, ssl_context=tls).start()
        self._renewal = asyncio.create_task(self._renew_zone_cert(), name="zone-cert")
        if self.election is None:
            await self._lead()
        else:
            self.election.start()
        clusters, hosts = len(self.store.clusters()), len(self.store.hosts())
        log.info(
            "hostagent zone %s serving on %s as replica %s (%d clusters, %d hosts known)",
            __version__,
            api.listen,
            self.replica_id,
            clusters,
            hosts,
        )

    async def _renew_zone_cert(self) -> None:
        """The zone's own client certificate, made anew at 2/3 of its lifetime; the calls
        to agents present the new one from then on."""
        retry = Backoff(1.0, 300.0)
        while True:
            wait = (self._renew_zone_cert_at - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(wait, 0.0))
            try:
                renew_at = await asyncio.to_thread(self.control.refresh_zone_cert)
                self.control.load_zone_cert(self.agents_tls)
            except OSError as exc:
                log.error("cannot renew the zone's client certificate, retrying: %s", exc)
                await asyncio.sleep(retry.next())
                continue
            retry.reset()
            self._renew_zone_cert_at = renew_at
            log.info("renewed the zone's client certificate %s", self.control.zone_cert_file)

    async def stop(self) -> None:
        await tasks_.cancel(self._renewal)
        if self.election is not None:
            await self.election.close()
        await self._follow()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.store.close()


async def serve(config: ZoneServerConfig, environ: Mapping[str, str]) -> None:
    """Run the zone until SIGTERM/SIGINT, telling systemd (when it started us) how it goes."""
    notifier = Notifier.from_environ(environ, os.getpid())
    zone = Zone(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await zone.start()
    except BaseException:
        await zone.stop()
        raise
    notifier.notify("READY=1")
    watchdog = asyncio.create_task(notifier.feed_watchdog(lambda: True))
    await stop.wait()
    notifier.notify("STOPPING=1")
    await tasks_.cancel(watchdog)
    # asyncio.wait, not a timeout around the stop: a task that ignores its cancellation
    # would hold a cancelled stop() as long as it likes.
    stopping = asyncio.create_task(zone.stop(), name="zone-stop")
    done, _ = await asyncio.wait({stopping}, timeout=config.shutdown_timeout_s)
    if stopping in done:
        stopping.result()
        return
    # Nothing acknowledged is lost by leaving now (it is in the store) and a leader's lease
    # expires by itself; leave at once, as asyncio.run would wait for the tasks left.
    left = sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())
    log.error(
        "the zone did not stop within shutdown_timeout_s (%s s); exiting with tasks still "
        "running: %s",
        config.shutdown_timeout_s,
        ", ".join(left[:20]),
    )
    logging.shutdown()
    os._exit(1)
