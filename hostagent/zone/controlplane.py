"""The zone's side of mutual TLS (docs/zone.md, "Mutual TLS"): its control-plane CA on
disk, the certificates it issues to hosts, its own client certificate, and the TLS
contexts of its server (asking for client certificates) and of its calls to agents.

The CA is `[control_ca] cert_file`/`key_file` when given, else <state_dir>/control-ca/
ca.crt and ca.key, made on the first start (the key 0600; under a lock on the folder, as
replicas sharing a state_dir start at once). It is never a cluster's CA: the clusters' PKI
lives in [pki]."""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import http
from common.files import write_atomically
from hostagent.config import ApiConfig
from hostagent.errors import ConfigError
from hostagent.zone.config import ControlCaConfig
from pki import controlca

log = logging.getLogger(__name__)


class ControlPlane:
    def __init__(self, config: ControlCaConfig, state_dir: Path) -> None:
        self.directory = state_dir / "control-ca"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.host_ttl = dt.timedelta(days=config.host_cert_ttl_days)
        self.zone_ttl = dt.timedelta(days=config.zone_cert_ttl_days)
        if config.cert_file is not None and config.key_file is not None:
            self.ca_file, key_file = config.cert_file, config.key_file
        else:
            self.ca_file, key_file = _ensure_ca(self.directory)
        try:
            self.ca_pem = self.ca_file.read_text()
            self._key_pem = key_file.read_text()
            controlca.check_ca(self.ca_pem, self._key_pem)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"control_ca: cannot use {self.ca_file} and {key_file} as the zone's "
                f"control-plane CA: {exc}"
            ) from exc
        self.zone_cert_file = self.directory / "zone-client.pem"

    def issue_host(self, csr_pem: str, host: str) -> controlca.Issued:
        """A client certificate naming host; controlca.BadRequest for a bad CSR."""
        return controlca.sign_host(self.ca_pem, self._key_pem, csr_pem, host, self.host_ttl)

    def refresh_zone_cert(self) -> dt.datetime:
        """A new client certificate of the zone (key and certificate in one 0600 file,
        replaced atomically); when to make the next one."""
        key_pem, issued = controlca.sign_zone_client(self.ca_pem, self._key_pem, self.zone_ttl)
        write_atomically(self.zone_cert_file, (key_pem + issued.cert_pem).encode(), 0o600)
        return controlca.renew_at(issued.not_before, issued.not_after)

    def server_tls(self, api: ApiConfig) -> ssl.SSLContext | None:
        """The API's TLS: its server certificate, asking every client for a certificate of
        the control-plane CA (optional: the controller and the CLI bring tokens)."""
        if not (api.tls_cert and api.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(api.tls_cert, api.tls_key)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(self.ca_file))
        return context

    def agents_tls(
        self, agents_ca_file: Path | None, hosts_at: Callable[[str], set[str]] | None
    ) -> ssl.SSLContext:
        """The calls to agents: trust [agents] ca_file, present the zone's certificate
        (refresh_zone_cert first; load_zone_cert after each refresh); with hosts_at (the
        hosts reporting an address), refuse in the handshake an agent whose certificate
        names none of the hosts at its address, so a host cannot pose as another."""
        check = _host_names(hosts_at) if hosts_at is not None else None
        try:
            context = http.tls_context(agents_ca_file, check_peer=check)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"agents.ca_file: cannot load {agents_ca_file}: {exc}") from exc
        self.load_zone_cert(context)
        return context

    def load_zone_cert(self, context: ssl.SSLContext) -> None:
        """Present the current zone certificate on the connections made from now on."""
        context.load_cert_chain(self.zone_cert_file)


def _host_names(hosts_at: Callable[[str], set[str]]) -> http.PeerCheck:
    def check(address: str | None, peercert: dict[str, Any]) -> None:
        hosts = hosts_at(address or "")
        if not any(controlca.names_host(peercert, host) for host in hosts):
            raise ssl.SSLCertVerificationError(
                f"the agent at {address} presents a certificate that names none of the "
                f"hosts reporting that address ({', '.join(sorted(hosts)) or 'none'}) as a "
                "DNS name or urn:hostagent:host:<id>; issue it with the host id as a DNS "
                "name, or set [agents] verify_host_names = false"
            )

    return check


def _ensure_ca(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "ca.crt", directory / "ca.key"
    if cert.exists() and key.exists():
        return cert, key
    # Two replicas making a CA each at once could leave one's key beside the other's
    # certificate: the first makes it, the others wait and take it.
    lock = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cert.exists() and key.exists()):
            cert_pem, key_pem = controlca.make_ca()
            write_atomically(key, key_pem.encode(), 0o600)
            write_atomically(cert, cert_pem.encode(), 0o644)
            log.info("made the zone's control-plane CA %s (key %s)", cert, key)
    finally:
        os.close(lock)  # and the lock with it
    return cert, key
