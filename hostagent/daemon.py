"""`hostagent serve`: composes the store, libvirt, network, reconciler, loops and HTTP
servers into one Agent, starts and stops it. What /v1/host shows is shaped in
hostview.py, the background loops live in loops.py."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import ssl
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from common import tasks as tasks_
from common.files import ensure_secret
from hostagent import __version__, capacity, certificates
from hostagent.access import KvmDevice, check_qemu_can_reach, kvm_device
from hostagent.api import api_app, phone_home_app
from hostagent.bootwatch import BootWatch
from hostagent.config import Config, read_secret
from hostagent.errors import LibvirtUnavailable
from hostagent.hostview import HostFacts, host_view, network_view
from hostagent.imagecache import ImageCollector
from hostagent.imagepull import ImagePuller
from hostagent.images import ImageCatalog, ImageLayout
from hostagent.imageservice import ImageService
from hostagent.kvmprobe import resolve_domain_type
from hostagent.loops import HealthMonitor, NetworkRewirer, PeerMonitor
from hostagent.metrics import Metrics
from hostagent.model import NodeKey
from hostagent.networks import MergedPeers, StaticPeers, StoredPeers, wanted_networks
from hostagent.nodehealth import HealthBook
from hostagent.nodes import NodeService
from hostagent.provisioner import Provisioner
from hostagent.reconciler import Reconciler
from hostagent.sdnotify import Notifier
from hostagent.store import Store
from hostagent.testhooks import Hook
from hostagent.virt.libvirt import Libvirt
from hostagent.zoneclient import ZoneClient, host_report
from hostagent.zonetls import ZoneIdentity
from network.model import ClusterNetworkWanted
from network.netlink import Netlink
from network.nftables import NfTables
from pki.renewal import Renewer

log = logging.getLogger(__name__)
# A define or start slower than this is worth a warning: here they take milliseconds.
SLOW_CALLS = ("define", "start")
SLOW_CALL_S = 5.0


def physical_resources(state_dir: Path) -> capacity.Resources:
    return capacity.Resources(
        vcpus=psutil.cpu_count() or 1,
        memory_mib=psutil.virtual_memory().total // 2**20,
        disk_gib=psutil.disk_usage(str(state_dir)).total // 2**30,
    )


class PhoneHomeSites:
    """One listener per cluster gateway address, so guests reach only phone-home."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port
        self.sites: dict[str, web.TCPSite] = {}

    async def update(self, bridges: list[ClusterNetworkWanted]) -> None:
        wanted = {bridge.address.split("/")[0] for bridge in bridges}
        for address in set(self.sites) - wanted:
            await self.sites.pop(address).stop()
        for address in wanted - set(self.sites):
            site = web.TCPSite(self.runner, address, self.port, reuse_address=True)
            await site.start()
            self.sites[address] = site
            log.info("phone-home listening on %s:%d", address, self.port)


class Agent:
    """Every part of the agent, made here; start() brings them up, stop() down."""

    def __init__(self, config: Config, hook: Hook | None = None) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.state_dir.chmod(0o711)
        check_qemu_can_reach(
            config.libvirt.qemu_user, state_dir=config.state_dir, image_dir=config.images
        )
        self.token = ensure_secret(config.token_file, lambda: secrets.token_hex(32))
        self.store = Store(config.database)
        self.image_puller = ImagePuller(
            self.store,
            ImageLayout(config.pulled_images),
            config.image_cache,
            qemu_img_timeout_s=config.libvirt.qemu_img_timeout_s,
            counted=lambda ok: self.metrics.image_pulled(ok),
        )
        self.images = ImageCatalog(config.images, self.image_puller)
        self.image_service = ImageService(self.store, self.images, self.image_puller)
        self.physical = physical_resources(config.state_dir)
        configured = config.libvirt.domain_type
        self.domain_type: str | None = None if configured == "auto" else configured
        self.domain_type_reason = "configured" if self.domain_type else "auto: not decided yet"
        self.virt = Libvirt(
            config.libvirt.uri,
            workers=config.reconciler.concurrency + 2,
            on_lifecycle=self._on_lifecycle,
            on_reconnect=self._on_reconnect,
            on_timed=self._libvirt_timed,
        )
        self._api_tls: ssl.SSLContext | None = None
        self.identity = (
            ZoneIdentity(config, on_ca=self._trust_zone_ca) if config.zone_mtls else None
        )
        self.pki = certificates.make_backend(config, self.identity.tls if self.identity else None)
        self.renewer = Renewer(
            self.pki,
            lambda: certificates.renewal_targets(config, self.store.all()),
            key_type=certificates.key_type(config),
            ttl=certificates.ttl(config),
            fraction=config.pki.renew_fraction,
            on_renewed=self._renewed,
        )
        self.zone = self._zone_client(config)
        self.health = HealthBook()
        self.metrics = Metrics(
            lambda: dict(Counter(record.phase for record in self.store.all())),
            lambda: self.virt.reconnects,
            self.renewer.status,
            lambda: certificates.soonest_expiries(config.nodes_dir, self.store.all()),
            self.zone.status if self.zone else None,
            kvm_unusable=lambda: self.kvm_device().problem is not None,
            unhealthy=self.health.unhealthy,
            images=lambda: dict(Counter(image.phase.value for image in self.store.images())),
            image_bytes=self.image_puller.held_bytes,
            peers=lambda: {a: h.reachable for a, h in self.peers.health.items()},
        )
        self.image_collector = ImageCollector(
            self.store,
            self.image_puller,
            config.image_cache,
            self.metrics.image_removed,
            lambda: self.metrics.loop_error("images"),
        )
        self.service = NodeService(
            config, self.store, self.images, self.physical, self._enqueue, self.health
        )
        self.netlink = Netlink()
        self.rewirer = NetworkRewirer(
            lambda: self.provisioner.ensure_networks(self.store.all()),
            lambda: self.metrics.loop_error("rewirer"),
        )
        # The zone's lists first: where they and the configuration disagree on a MAC,
        # the zone's word is the newer one.
        self.stored_peers = StoredPeers(self.store, self.rewirer.peers_changed)
        self.peer_source = MergedPeers(self.stored_peers, StaticPeers(config.network))
        self.peers = PeerMonitor(
            self._peer_addresses,
            config.network.peer_check_interval_s,
            config.network.peer_check_timeout_s,
            lambda: self.metrics.loop_error("peers"),
        )
        self.sites = PhoneHomeSites(
            web.AppRunner(phone_home_app(self.service), access_log=None), config.phone_home.port
        )
        self.provisioner = Provisioner(
            config,
            self.images,
            self.virt,
            self.netlink,
            NfTables(),
            self.domain_type,
            self.sites.update,
            self.pki,
            self.peer_source,
            hook,
            image_waiting=self.image_service.waiting,
        )
        self.reconciler = Reconciler(
            self.store,
            self.provisioner,
            config.reconciler,
            self.metrics,
            config.host_id,
            config.libvirt.shutdown_timeout_s,
        )
        self.health_monitor = HealthMonitor(
            self.health,
            self.store.all,
            lambda: self.virt.owned_domains(config.host_id),
            self.reconciler.starts,
            config.health,
            lambda: self.metrics.loop_error("health"),
        )
        self.boot_watch = BootWatch(
            self.store,
            config.nodes_dir,
            config.health.boot_timeout_s,
            config.health.check_interval_s,
            lambda: self.metrics.loop_error("health"),
        )
        self.runner = web.AppRunner(self._api_app(), access_log=None)
        self._tasks: list[asyncio.Task[None]] = []

    def _zone_client(self, config: Config) -> ZoneClient | None:
        if config.zone.url is None:
            return None
        assert config.zone.token_file is not None  # the config's validator guarantees it
        if self.identity is not None:
            return ZoneClient(
                config.zone.url,
                config.host_id,
                None,
                self._zone_report,
                identity=self.identity,
                timeout_s=config.zone.timeout_s,
                urls=config.zone.urls,
            )
        return ZoneClient(
            config.zone.url,
            config.host_id,
            read_secret(config.zone.token_file, "zone.token_file"),
            self._zone_report,
            ca_file=config.zone.ca_file,
            timeout_s=config.zone.timeout_s,
            urls=config.zone.urls,
        )

    def _api_app(self) -> web.Application:
        return api_app(
            self.service,
            self.token,
            peers=self.stored_peers,
            host_info=self.host_info,
            healthy=self.virt.alive,
            metrics_text=self.metrics.render,
            images=self.image_service,
        )

    # --- what the parts tell each other ------------------------------------------------

    def _zone_report(self) -> dict[str, Any]:
        # With mutual TLS and an API over TLS the zone calls with its certificate: it
        # gets no token of this agent.
        takes_zone_cert = self.identity is not None and self.config.api.tls_cert is not None
        return host_report(
            self.config,
            api_token=None if takes_zone_cert else self.token,
            allocatable=capacity.allocatable(self.physical, self.config.capacity),
            allocated=self.service.allocated(),
            domain_type=self.domain_type,
            records=self.store.all(),
            health=self.health.get,
            images=self.image_service.all(),
        )

    async def _renewed(self, cluster: str, node: str, names: list[str]) -> None:
        key = NodeKey(cluster=cluster, name=node)
        if self.store.get(key) is not None:  # not for a node deleted meanwhile
            await self.store.add_event(key, "certificate-renewed", f"renewed {', '.join(names)}")

    def _trust_zone_ca(self, ca_file: Path) -> None:
        """The zone's CA verifies the zone's client certificate on the API, unless
        [api] client_ca_file names another."""
        if self._api_tls is not None and self.config.api.client_ca_file is None:
            self._api_tls.load_verify_locations(cafile=str(ca_file))

    def _enqueue(self, key: NodeKey) -> None:
        self.reconciler.enqueue(key)

    def _on_lifecycle(self, domain: str) -> None:
        self.reconciler.enqueue_domain(domain)

    def _on_reconnect(self) -> None:
        asyncio.get_running_loop().create_task(self._after_reconnect())

    async def _after_reconnect(self) -> None:
        await self._resolve_domain_type()
        await self.reconciler.resync()

    async def _resolve_domain_type(self) -> None:
        """auto: probe once libvirt answers; nodes wait for it (define refuses meanwhile)."""
        if self.domain_type is None:
            try:
                choice = await resolve_domain_type(self.config, self.virt, self.images)
            except LibvirtUnavailable as exc:
                log.warning("domain type: undecided until libvirt answers again (%s)", exc)
                return
            self.domain_type, self.domain_type_reason = choice.domain_type, choice.reason
            self.provisioner.domain_type = self.domain_type

    def kvm_device(self) -> KvmDevice:
        return kvm_device(self.config.libvirt.qemu_user)

    def _libvirt_timed(self, call: str, seconds: float) -> None:
        self.metrics.libvirt_call_seconds.labels(call=call).observe(seconds)
        if call in SLOW_CALLS and seconds > SLOW_CALL_S:
            problem = self.kvm_device().problem
            log.warning(
                "libvirt took %.1fs to %s a domain (%s)",
                seconds,
                call,
                f"{problem}; see docs/operations.md" if problem else "is libvirtd overloaded?",
            )

    def _networks(self) -> list[ClusterNetworkWanted]:
        with_underlay = self.config.network.underlay_address is not None
        return wanted_networks(self.store.all(), self.peer_source, with_underlay)

    def _peer_addresses(self) -> set[str]:
        return {
            peer.address
            for network in self._networks()
            for peer in network.peers
            if peer.address != self.config.network.underlay_address
        }

    async def host_info(self) -> dict[str, Any]:
        facts = HostFacts(
            host_id=self.config.host_id,
            physical=self.physical,
            allocatable=capacity.allocatable(self.physical, self.config.capacity),
            allocated=self.service.allocated(),
            domain_type=self.domain_type,
            domain_type_reason=self.domain_type_reason,
            kvm=self.kvm_device(),
            libvirt_uri=self.config.libvirt.uri,
            libvirt_connected=self.virt.connected.is_set(),
            reconciler=self.reconciler.load(),
            underlay_address=self.config.network.underlay_address,
            vxlan_port=self.config.network.vxlan_port,
            zone=self.zone.status().as_dict() if self.zone else None,
        )
        underlay = self.config.network.underlay_address
        return host_view(facts, network_view(self._networks(), underlay, self.peers.health))

    # --- start and stop ---------------------------------------------------------------

    def running(self) -> bool:
        """Whether every background loop still runs (they all run forever)."""
        return not any(task.done() for task in self._tasks)

    async def start(self) -> None:
        device = self.kvm_device()
        if device.problem is not None:
            log.warning("%s. Fix: %s", device.problem, device.fix)
        try:
            await self.virt.connect()
        except LibvirtUnavailable as exc:
            log.error("%s; starting anyway and retrying in the background", exc)
            self.virt.mark_lost()
        if self.virt.connected.is_set():
            await self._resolve_domain_type()
        await self.sites.runner.setup()
        await self.image_puller.start()
        await self.provisioner.ensure_networks(self.store.all())
        await self._serve_api()
        self._tasks = [
            asyncio.create_task(self.virt.supervise()),
            asyncio.create_task(self.reconciler.run()),
            asyncio.create_task(self.renewer.run()),
            asyncio.create_task(self.peers.run()),
            asyncio.create_task(self.rewirer.run()),
            asyncio.create_task(self.health_monitor.run()),
            asyncio.create_task(self.image_collector.run()),
            asyncio.create_task(self.boot_watch.run()),
        ]
        if self.identity is not None:
            self._tasks.append(asyncio.create_task(self.identity.run()))
        if self.zone is not None:
            self._tasks.append(asyncio.create_task(self.zone.run()))
        await self.reconciler.resync()
        log.info("certificates from the %s", self.pki.description)
        if self.zone is not None:
            log.info("reporting to the zone at %s as %s", self.zone.url, self.config.agent_url)
        log.info(
            "hostagent %s serving on %s (host %s, domain type %s)",
            __version__,
            self.config.api.listen,
            self.config.host_id,
            self.domain_type,
        )

    async def _serve_api(self) -> None:
        await self.runner.setup()
        api = self.config.api
        if api.tls_cert and api.tls_key:
            self._api_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._api_tls.load_cert_chain(api.tls_cert, api.tls_key)
            if api.client_ca_file is not None or self.identity is not None:
                # The zone's client certificate, asked for (the CLI brings the token)
                self._api_tls.verify_mode = ssl.CERT_OPTIONAL
            if api.client_ca_file is not None:
                self._api_tls.load_verify_locations(cafile=str(api.client_ca_file))
            elif self.identity is not None and self.identity.ready.is_set():
                self._trust_zone_ca(self.identity.ca_file)
        site = web.TCPSite(self.runner, api.host, api.port, ssl_context=self._api_tls)
        await site.start()

    async def stop(self) -> None:
        """Stop serving; running VMs are left alone (they are adopted at the next start).
        Safe at any point of a start that failed, and before start."""
        await tasks_.cancel(*self._tasks)
        await self.image_puller.close()
        await self.runner.cleanup()
        await self.sites.runner.cleanup()
        await self.virt.close()
        self.netlink.close()
        self.store.close()


async def serve(config: Config, environ: Mapping[str, str]) -> None:
    """Run the agent until SIGTERM/SIGINT, telling systemd (when it started us) how it goes."""
    notifier = Notifier.from_environ(environ, os.getpid())
    agent = Agent(config, Hook.from_environ(environ))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except BaseException:
        await agent.stop()
        raise
    notifier.notify("READY=1")
    # A background loop that ended has crashed: let systemd restart us.
    watchdog = asyncio.create_task(notifier.feed_watchdog(agent.running))
    await stop.wait()
    notifier.notify("STOPPING=1")
    log.info("stopping; VMs keep running")
    await tasks_.cancel(watchdog)
    await agent.stop()
