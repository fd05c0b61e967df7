"""pki.roles (what a signer accepts) and the Vault role parameters built from it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pki import roles
from pki.certset import PROFILES, requests_for
from pki.keys import KeyType
from pki.vault import VaultSettings, mount_path, role_name, role_params
from tests.unit.test_pki_certset import MASTER, WORKER


@pytest.mark.parametrize("node", [MASTER, WORKER])
def test_every_request_passes_its_own_role(node: object) -> None:
    for request in requests_for(node):  # type: ignore[arg-type]
        limits = roles.limits(request.name)
        roles.check(limits, request.common_name, request.dns_sans, request.ip_sans)
        assert limits.organizations == request.organizations
        assert limits.ca == request.ca


def test_client_roles_pin_the_common_name_and_refuse_sans() -> None:
    kube_proxy = roles.limits("kube-proxy")
    assert kube_proxy.allowed_names == ("system:kube-proxy",)
    assert (kube_proxy.server, kube_proxy.client) == (False, True)
    with pytest.raises(ValueError, match="common name system:node:w1 not allowed"):
        roles.check(kube_proxy, "system:node:w1", (), ())
    with pytest.raises(ValueError, match="IP subject alternative names"):
        roles.check(kube_proxy, "system:kube-proxy", (), ("10.0.0.1",))
    with pytest.raises(ValueError, match="subject alternative name evil"):
        roles.check(kube_proxy, "system:kube-proxy", ("evil",), ())


def test_kubelet_roles_take_any_node_but_only_as_a_node() -> None:
    client = roles.limits("kubelet-client")
    assert client.allowed_names == ("system:node:*",)
    assert client.organizations == ("system:nodes",)
    assert not client.enforce_hostnames  # "system:node:x" is not a hostname
    roles.check(client, "system:node:anything", (), ())
    with pytest.raises(ValueError, match="not allowed"):
        roles.check(client, "system:kube-controller-manager", (), ())


def test_server_roles() -> None:
    apiserver = roles.limits("apiserver")
    assert apiserver.allowed_names == ("kube-apiserver", "*")
    assert apiserver.allow_ip_sans and apiserver.enforce_hostnames
    assert (apiserver.server, apiserver.client) == (True, False)
    etcd = roles.limits("etcd/server")
    assert etcd.allow_localhost and (etcd.server, etcd.client) == (True, True)
    assert not roles.limits("kubelet-serving").enforce_hostnames


def test_only_admin_and_the_kubelet_client_of_the_apiserver_are_masters() -> None:
    masters = {p.name for p in PROFILES if "system:masters" in roles.limits_for(p).organizations}
    assert masters == {"admin", "apiserver-kubelet-client"}


def test_vault_role_params() -> None:
    ec = role_params(roles.limits("kubelet-client"), KeyType.ECDSA, timedelta(days=365))
    assert ec["key_type"] == "ec" and ec["key_bits"] == 256
    assert ec["key_usage"] == ["DigitalSignature"]
    assert ec["organization"] == ["system:nodes"]
    assert ec["allowed_domains"] == ["system:node:*"] and ec["allow_glob_domains"]
    assert (ec["server_flag"], ec["client_flag"]) == (False, True)
    assert not ec["allow_ip_sans"] and not ec["allow_any_name"] and not ec["enforce_hostnames"]
    assert ec["max_ttl"] == "31536000s"
    assert ec["use_csr_common_name"] and ec["use_csr_sans"]
    rsa = role_params(roles.limits("apiserver"), KeyType.RSA, timedelta(days=1))
    assert rsa["key_type"] == "rsa" and rsa["key_bits"] == 2048
    assert rsa["key_usage"] == ["DigitalSignature", "KeyEncipherment"]
    assert rsa["allow_ip_sans"] and rsa["enforce_hostnames"]
    assert (rsa["server_flag"], rsa["client_flag"]) == (True, False)


def test_vault_names() -> None:
    assert mount_path("hostagent", "c1", "front-proxy") == "hostagent-c1-front-proxy"  # type: ignore[arg-type]
    assert role_name("etcd/server", KeyType.ECDSA) == "etcd-server-ec"
    assert role_name("admin", KeyType.RSA) == "admin-rsa"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "vault:8200", "token": "t"}, "http"),
        ({"url": "https://v"}, "either a token or an AppRole"),
        ({"url": "https://v", "token": "t", "role_id": "r", "secret_id": "s"}, "either"),
        ({"url": "https://v", "role_id": "r"}, "either"),
        ({"url": "https://v", "token": "t", "mount_prefix": "Bad/"}, "mount name"),
    ],
)
def test_vault_settings_validation(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VaultSettings(**kwargs)  # type: ignore[arg-type]


def test_vault_settings_hide_secrets() -> None:
    settings = VaultSettings(url="https://v", role_id="the-role", secret_id="the-secret")
    assert "the-secret" not in repr(settings) and "the-role" not in repr(settings)
    assert "the-token" not in repr(VaultSettings(url="https://v", token="the-token"))
