"""The agent's side of node certificates: which backend, whose files, what to renew.

The pki package does the work (keys on this host, CSRs signed by the cluster's CAs,
atomic files); this module only turns the agent's configuration and records into its
inputs. Secrets are read from their files once, at start, and never logged.
"""

from __future__ import annotations

import pwd
import ssl
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from common.errors import ProvisioningError
from hostagent.config import Config, VaultConfig, read_secret
from hostagent.errors import ConfigError
from hostagent.store import NodeRecord
from pki import layout
from pki.backend import Backend
from pki.certset import NodeIdentity
from pki.files import read_expiries
from pki.keys import KeyType
from pki.local import LocalBackend
from pki.renewal import RenewalTarget


def make_backend(config: Config, zone_tls: ssl.SSLContext | None = None) -> Backend:
    """zone_tls: with mutual TLS, the context that presents the host's certificate of
    the zone (hostagent/zonetls.py); the zone backend then sends no token."""
    if config.pki.backend == "local":
        return LocalBackend(config.state_dir)
    if config.pki.backend == "zone":
        return _zone_backend(config, zone_tls)
    assert config.pki.vault is not None  # the config's validator guarantees it
    return vault_backend(config.pki.vault)


def vault_backend(vault: VaultConfig) -> Backend:
    """The Vault backend of a [pki.vault] section (the agent's, or the zone's)."""
    from pki.vault import VaultBackend, VaultSettings

    return VaultBackend(
        VaultSettings(
            url=vault.url,
            ca_bundle=vault.ca_bundle,
            token=_secret(vault, "token_file"),
            role_id=_secret(vault, "role_id_file"),
            secret_id=_secret(vault, "secret_id_file"),
            approle_mount=vault.approle_mount,
            mount_prefix=vault.mount_prefix,
            kv_mount=vault.kv_mount,
        )
    )


def _zone_backend(config: Config, zone_tls: ssl.SSLContext | None) -> Backend:
    from pki.zone import ZoneBackend, ZoneSettings

    zone = config.zone
    assert zone.url is not None and zone.token_file is not None  # the config's validators
    token = None if zone_tls else read_secret(zone.token_file, "zone.token_file")
    return ZoneBackend(
        ZoneSettings(
            url=zone.url,
            token=token,
            ca_file=zone.ca_file,
            timeout=zone.timeout_s,
            tls=zone_tls,
            urls=zone.urls,
        )
    )


def _secret(vault: VaultConfig, key: str) -> str | None:
    path: Path | None = getattr(vault, key)
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"pki.vault.{key}: cannot read {path}: {exc.strerror}") from exc


def key_type(config: Config) -> KeyType:
    return KeyType(config.pki.key_type)


def ttl(config: Config) -> timedelta:
    return timedelta(days=config.pki.ttl_days)


def identity(record: NodeRecord) -> NodeIdentity:
    """What the node's certificates depend on, from its record."""
    spec = record.spec
    try:
        return NodeIdentity(
            cluster=record.key.cluster,
            name=record.key.name,
            role=spec.role.value,
            address=str(spec.network.interface.ip),
            service_cidr=spec.cluster.service_cidr,
            cluster_domain=spec.cluster.cluster_domain,
            api_endpoint=spec.cluster.api_endpoint,
            vip=spec.cluster.vip,
        )
    except ValueError as exc:
        raise ProvisioningError(f"certificates of {record.key}: {exc}") from exc


def qemu_owner(config: Config) -> tuple[int, int]:
    """Files in the share are read by QEMU's user (9p passthrough), nobody else."""
    user = pwd.getpwnam(config.libvirt.qemu_user)
    return user.pw_uid, user.pw_gid


def renewal_targets(config: Config, records: Iterable[NodeRecord]) -> list[RenewalTarget]:
    uid, gid = qemu_owner(config)
    return [
        RenewalTarget(
            identity(record),
            layout.host_dir(config.nodes_dir / record.key.cluster / record.key.name),
            uid,
            gid,
        )
        for record in records
        if not record.deleting
    ]


# The CA files a node's directory holds are not the node's own certificates.
_CA_NAMES = {cert.name for cert in layout.CERTS if cert.ca_only}


def soonest_expiries(
    nodes_dir: Path, records: Iterable[NodeRecord]
) -> dict[tuple[str, str], datetime]:
    """Per node, when its first certificate (CAs aside) expires, from its manifest."""
    soonest = {}
    for record in records:
        folder = layout.host_dir(nodes_dir / record.key.cluster / record.key.name)
        leaves = [when for name, when in read_expiries(folder).items() if name not in _CA_NAMES]
        if leaves:
            soonest[(record.key.cluster, record.key.name)] = min(leaves)
    return soonest
