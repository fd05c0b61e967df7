"""Pure: what a node's cloud-config templates may know, from its record and its peers."""

from __future__ import annotations

from collections.abc import Iterable

from cloudconfig import render
from cloudconfig.context import Extensions, ExtraFile, ExtraUnit, MasterPeer, NodeContext
from common.errors import ProvisioningError
from hostagent.config import Config, RoleExtensions
from hostagent.model import NodeKey, NodeSpec, Role
from hostagent.store import NodeRecord
from network import names

ETCD_DISK_SERIAL = "etcd"  # the guest sees /dev/disk/by-id/virtio-etcd
ETCD_GUEST_DEVICE = f"/dev/disk/by-id/virtio-{ETCD_DISK_SERIAL}"


def phone_home_url(key: NodeKey, spec: NodeSpec, port: int) -> str:
    return f"http://{spec.network.gateway}:{port}/v1/phone-home/{key.cluster}/{key.name}"


def cluster_masters(record: NodeRecord, peers: Iterable[NodeRecord]) -> tuple[MasterPeer, ...]:
    """The cluster's masters: the spec's list, else this cluster's masters on this host
    (the node itself included), by name."""
    listed = record.spec.cluster.masters
    if listed:
        return tuple(MasterPeer(master.name, master.address) for master in listed)
    here = {
        other.key.name: other
        for other in (*peers, record)
        if other.key.cluster == record.key.cluster
        and other.spec.role is Role.MASTER
        and not other.deleting
    }
    return tuple(
        MasterPeer(name, str(here[name].spec.network.interface.ip)) for name in sorted(here)
    )


def role_extensions(config: RoleExtensions) -> Extensions:
    """The agent config's additions for a role, as the templates see them."""
    return Extensions(
        files=tuple(ExtraFile(f.path, f.content, f.permissions) for f in config.files),
        units=tuple(ExtraUnit(u.name, u.content, u.enable) for u in config.units),
        commands=tuple(config.commands),
    )


def node_context(
    config: Config, record: NodeRecord, peers: Iterable[NodeRecord] = ()
) -> NodeContext:
    """What the node's templates may know. `peers` (the other nodes on this host)
    supply the cluster's masters when the spec lists none; ProvisioningError when
    the result cannot be rendered (say, a worker with no master known)."""
    spec, key, cluster = record.spec, record.key, record.spec.cluster
    ctx = NodeContext(
        cluster=key.cluster,
        node=key.name,
        role=spec.role.value,
        hostname=key.name,
        instance_id=f"{key.domain}-{spec.spec_hash()}",
        mac=names.mac_address(key.cluster, key.name),
        address=spec.network.address,
        gateway=spec.network.gateway,
        mtu=spec.network.mtu,
        kubernetes_version=spec.kubernetes_version,
        ssh_authorized_keys=tuple(spec.ssh_authorized_keys),
        phone_home_url=phone_home_url(key, spec, config.phone_home.port),
        phone_home_token=record.token,
        health_report_interval_s=config.health.report_interval_s,
        masters=cluster_masters(record, peers),
        api_endpoint=cluster.api_endpoint or "",
        pod_cidr=cluster.pod_cidr,
        service_cidr=cluster.service_cidr,
        cluster_domain=cluster.cluster_domain,
        etcd_disk=ETCD_GUEST_DEVICE if spec.etcd_disk_size else None,
        etcd_mode=cluster.etcd_mode.value,
        vip=cluster.vip or "",
        vni=spec.network.vni,
        extensions=role_extensions(config.cloudconfig.extensions(spec.role.value)),
    )
    try:
        render.check_context(ctx)
    except ValueError as exc:
        raise ProvisioningError(f"cloud-config of {key}: {exc}") from exc
    return ctx
