"""`hostagent zone serve`: wires the store, the PKI backend, the service, the Deliverer and
the HTTP server, and runs them until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from common.files import ensure_secret
from hostagent import __version__
from hostagent.certificates import vault_backend
from hostagent.sdnotify import Notifier
from hostagent.zone.api import zone_app
from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.driver import Deliverer
from hostagent.zone.service import ZoneService
from hostagent.zone.store import SqliteZoneStore
from pki.backend import Backend
from pki.local import LocalBackend

log = logging.getLogger(__name__)


def make_backend(config: ZoneServerConfig) -> Backend:
    if config.pki.backend == "vault":
        assert config.pki.vault is not None  # the config's validator guarantees it
        return vault_backend(config.pki.vault)
    return LocalBackend(config.state_dir / "pki")


class ZoneMetrics:
    def __init__(self, service: ZoneService, deliverer: Deliverer) -> None:
        self.service = service
        self.deliverer = deliverer
        self.registry = CollectorRegistry()
        self.hosts = Gauge(
            "hostagent_zone_hosts", "Hosts by state", ["state"], registry=self.registry
        )
        self.clusters = Gauge(
            "hostagent_zone_clusters", "Clusters by phase", ["phase"], registry=self.registry
        )
        self.failing = Gauge(
            "hostagent_zone_hosts_failing_delivery",
            "Hosts whose last delivery attempt failed",
            registry=self.registry,
        )
        self.passes = Gauge(
            "hostagent_zone_delivery_passes", "Delivery passes since start", registry=self.registry
        )

    def render(self) -> bytes:
        for state in ("Ready", "NotReady"):
            count = sum(1 for h in self.service.hosts_view() if h["state"] == state)
            self.hosts.labels(state).set(count)
        phases: dict[str, int] = dict.fromkeys(("Provisioning", "Ready", "Degraded", "Deleting"), 0)
        for cluster in self.service.clusters():
            phases[cluster["status"]["phase"]] += 1
        for phase, count in phases.items():
            self.clusters.labels(phase).set(count)
        self.failing.set(len(self.deliverer.failing()))
        self.passes.set(self.deliverer.passes)
        return generate_latest(self.registry)


class Zone:
    def __init__(self, config: ZoneServerConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = SqliteZoneStore(config.state_dir / "zone.db")
        self.service = ZoneService(self.store, config, make_backend(config))
        self.deliverer = Deliverer(self.service, config.agents)
        self.metrics = ZoneMetrics(self.service, self.deliverer)
        self.admin_token = ensure_secret(config.state_dir / "api-token")
        self.host_secret = ensure_secret(config.state_dir / "host-secret")
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = zone_app(
            self.service,
            self.admin_token,
            self.host_secret,
            metrics_text=self.metrics.render,
            heartbeat_s=self.config.hosts.heartbeat_interval_s,
        )
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        api = self.config.api
        tls = None
        if api.tls_cert and api.tls_key:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(api.tls_cert, api.tls_key)
        await web.TCPSite(self.runner, api.host, api.port, ssl_context=tls).start()
        await self.deliverer.start()
        clusters, hosts = len(self.store.clusters()), len(self.store.hosts())
        log.info(
            "hostagent zone %s serving on %s (%d clusters, %d hosts known)",
            __version__,
            api.listen,
            clusters,
            hosts,
        )

    async def stop(self) -> None:
        await self.deliverer.close()
        if self.runner is not None:
            await self.runner.cleanup()
        self.store.close()


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
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    await zone.stop()
