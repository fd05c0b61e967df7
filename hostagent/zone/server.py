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

from common.files import ensure_secret
from hostagent import __version__
from hostagent.certificates import vault_backend
from hostagent.metrics import ZoneMetrics
from hostagent.sdnotify import Notifier
from hostagent.zone.api import zone_app
from hostagent.zone.config import ZoneServerConfig
from hostagent.zone.driver import Deliverer
from hostagent.zone.etcd import Etcd, Tls
from hostagent.zone.etcdstore import EtcdZoneStore
from hostagent.zone.service import ZoneService
from hostagent.zone.store import SqliteZoneStore, ZoneStore
from pki.backend import Backend
from pki.local import LocalBackend

log = logging.getLogger(__name__)


def make_backend(config: ZoneServerConfig) -> Backend:
    if config.pki.backend == "vault":
        assert config.pki.vault is not None  # the config's validator guarantees it
        return vault_backend(config.pki.vault)
    return LocalBackend(config.state_dir / "pki")


def make_store(config: ZoneServerConfig) -> ZoneStore:
    """The configured store, not started yet (Zone.start starts it)."""
    store = config.store
    if store.backend == "sqlite":
        return SqliteZoneStore(config.state_dir / "zone.db")
    etcd = Etcd(
        store.endpoints,
        Tls(store.ca_file, store.cert_file, store.key_file),
        dial_timeout_s=store.dial_timeout_s,
        request_timeout_s=store.request_timeout_s,
    )
    return EtcdZoneStore(etcd, store.prefix)


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
        self.deliverer = Deliverer(self.service, config.agents)
        self.metrics = ZoneMetrics(
            self._hosts_by_state,
            self._clusters_by_phase,
            lambda: len(self.deliverer.failing()),
            lambda: self.deliverer.passes,
        )
        self.admin_token = ensure_secret(config.state_dir / "api-token")
        self.host_secret = ensure_secret(config.state_dir / "host-secret")
        self.runner: web.AppRunner | None = None

    def _hosts_by_state(self) -> dict[str, int]:
        states = [host["state"] for host in self.service.hosts_view()]
        return _count(states, ("Ready", "NotReady"))

    def _clusters_by_phase(self) -> dict[str, int]:
        phases = [cluster["status"]["phase"] for cluster in self.service.clusters()]
        return _count(phases, ("Provisioning", "Ready", "Degraded", "Deleting"))

    async def start(self) -> None:
        await self.store.start()
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
        await self.service.finish_deletions()
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
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    await zone.stop()
