"""`hostagent serve`: wires the store, libvirt, network, reconciler and HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import ssl
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from common.errors import ProvisioningError
from hostagent import __version__, capacity, certificates
from hostagent.access import KvmDevice, check_qemu_can_reach, kvm_device
from hostagent.api import api_app, phone_home_app
from hostagent.config import Config, read_secret
from hostagent.errors import LibvirtUnavailable
from hostagent.images import ImageCatalog
from hostagent.kvmprobe import resolve_domain_type
from hostagent.metrics import Metrics
from hostagent.model import NodeKey, Phase
from hostagent.networks import MergedPeers, StaticPeers, StoredPeers, wanted_networks
from hostagent.nodes import NodeService
from hostagent.provisioner import Provisioner
from hostagent.reconciler import Reconciler
from hostagent.sdnotify import Notifier
from hostagent.store import Store
from hostagent.virt.libvirt import Libvirt
from hostagent.zoneclient import ZoneClient, host_report
from network.health import PeerHealth, check_peers
from network.model import ClusterNetworkWanted
from network.names import vxlan_name
from network.netlink import Netlink
from pki import layout
from pki.files import read_expiries
from pki.renewal import Renewer

log = logging.getLogger(__name__)
# A define or start slower than this is worth a warning: here they take milliseconds.
SLOW_CALLS = ("define", "start")
SLOW_CALL_S = 5.0
CA_NAMES = {cert.name for cert in layout.CERTS if cert.ca_only}


def ensure_token(path: Path) -> str:
    """The API token: created once with mode 0600, never logged."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip()


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
    def __init__(self, config: Config) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.state_dir.chmod(0o711)
        check_qemu_can_reach(
            config.libvirt.qemu_user, state_dir=config.state_dir, image_dir=config.images
        )
        self.token = ensure_token(config.token_file)
        self.store = Store(config.database)
        config.database.chmod(0o600)
        self.images = ImageCatalog(config.images)
        self.physical = physical_resources(config.state_dir)
        self.virt = Libvirt(
            config.libvirt.uri,
            workers=config.reconciler.concurrency + 2,
            on_lifecycle=self._on_lifecycle,
            on_reconnect=self._on_reconnect,
            on_timed=self._libvirt_timed,
        )
        self.pki = certificates.make_backend(config)
        self.renewer = Renewer(
            self.pki,
            lambda: certificates.renewal_targets(config, self.store.all()),
            key_type=certificates.key_type(config),
            ttl=certificates.ttl(config),
            fraction=config.pki.renew_fraction,
        )
        self.zone = self._zone_client(config)
        self.metrics = Metrics(
            self._phase_counts,
            lambda: self.virt.reconnects,
            self.renewer.status,
            self._expiries,
            self.zone.status if self.zone else None,
            kvm_unusable=lambda: self.kvm_device().problem is not None,
        )
        self.service = NodeService(config, self.store, self.images, self.physical, self._notify)
        self.netlink = Netlink()
        # The zone's lists first: where they and the configuration disagree on a MAC,
        # the zone's word is the newer one.
        self.stored_peers = StoredPeers(self.store, self._peers_changed)
        self.peer_source = MergedPeers(self.stored_peers, StaticPeers(config.network))
        self._networks_dirty = asyncio.Event()
        self.peer_health: dict[str, PeerHealth] = {}
        configured = config.libvirt.domain_type
        self.domain_type: str | None = None if configured == "auto" else configured
        self.domain_type_reason = "configured" if self.domain_type else "auto: not decided yet"
        self.reconciler: Reconciler | None = None
        self.runner: web.AppRunner | None = None
        self.sites: PhoneHomeSites | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _zone_client(self, config: Config) -> ZoneClient | None:
        if config.zone.url is None:
            return None
        assert config.zone.token_file is not None  # the config's validator guarantees it
        return ZoneClient(
            config.zone.url,
            config.host_id,
            read_secret(config.zone.token_file, "zone.token_file"),
            self._zone_report,
            ca_file=config.zone.ca_file,
            timeout_s=config.zone.timeout_s,
        )

    def _zone_report(self) -> dict[str, Any]:
        return host_report(
            self.config,
            api_token=self.token,
            allocatable=capacity.allocatable(self.physical, self.config.capacity),
            allocated=self.service.allocated(),
            domain_type=self.domain_type,
            records=self.store.all(),
        )

    def _peers_changed(self, cluster: str) -> None:
        log.info("cluster %s: peer list changed, rewiring the cluster networks", cluster)
        self._networks_dirty.set()

    async def rewire_networks_forever(self) -> None:
        """After peer lists changed: one pass covers every change made before it began."""
        while True:
            await self._networks_dirty.wait()
            self._networks_dirty.clear()
            if self.reconciler is None:
                continue
            try:
                await self.reconciler.provisioner.ensure_networks(self.store.all())
            except ProvisioningError as exc:
                log.warning("rewiring after a peer change failed; the next resync retries: %s", exc)
            except Exception:  # this loop ending would restart the agent (watchdog)
                log.exception("rewiring after a peer change crashed; the next resync retries")

    def _phase_counts(self) -> dict[Phase, int]:
        return dict(Counter(record.phase for record in self.store.all()))

    def _expiries(self) -> dict[tuple[str, str], datetime]:
        """Per node, when its first certificate (CAs aside) expires, from its manifest."""
        soonest = {}
        for record in self.store.all():
            folder = layout.host_dir(self.config.nodes_dir / record.key.cluster / record.key.name)
            leaves = [when for name, when in read_expiries(folder).items() if name not in CA_NAMES]
            if leaves:
                soonest[(record.key.cluster, record.key.name)] = min(leaves)
        return soonest

    def _notify(self, key: NodeKey) -> None:
        if self.reconciler is not None:
            self.reconciler.enqueue(key)

    def _on_lifecycle(self, domain: str) -> None:
        if self.reconciler is not None:
            self.reconciler.enqueue_domain(domain)

    def _on_reconnect(self) -> None:
        if self.reconciler is not None:
            asyncio.get_running_loop().create_task(self._after_reconnect())

    async def _after_reconnect(self) -> None:
        await self._resolve_domain_type()
        if self.reconciler is not None:
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
            if self.reconciler is not None:
                self.reconciler.provisioner.domain_type = self.domain_type

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

    def _warn_about_kvm_device(self) -> None:
        device = self.kvm_device()
        if device.problem is not None:
            log.warning("%s. Fix: %s", device.problem, device.fix)

    async def check_peers_forever(self) -> None:
        """Underlay health: ping every peer host of every cluster, now and then."""
        interval = self.config.network.peer_check_interval_s
        while True:
            addresses = {
                peer.address
                for network in self._networks()
                for peer in network.peers
                if peer.address != self.config.network.underlay_address
            }
            if addresses:
                timeout = self.config.network.peer_check_timeout_s
                self.peer_health = await check_peers(addresses, timeout)
            await asyncio.sleep(interval)

    def _networks(self) -> list[ClusterNetworkWanted]:
        with_underlay = self.config.network.underlay_address is not None
        return wanted_networks(self.store.all(), self.peer_source, with_underlay)

    def network_info(self) -> list[dict[str, Any]]:
        with_underlay = self.config.network.underlay_address is not None
        info = []
        for network in self._networks():
            peers = []
            for peer in sorted(network.peers, key=lambda p: p.address):
                if peer.address == self.config.network.underlay_address:
                    continue
                health = self.peer_health.get(peer.address)
                peers.append(
                    {
                        "address": peer.address,
                        "macs": sorted(peer.macs),
                        "reachable": health.reachable if health else None,
                        "rtt_ms": health.rtt_ms if health else None,
                        "checked_at": health.checked_at.isoformat() if health else None,
                    }
                )
            info.append(
                {
                    "cluster": network.cluster,
                    "vni": network.vni,
                    "bridge": network.bridge,
                    "vxlan": vxlan_name(network.vni) if with_underlay else None,
                    "address": network.address,
                    "mtu": network.mtu,
                    "peers": peers,
                }
            )
        return info

    async def host_info(self) -> dict[str, Any]:
        offer = capacity.allocatable(self.physical, self.config.capacity)
        used = self.service.allocated()
        return {
            "host_id": self.config.host_id,
            "capacity": _resources(self.physical),
            "allocatable": _resources(offer),
            "allocated": _resources(used),
            "domain_type": self.domain_type,
            "domain_type_reason": self.domain_type_reason,
            "kvm_device": self.kvm_device().as_dict(),
            "version": __version__,
            "libvirt_uri": self.config.libvirt.uri,
            "libvirt_connected": self.virt.connected.is_set(),
            "reconciler": self.reconciler.load() if self.reconciler else None,
            "underlay": {
                "address": self.config.network.underlay_address,
                "vxlan_port": self.config.network.vxlan_port,
            },
            "networks": self.network_info(),
            "zone": self.zone.status().as_dict() if self.zone else None,
        }

    async def start(self) -> None:
        self._warn_about_kvm_device()
        try:
            await self.virt.connect()
        except LibvirtUnavailable as exc:
            log.error("%s; starting anyway and retrying in the background", exc)
            self.virt.mark_lost()
        if self.virt.connected.is_set():
            await self._resolve_domain_type()
        phone_runner = web.AppRunner(phone_home_app(self.service), access_log=None)
        await phone_runner.setup()
        self.sites = PhoneHomeSites(phone_runner, self.config.phone_home.port)
        provisioner = Provisioner(
            self.config,
            self.images,
            self.virt,
            self.netlink,
            self.domain_type,
            self.sites.update,
            self.pki,
            self.peer_source,
        )
        self.reconciler = Reconciler(
            self.store,
            provisioner,
            self.config.reconciler,
            self.metrics,
            self.config.host_id,
            self.config.libvirt.shutdown_timeout_s,
        )
        await provisioner.ensure_networks(self.store.all())
        await self._serve_api()
        self._tasks = [
            asyncio.create_task(self.virt.supervise()),
            asyncio.create_task(self.reconciler.run()),
            asyncio.create_task(self.renewer.run()),
            asyncio.create_task(self.check_peers_forever()),
            asyncio.create_task(self.rewire_networks_forever()),
        ]
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
        app = api_app(
            self.service,
            self.token,
            peers=self.stored_peers,
            host_info=self.host_info,
            healthy=self.virt.alive,
            metrics_text=self.metrics.render,
            image_names=self.images.names,
        )
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        tls = None
        if self.config.api.tls_cert and self.config.api.tls_key:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.config.api.tls_cert, self.config.api.tls_key)
        site = web.TCPSite(self.runner, self.config.api.host, self.config.api.port, ssl_context=tls)
        await site.start()

    async def stop(self) -> None:
        """Stop serving; running VMs are left alone (they are adopted at the next start)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.runner is not None:
            await self.runner.cleanup()
        if self.sites is not None:
            await self.sites.runner.cleanup()
        await self.virt.close()
        self.netlink.close()
        self.store.close()


def _resources(r: capacity.Resources) -> dict[str, float]:
    return {"vcpus": r.vcpus, "memory_mib": r.memory_mib, "disk_gib": r.disk_gib}


async def serve(config: Config, environ: Mapping[str, str]) -> None:
    """Run the agent until SIGTERM/SIGINT, telling systemd (when it started us) how it goes."""
    notifier = Notifier.from_environ(environ, os.getpid())
    agent = Agent(config)
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
    # A background loop that ended has crashed (they all run forever): let systemd restart us.
    watchdog = asyncio.create_task(
        notifier.feed_watchdog(lambda: not any(task.done() for task in agent._tasks))
    )
    await stop.wait()
    notifier.notify("STOPPING=1")
    log.info("stopping; VMs keep running")
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    await agent.stop()
