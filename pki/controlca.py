"""The zone's control-plane CA (docs/zone.md, "Mutual TLS"): certificates that name who
calls whom between hostagent's own parts, never a guest cluster's. Pure: PEM in, PEM out,
no files (hostagent/zone/controlplane.py keeps them on the zone, hostagent/zonetls.py on
an agent).

A host's client certificate names its host id twice: as its common name and as the URI
`urn:hostagent:host:<id>` (with the id as a DNS name too); the zone's own client
certificate is `hostagent-zone`, URI `urn:hostagent:zone`. Whatever a CSR asks for, the
CA writes only these names: the key is the agent's, the identity the zone's decision.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.names import DNS1123_LABEL
from pki import keys, lifetime
from pki.local import self_signed_ca

CA_TTL = dt.timedelta(days=3650)
ZONE_IDENTITY = "hostagent-zone"
HOST_URI = "urn:hostagent:host:"
ZONE_URI = "urn:hostagent:zone"
BACKDATE = dt.timedelta(minutes=5)  # clocks a little behind still accept a new certificate
_PEM = serialization.Encoding.PEM


class BadRequest(ValueError):
    """A CSR the CA will not sign (unreadable, wrongly signed, an unsupported key)."""


@dataclass(frozen=True)
class Identity:
    """Who a verified client certificate names: kind "host" (name = host id) or "zone"."""

    kind: str
    name: str


@dataclass(frozen=True)
class Issued:
    cert_pem: str
    ca_pem: str
    not_before: dt.datetime
    not_after: dt.datetime


def make_ca(common_name: str = "hostagent zone control-plane CA") -> tuple[str, str]:
    """A new self-signed CA: (certificate PEM, key PEM)."""
    key = keys.generate_key(keys.KeyType.ECDSA)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = self_signed_ca(name, key, CA_TTL, path_length=0)
    return cert.public_bytes(_PEM).decode(), keys.private_pem(key)


def check_ca(cert_pem: str, key_pem: str) -> None:
    """ValueError unless cert_pem is a CA certificate whose key is key_pem."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = keys.load_private_key(key_pem)
    if cert.public_key() != key.public_key():
        raise ValueError("the CA key does not belong to the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError("the certificate is not a CA (no basicConstraints CA:TRUE)")


def host_csr(host: str) -> tuple[str, str]:
    """A new key and a CSR naming host: (key PEM, CSR PEM). The key stays with the caller."""
    key = keys.generate_key(keys.KeyType.ECDSA)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return keys.private_pem(key), csr.public_bytes(_PEM).decode()


def sign_host(
    ca_cert_pem: str, ca_key_pem: str, csr_pem: str, host: str, ttl: dt.timedelta
) -> Issued:
    """A client certificate for host's key in csr_pem; BadRequest for a bad CSR."""
    if not DNS1123_LABEL.fullmatch(host):
        raise BadRequest(f"host id {host[:80]!r} is not a DNS-1123 label")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise BadRequest(f"csr is not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise BadRequest("csr: its signature does not verify")
    public_key = csr.public_key()
    try:
        keys.key_type_of(public_key)
    except ValueError as exc:
        raise BadRequest(f"csr: {exc}") from exc
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(HOST_URI + host),
        x509.DNSName(host),
    ]
    return _sign(ca_cert_pem, ca_key_pem, public_key, host, names, ttl)


def sign_zone_client(ca_cert_pem: str, ca_key_pem: str, ttl: dt.timedelta) -> tuple[str, Issued]:
    """The zone's own client certificate and its new key: (key PEM, Issued)."""
    key = keys.generate_key(keys.KeyType.ECDSA)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ZONE_URI)]
    issued = _sign(ca_cert_pem, ca_key_pem, key.public_key(), ZONE_IDENTITY, names, ttl)
    return keys.private_pem(key), issued


def _sign(
    ca_cert_pem: str,
    ca_key_pem: str,
    public_key: Any,
    common_name: str,
    names: list[x509.GeneralName],
    ttl: dt.timedelta,
) -> Issued:
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = keys.load_private_key(ca_key_pem)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = min(now + ttl, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(
        cert.public_bytes(_PEM).decode(), ca_cert_pem, cert.not_valid_before_utc, not_after
    )


def validity(cert_pem: str) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) of a PEM certificate; ValueError when it is none."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def usable(cert_pem: str, key_pem: str, ca_pem: str, host: str, now: dt.datetime) -> bool:
    """Whether an agent's saved certificate can still be used: its key, issued by ca_pem,
    naming host, and not expired."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        key = keys.load_private_key(key_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (
        cert.public_key() == key.public_key()
        and [n.value for n in names] == [host]
        and cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    )


def renew_at(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When to renew (pki.lifetime's 2/3), counted from the issue: not_before is backdated
    by BACKDATE, which would make a short-lived certificate due at once."""
    return lifetime.renew_at(not_before + BACKDATE, not_after)


def names_host(peercert: Mapping[str, Any], host: str) -> bool:
    """Whether a verified server certificate names host: the DNS name <host id> or the
    URI urn:hostagent:host:<id> among its subject alternative names."""
    names = set(peercert.get("subjectAltName", ()))
    return ("DNS", host) in names or ("URI", HOST_URI + host) in names


def identity_of(peercert: Mapping[str, Any] | None) -> Identity | None:
    """Who a verified peer certificate names, from ssl's getpeercert() (the dict form,
    which the ssl module fills only for a certificate it verified); None without one,
    or when it names nothing of ours (the caller refuses it)."""
    if not peercert:
        return None
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    common = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    if len(common) != 1 or len(uris) != 1:
        return None
    (cn,), (uri,) = common, uris
    if uri == ZONE_URI and cn == ZONE_IDENTITY:
        return Identity("zone", cn)
    if uri == HOST_URI + cn and DNS1123_LABEL.fullmatch(cn):
        return Identity("host", cn)
    return None
