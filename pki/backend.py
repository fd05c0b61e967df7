"""The one interface both CA backends implement: `local.LocalBackend`, `vault.VaultBackend`.

Every method is synchronous and may block (HTTP, disk, key generation): callers on the
event loop use `asyncio.to_thread` (pki.provision does). Keys are always made on the
host; a backend only ever sees CSRs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509

from pki.certset import CaName, CertRequest
from pki.keys import format_serial


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: str
    ca_pem: str  # the issuing CA's certificate
    serial: str  # Vault's notation, e.g. "1f:0a:..."
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_pem(cls, cert_pem: str, ca_pem: str) -> IssuedCert:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        return cls(
            cert_pem=cert_pem,
            ca_pem=ca_pem,
            serial=format_serial(cert.serial_number),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


class Backend(Protocol):
    """A cluster's CAs and service-account key, wherever they live."""

    @property
    def description(self) -> str:
        """Where the CAs live, for messages: "Vault at https://...", "local CA in ..."."""
        ...

    def ensure_cluster(self, cluster: str) -> None:
        """Make the cluster's three CAs exist (idempotent, safe from several hosts)."""
        ...

    def issue(self, cluster: str, request: CertRequest, csr_pem: str) -> IssuedCert:
        """Sign `csr_pem` with the cluster's CA named by `request.ca`, within the limits
        of `request.name`'s role. BackendRefused when the CSR is outside them."""
        ...

    def ca_certificates(self, cluster: str) -> dict[CaName, str]:
        """Each CA's certificate, PEM."""
        ...

    def service_account_key(self, cluster: str) -> tuple[str, str]:
        """The cluster's service-account signing pair (private, public PEM): made once,
        the same on every master of the cluster, on every host."""
        ...

    def revoke_cluster(self, cluster: str) -> None:
        """The cluster is gone everywhere: revoke what was issued, delete its CAs and
        service-account key. Only for a cluster deleted zone-wide, never because one host
        lost its last node of it (other hosts may still run masters)."""
        ...

    def maintain(self) -> float:
        """Periodic upkeep (Vault: renew the token before it expires); returns the seconds
        until it wants to run again."""
        ...
