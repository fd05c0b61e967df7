"""Private keys and CSRs, always made on the host: only CSRs ever leave it.

ECDSA P-256 by default (fast to generate, accepted by every Kubernetes component);
RSA 2048 when a consumer needs it. Keys are written as unencrypted PKCS#8 PEM, which
Go's crypto/tls and client-go read alike.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
RSA_BITS = 2048
SERVICE_ACCOUNT_BITS = 2048  # kubeadm's sa.key size


class KeyType(enum.StrEnum):
    ECDSA = "ecdsa"
    RSA = "rsa"


class Subject(Protocol):
    """What a CSR says: pki.certset.CertRequest is one."""

    @property
    def common_name(self) -> str: ...
    @property
    def organizations(self) -> tuple[str, ...]: ...
    @property
    def dns_sans(self) -> tuple[str, ...]: ...
    @property
    def ip_sans(self) -> tuple[str, ...]: ...


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def key_type_of(public_key: object) -> KeyType:
    """The KeyType of a public key; ValueError for anything else (Ed25519, other curves)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return KeyType.RSA
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return KeyType.ECDSA
    raise ValueError(f"unsupported key: {type(public_key).__name__}; use ECDSA P-256 or RSA")


def private_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def load_private_key(pem: str) -> PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported private key: {type(key).__name__}")
    return key


def service_account_key() -> tuple[str, str]:
    """A new service-account signing pair (RSA, as kubeadm makes it): (private, public) PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=SERVICE_ACCOUNT_BITS)
    return private_pem(key), public_pem(key)


def build_csr(key: PrivateKey, subject: Subject) -> str:
    """A PEM CSR carrying `subject`'s names and SANs, signed by `key`."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject.common_name)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in subject.organizations]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    sans = subject_alt_names(subject.dns_sans, subject.ip_sans)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def subject_alt_names(dns: tuple[str, ...], ips: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return names


def format_serial(serial: int) -> str:
    """Vault's notation, used by both backends: lowercase hex pairs joined by colons."""
    digits = format(serial, "x")
    digits = digits.zfill(len(digits) + len(digits) % 2)
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
