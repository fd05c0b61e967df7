"""A CA for hostagent's own services and their server certificates: the lab makes one
certificate per service (the zone, each agent) for its address, so every call between
them is TLS-verified as in production."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import files, keys
from pki.local import self_signed_ca

_PEM = serialization.Encoding.PEM
LIFETIME = dt.timedelta(days=30)


def ensure_ca(directory: Path) -> tuple[Path, Path]:
    """ca.crt and ca.key in directory, made on first use."""
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = keys.generate_key(keys.KeyType.ECDSA)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostagent lab CA")])
    cert = self_signed_ca(name, key, LIFETIME, path_length=0)
    directory.mkdir(parents=True, exist_ok=True)
    files.write_file(key_path, keys.private_pem(key), files.KEY_MODE)
    files.write_file(cert_path, cert.public_bytes(_PEM).decode(), files.CERT_MODE)
    return cert_path, key_path


def issue_server_cert(ca_dir: Path, name: str, address: str, out: Path) -> tuple[Path, Path]:
    """<out>/<name>.crt and .key: a server certificate for address, signed by the lab CA."""
    return issue_cert(ca_dir, name, [address], out)


def issue_cert(
    ca_dir: Path, name: str, addresses: list[str], out: Path, *, client: bool = False
) -> tuple[Path, Path]:
    """<out>/<name>.crt and .key, signed by the CA in ca_dir (made on first use): for the
    addresses (none: a client only) and name; client: also for TLS clients (an etcd
    member's peer certificate, an etcd client's)."""
    ca_cert_path, ca_key_path = ensure_ca(ca_dir)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = keys.load_private_key(ca_key_path.read_text())
    key = keys.generate_key(keys.KeyType.ECDSA)
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if addresses else []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.SubjectAlternativeName([*names, x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    files.write_file(key_path, keys.private_pem(key), files.KEY_MODE)
    files.write_file(cert_path, cert.public_bytes(_PEM).decode(), files.CERT_MODE)
    return cert_path, key_path
