"""Side effects of making and removing one node: files, disks, config drive, network, domain.

Each method is idempotent: running it again after a crash or a restart does the same
thing or nothing. The reconciler decides which to call.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from cloudconfig.configdrive import build_config_drive, config_drive_files
from cloudconfig.context import NodeContext
from common.errors import ProvisioningError
from hostagent import certificates, console, networks
from hostagent.config import Config
from hostagent.errors import ImageNotReady, LibvirtUnavailable
from hostagent.images import Image, ImageCatalog
from hostagent.model import NodeKey, NodeSpec
from hostagent.networks import PeerSource
from hostagent.nodecontext import ETCD_DISK_SERIAL, node_context
from hostagent.store import NodeRecord
from hostagent.testhooks import Hook, Point
from hostagent.virt import disk
from hostagent.virt.domain import DataDisk, DomainMeta, DomainParams, domain_xml
from hostagent.virt.libvirt import Libvirt
from network import names
from network.model import ClusterNetworkWanted, NetworkError
from network.netlink import Netlink
from network.nftables import NfTables
from pki import layout
from pki.backend import Backend
from pki.errors import BackendUnavailable
from pki.provision import provision_node

log = logging.getLogger(__name__)


NO_SPACE = os.strerror(errno.ENOSPC)  # qemu-img says it only in words


def _disk_full(message: str, files: NodeFiles) -> str:
    """The message, and what to do when it is ENOSPC (each part wrote whole files or
    nothing, so freeing space and PUTting the node again is all it takes)."""
    if NO_SPACE not in message:
        return message
    return (
        f"{message}; the filesystem holding {files.root} is full (see `df -h {files.root}`): "
        "free space there"
    )


async def _all(*steps: Awaitable[None]) -> None:
    """Run the steps at once, each to its end, then raise the first error."""
    for result in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


def _remove_temporaries(files: NodeFiles) -> None:
    """What an agent killed while writing the config drive left (common.files names its
    temporaries so; the certificate directory's are the PKI's to remove, under its lock)."""
    for temporary in files.root.glob(f".{files.config_drive.name}.*.tmp"):
        temporary.unlink(missing_ok=True)


class NodeFiles:
    """Where a node's files live on the host."""

    def __init__(self, nodes_dir: Path, key: NodeKey) -> None:
        self.root = nodes_dir / key.cluster / key.name
        self.disk = self.root / "disk.qcow2"
        self.etcd_disk = self.root / "etcd.qcow2"
        self.config_drive = self.root / "cidata.iso"
        self.pki = layout.host_dir(self.root)
        self.console_log = self.root / console.CONSOLE_LOG


class Provisioner:
    def __init__(
        self,
        config: Config,
        images: ImageCatalog,
        virt: Libvirt,
        netlink: Netlink,
        nftables: NfTables,
        domain_type: str | None,
        on_networks: Callable[[list[ClusterNetworkWanted]], Awaitable[None]],
        pki: Backend,
        peers: PeerSource,
        hook: Hook | None = None,
        *,
        image_waiting: Callable[[str], str | None] = lambda _name: None,
    ) -> None:
        self.config = config
        self.images = images
        self.virt = virt
        self.netlink = netlink
        self.nftables = nftables
        self.domain_type = domain_type
        self.on_networks = on_networks
        self.pki = pki
        self.peers = peers
        self.hook = hook or Hook()  # test-only fault injection; inert unless a test asks
        self.image_waiting = image_waiting  # why a node waits for its image, or None
        self.underlay = networks.underlay(config.network)
        self._network_lock = asyncio.Lock()

    def files(self, key: NodeKey) -> NodeFiles:
        return NodeFiles(self.config.nodes_dir, key)

    def image(self, spec: NodeSpec) -> Image:
        image = self.images.get(spec.image)
        if image is None and (waiting := self.image_waiting(spec.image)) is not None:
            raise ImageNotReady(waiting)
        if image is None:
            raise ProvisioningError(
                f"image {spec.image!r} is not on this host (known: {self.images.names()}); "
                "build or copy it into the image directory, then PUT the node again"
            )
        return image

    async def ensure_networks(self, records: Iterable[NodeRecord]) -> None:
        wanted = networks.wanted_networks(records, self.peers, self.underlay is not None)
        async with self._network_lock:
            try:
                await asyncio.to_thread(
                    self.netlink.reconcile, wanted, self.underlay, host=self.config.host_id
                )
                # After the bridges, so the table names only bridges the plan found ours; a
                # new bridge has no guest until this returns and the cluster's VMs start.
                await asyncio.to_thread(
                    self.nftables.reconcile,
                    wanted,
                    host=self.config.host_id,
                    tcp_ports=(self.config.phone_home.port,),
                )
            except NetworkError as exc:
                raise ProvisioningError(f"cluster network: {exc}") from exc
            await self.on_networks(wanted)

    async def prepare_files(self, record: NodeRecord, peers: Iterable[NodeRecord]) -> None:
        """Certificates, config drive and disks: independent of each other, made at once.

        Every part runs to its end even when another fails (each is idempotent, and none
        may still be writing when the reconciler retries); then the first error is raised,
        as a ProvisioningError that says so when the disk is full.
        """
        files = self.files(record.key)
        image = self.image(record.spec)
        try:
            await asyncio.to_thread(self._make_dirs, files)
            await asyncio.to_thread(_remove_temporaries, files)
            self.hook.reached(Point.DIRECTORIES)
            context = self.context(record, peers)
            await _all(
                self._certificates(record, files),
                self._config_drive(context, files),
                self._disks(record, image, files),
            )
            self.hook.reached(Point.FILES)
        except OSError as exc:
            raise ProvisioningError(_disk_full(f"writing {files.root}: {exc}", files)) from exc
        except ProvisioningError as exc:
            if NO_SPACE not in str(exc) or isinstance(exc, BackendUnavailable):
                raise
            raise ProvisioningError(_disk_full(str(exc), files)) from exc

    async def _certificates(self, record: NodeRecord, files: NodeFiles) -> None:
        uid, gid = certificates.qemu_owner(self.config)
        await provision_node(
            self.pki,
            certificates.identity(record),
            files.pki,
            key_type=certificates.key_type(self.config),
            ttl=certificates.ttl(self.config),
            uid=uid,
            gid=gid,
        )
        self.hook.reached(Point.CERTIFICATES)

    async def _config_drive(self, context: NodeContext, files: NodeFiles) -> None:
        cloudconfig = self.config.cloudconfig
        try:
            contents = await asyncio.to_thread(
                config_drive_files, context, cloudconfig.template_dir, cloudconfig.calico_manifest
            )
        except ValueError as exc:  # e.g. an operator's override template that fails
            raise ProvisioningError(f"rendering the cloud-config failed: {exc}") from exc
        await asyncio.to_thread(build_config_drive, files.config_drive, contents)
        self.hook.reached(Point.CONFIG_DRIVE)

    async def _disks(self, record: NodeRecord, image: Image, files: NodeFiles) -> None:
        timeout_s = self.config.libvirt.qemu_img_timeout_s
        overlay = disk.ensure_overlay(
            files.disk, image.disk, record.spec.disk_gib, timeout_s=timeout_s
        )
        etcd_size = record.spec.etcd_disk_size
        if etcd_size is None:
            await overlay
        else:
            # etcd's data lives apart from the root disk, which may be re-created (a new
            # image): losing etcd with it was Giantnetes' worst recurring failure.
            etcd = disk.ensure_blank(files.etcd_disk, etcd_size, timeout_s=timeout_s)
            await _all(overlay, etcd)
        self.hook.reached(Point.DISK)

    def _make_dirs(self, files: NodeFiles) -> None:
        # QEMU runs as its own user: it must traverse to the node's files and read the
        # certificate share, which nobody else may read.
        for directory in (
            self.config.state_dir,
            self.config.nodes_dir,
            files.root.parent,
            files.root,
        ):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o711)
        files.pki.mkdir(exist_ok=True)
        qemu = pwd.getpwnam(self.config.libvirt.qemu_user)
        os.chown(files.pki, qemu.pw_uid, qemu.pw_gid)
        files.pki.chmod(0o700)

    def context(self, record: NodeRecord, peers: Iterable[NodeRecord] = ()) -> NodeContext:
        return node_context(self.config, record, peers)

    def domain_params(self, record: NodeRecord) -> DomainParams:
        if self.domain_type is None:
            raise LibvirtUnavailable("the domain type is not known until libvirt answers")
        spec, key, files = record.spec, record.key, self.files(record.key)
        image = self.image(spec)
        return DomainParams(
            name=key.domain,
            domain_type=self.domain_type,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            disk=files.disk,
            config_drive=files.config_drive,
            pki_dir=files.pki,
            pki_tag=layout.MOUNT_TAG,
            console_log=files.console_log,
            bridge=names.bridge_name(spec.network.vni),
            tap=names.tap_name(key.cluster, key.name),
            mac=names.mac_address(key.cluster, key.name),
            mtu=spec.network.mtu,
            meta=DomainMeta(key.cluster, key.name, self.config.host_id, spec.spec_hash()),
            data_disks=(
                (DataDisk(files.etcd_disk, "vdb", ETCD_DISK_SERIAL),) if spec.etcd_disk_size else ()
            ),
        )

    async def define(self, record: NodeRecord) -> None:
        await self.virt.define(domain_xml(self.domain_params(record)))

    async def cluster_gone(self, cluster: str) -> None:
        """The cluster's last node left this host: revoke and remove its certificates."""
        if not self.config.pki.revoke_on_last_node:
            return
        try:
            await asyncio.to_thread(self.pki.revoke_cluster, cluster)
        except ProvisioningError as exc:
            log.warning("revoking the certificates of cluster %s failed: %s", cluster, exc)

    async def remove_files(self, key: NodeKey) -> None:
        files = self.files(key)
        await asyncio.to_thread(shutil.rmtree, files.root, ignore_errors=True)
        cluster_dir = files.root.parent
        if cluster_dir.is_dir() and not any(cluster_dir.iterdir()):
            cluster_dir.rmdir()
