"""The embedded CA backend: each cluster's CAs as files on this host, signed with `cryptography`.

The default for one host without Vault. `<state_dir>/ca/<cluster>/` (0700) holds
`<ca>.crt`, `<ca>.key` (0600) for the three CAs and `sa.key`/`sa.pub`. It applies the
same role limits as the Vault roles (pki.roles), so both refuse the same CSRs. It keeps
no CRL: nothing in a guest could fetch one, and the cluster's end deletes the CAs.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.names import check_name
from pki import files, keys, roles
from pki.backend import IssuedCert
from pki.certset import CA_COMMON_NAMES, PROFILE_BY_NAME, CaName, CertRequest, Usage, usages_for
from pki.errors import BackendRefused, PkiError

CA_TTL = dt.timedelta(days=3650)
MAX_TTL = dt.timedelta(days=365)
BACKDATE = dt.timedelta(seconds=30)  # as Vault: tolerate guests whose clock lags a little
_CA = tuple[x509.Certificate, keys.PrivateKey]


class LocalBackend:
    def __init__(
        self, state_dir: Path, *, ca_ttl: dt.timedelta = CA_TTL, max_ttl: dt.timedelta = MAX_TTL
    ) -> None:
        self.root = state_dir / "ca"
        self.ca_ttl = ca_ttl
        self.max_ttl = max_ttl
        # Calls arrive from worker threads; creating a CA or the SA key twice would be fatal.
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, CaName], _CA] = {}

    @property
    def description(self) -> str:
        return f"local CA in {self.root}"

    def cluster_dir(self, cluster: str) -> Path:
        return self.root / check_name("cluster", cluster)

    def ensure_cluster(self, cluster: str) -> None:
        directory = self.cluster_dir(cluster)
        with self._lock:
            for path in (self.root, directory):
                path.mkdir(mode=files.DIR_MODE, parents=True, exist_ok=True)
                path.chmod(files.DIR_MODE)
            files.remove_temps(directory)  # an agent killed while writing a CA left them
            for ca in CaName:
                if not (directory / f"{ca}.crt").exists() or not (directory / f"{ca}.key").exists():
                    self._create_ca(directory, cluster, ca)

    def issue(self, cluster: str, request: CertRequest, csr_pem: str) -> IssuedCert:
        csr = _load_csr(csr_pem)
        key_type = _key_type(csr)
        common_name, dns, ips = _csr_names(csr)
        role = roles.limits(request.name)
        try:
            roles.check(role, common_name, dns, ips)
        except ValueError as exc:
            raise BackendRefused(f"{self.description} refused {request.name}: {exc}") from exc
        ca_cert, ca_key = self._ca(cluster, request.ca)
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + min(request.ttl, self.max_ttl), ca_cert.not_valid_after_utc)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in role.organizations]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        builder = _add_usages(builder, usages_for(PROFILE_BY_NAME[request.name], key_type))
        if dns or ips:
            sans = x509.SubjectAlternativeName(keys.subject_alt_names(dns, ips))
            builder = builder.add_extension(sans, critical=False)
        cert = _with_key_ids(builder, csr.public_key(), ca_cert).sign(ca_key, hashes.SHA256())
        ca_pem = ca_cert.public_bytes(_PEM).decode()
        return IssuedCert.from_pem(cert.public_bytes(_PEM).decode(), ca_pem)

    def ca_certificates(self, cluster: str) -> dict[CaName, str]:
        return {ca: self._ca(cluster, ca)[0].public_bytes(_PEM).decode() for ca in CaName}

    def service_account_key(self, cluster: str) -> tuple[str, str]:
        directory = self.cluster_dir(cluster)
        private, public = directory / "sa.key", directory / "sa.pub"
        with self._lock:
            if not directory.is_dir():
                raise PkiError(f"cluster {cluster} has no CA in {self.root}")
            if not private.exists() or not public.exists():
                private_pem, public_pem = keys.service_account_key()
                files.write_file(private, private_pem, files.KEY_MODE)
                files.write_file(public, public_pem, files.CERT_MODE)
            return private.read_text(), public.read_text()

    def revoke_cluster(self, cluster: str) -> None:
        directory = self.cluster_dir(cluster)
        with self._lock:
            shutil.rmtree(directory, ignore_errors=True)
            for ca in CaName:
                self._cache.pop((cluster, ca), None)

    def maintain(self) -> float:
        return math.inf  # nothing to keep alive

    def _ca(self, cluster: str, ca: CaName) -> _CA:
        cached = self._cache.get((cluster, ca))
        if cached is not None:
            return cached
        directory = self.cluster_dir(cluster)
        try:
            cert = x509.load_pem_x509_certificate((directory / f"{ca}.crt").read_bytes())
            key = keys.load_private_key((directory / f"{ca}.key").read_text())
        except FileNotFoundError as exc:
            raise PkiError(
                f"cluster {cluster} has no {ca} CA in {directory}: ensure_cluster first"
            ) from exc
        self._cache[(cluster, ca)] = (cert, key)
        return cert, key

    def _create_ca(self, directory: Path, cluster: str, ca: CaName) -> None:
        key = keys.generate_key(keys.KeyType.ECDSA)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAMES[ca]),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
            ]
        )
        cert = self_signed_ca(name, key, self.ca_ttl)
        # The key first: a certificate without its key would look like a finished CA.
        files.write_file(directory / f"{ca}.key", keys.private_pem(key), files.KEY_MODE)
        files.write_file(directory / f"{ca}.crt", cert.public_bytes(_PEM).decode(), files.CERT_MODE)
        self._cache.pop((cluster, ca), None)


def self_signed_ca(
    name: x509.Name, key: keys.PrivateKey, ttl: dt.timedelta, path_length: int | None = None
) -> x509.Certificate:
    """A root CA certificate for key: the clusters' CAs, and the CA of hostagent's own
    services (servicecerts.py)."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
    )
    return _with_key_ids(builder, key.public_key(), None).sign(key, hashes.SHA256())


_PEM = Encoding.PEM
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_EKU = {
    Usage.SERVER_AUTH: ExtendedKeyUsageOID.SERVER_AUTH,
    Usage.CLIENT_AUTH: ExtendedKeyUsageOID.CLIENT_AUTH,
}


def _add_usages(
    builder: x509.CertificateBuilder, usages: tuple[Usage, ...]
) -> x509.CertificateBuilder:
    key_usage = x509.KeyUsage(
        digital_signature=Usage.DIGITAL_SIGNATURE in usages,
        content_commitment=False,
        key_encipherment=Usage.KEY_ENCIPHERMENT in usages,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    extended = [_EKU[usage] for usage in usages if usage in _EKU]
    builder = builder.add_extension(key_usage, critical=True)
    return builder.add_extension(x509.ExtendedKeyUsage(extended), critical=False)


def _with_key_ids(
    builder: x509.CertificateBuilder, public_key: object, issuer: x509.Certificate | None
) -> x509.CertificateBuilder:
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
    if issuer is None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
    return builder.add_extension(ski, critical=False).add_extension(aki, critical=False)


def _load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise BackendRefused(f"not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise BackendRefused("the certificate request's signature does not verify")
    return csr


def _key_type(csr: x509.CertificateSigningRequest) -> keys.KeyType:
    try:
        return keys.key_type_of(csr.public_key())
    except ValueError as exc:
        raise BackendRefused(str(exc)) from exc


def _csr_names(
    csr: x509.CertificateSigningRequest,
) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise BackendRefused("the certificate request has no common name")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return str(names[0].value), (), ()
    dns = tuple(sans.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
    return str(names[0].value), dns, ips
