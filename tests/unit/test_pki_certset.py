"""pki.certset: the certificate table per role, written out here in full, and its
correspondence with pki.layout."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from pki import layout
from pki.certset import (
    CA_COMMON_NAMES,
    CA_FILES,
    PROFILES,
    CaName,
    NodeIdentity,
    Usage,
    profiles_for,
    requests_for,
)
from pki.keys import KeyType

MASTER = NodeIdentity(
    cluster="c1",
    name="m1",
    role="master",
    address="10.42.0.11",
    service_cidr="10.100.0.0/16",
    cluster_domain="corp.example",
    api_endpoint="api.c1.example:6443",
)
WORKER = NodeIdentity(cluster="c1", name="w1", role="worker", address="10.42.0.21")

K, E, F = "kubernetes", "etcd", "front-proxy"
S, C = Usage.SERVER_AUTH, Usage.CLIENT_AUTH
# name: (CA, CN, O, DNS SANs, IP SANs, extended key usages) for MASTER.
MASTER_TABLE = {
    "apiserver": (
        K,
        "kube-apiserver",
        (),
        (
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.corp.example",
            "m1",
            "api.c1.example",
        ),
        ("10.100.0.1", "10.42.0.11"),
        (S,),
    ),
    "apiserver-kubelet-client": (
        K,
        "kube-apiserver-kubelet-client",
        ("system:masters",),
        (),
        (),
        (C,),
    ),
    "apiserver-etcd-client": (E, "kube-apiserver-etcd-client", (), (), (), (C,)),
    "front-proxy-client": (F, "front-proxy-client", (), (), (), (C,)),
    "etcd/server": (E, "kube-etcd", (), ("m1", "localhost"), ("10.42.0.11", "127.0.0.1"), (S, C)),
    "etcd/peer": (
        E,
        "kube-etcd-peer",
        (),
        ("m1", "localhost"),
        ("10.42.0.11", "127.0.0.1"),
        (S, C),
    ),
    "etcd/healthcheck-client": (E, "kube-etcd-healthcheck-client", (), (), (), (C,)),
    "admin": (K, "kubernetes-admin", ("system:masters",), (), (), (C,)),
    "controller-manager": (K, "system:kube-controller-manager", (), (), (), (C,)),
    "scheduler": (K, "system:kube-scheduler", (), (), (), (C,)),
    "kubelet-client": (K, "system:node:m1", ("system:nodes",), (), (), (C,)),
    "kubelet-serving": (K, "system:node:m1", ("system:nodes",), ("m1",), ("10.42.0.11",), (S,)),
    "kube-proxy": (K, "system:kube-proxy", (), (), (), (C,)),
    "calico": (K, "calico-node", (), (), (), (C,)),
}
WORKER_TABLE = {
    "kubelet-client": (K, "system:node:w1", ("system:nodes",), (), (), (C,)),
    "kubelet-serving": (K, "system:node:w1", ("system:nodes",), ("w1",), ("10.42.0.21",), (S,)),
    "kube-proxy": (K, "system:kube-proxy", (), (), (), (C,)),
    "calico": (K, "calico-node", (), (), (), (C,)),
}


def as_table(
    node: NodeIdentity, key_type: KeyType = KeyType.ECDSA
) -> dict[str, tuple[object, ...]]:
    table: dict[str, tuple[object, ...]] = {}
    for r in requests_for(node, key_type):
        extended = tuple(u for u in r.usages if u in (S, C))
        table[r.name] = (str(r.ca), r.common_name, r.organizations, r.dns_sans, r.ip_sans, extended)
    return table


@pytest.mark.parametrize(("node", "expected"), [(MASTER, MASTER_TABLE), (WORKER, WORKER_TABLE)])
def test_the_table(node: NodeIdentity, expected: dict[str, tuple[object, ...]]) -> None:
    assert as_table(node) == expected


def test_key_usages_follow_the_key_type() -> None:
    for request in requests_for(MASTER, KeyType.ECDSA):
        assert request.usages[0] == Usage.DIGITAL_SIGNATURE
        assert Usage.KEY_ENCIPHERMENT not in request.usages  # not defined for ECDSA keys
    for request in requests_for(MASTER, KeyType.RSA):
        assert request.usages[:2] == (Usage.DIGITAL_SIGNATURE, Usage.KEY_ENCIPHERMENT)
    assert as_table(MASTER, KeyType.RSA) == MASTER_TABLE


@pytest.mark.parametrize("role", [layout.MASTER, layout.WORKER])
def test_every_layout_certificate_has_exactly_one_request(role: str) -> None:
    node = MASTER if role == layout.MASTER else WORKER
    names = [request.name for request in requests_for(node)]
    wanted = [cert.name for cert in layout.CERTS if role in cert.roles and not cert.ca_only]
    assert sorted(names) == sorted(wanted)
    assert len(names) == len(set(names))


def test_profiles_and_cas_cover_the_layout() -> None:
    leaf_names = {cert.name for cert in layout.CERTS if not cert.ca_only}
    assert {profile.name for profile in PROFILES} == leaf_names
    assert len(PROFILES) == len(leaf_names)
    assert set(CA_FILES.values()) == {cert for cert in layout.CERTS if cert.ca_only}
    assert CA_COMMON_NAMES == {
        CaName.KUBERNETES: "kubernetes-ca",
        CaName.ETCD: "etcd-ca",
        CaName.FRONT_PROXY: "kubernetes-front-proxy-ca",
    }
    with pytest.raises(ValueError, match="role"):
        profiles_for("etcd")


def test_ttl_is_passed_through_and_default() -> None:
    assert {r.ttl for r in requests_for(WORKER)} == {timedelta(days=90)}
    assert {r.ttl for r in requests_for(WORKER, ttl=timedelta(hours=2))} == {timedelta(hours=2)}


def test_apiserver_endpoint_variants() -> None:
    def apiserver(**kwargs: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        node = NodeIdentity("c1", "m1", "master", "10.42.0.11", **kwargs)  # type: ignore[arg-type]
        request = next(r for r in requests_for(node) if r.name == "apiserver")
        return request.dns_sans, request.ip_sans

    dns, ips = apiserver()
    assert ips == ("10.96.0.1", "10.42.0.11")  # the default service range's first host
    assert dns[-1] == "m1" and "kubernetes.default.svc.cluster.local" in dns
    assert apiserver(api_endpoint="10.42.0.100:6443")[1] == (
        "10.96.0.1",
        "10.42.0.11",
        "10.42.0.100",
    )
    # An endpoint on the node's own address adds nothing twice.
    assert apiserver(api_endpoint="10.42.0.11:6443")[1] == ("10.96.0.1", "10.42.0.11")


def test_fingerprint_tracks_content_not_lifetime() -> None:
    def fingerprints(node: NodeIdentity, **kwargs: object) -> dict[str, str]:
        return {r.name: r.fingerprint() for r in requests_for(node, **kwargs)}  # type: ignore[arg-type]

    base = fingerprints(WORKER)
    assert fingerprints(WORKER, ttl=timedelta(days=1)) == base
    moved = fingerprints(NodeIdentity("c1", "w1", "worker", "10.42.0.22"))
    assert {name for name in base if base[name] != moved[name]} == {"kubelet-serving"}
    assert fingerprints(WORKER, key_type=KeyType.RSA) != base


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster": "C1"}, "cluster"),
        ({"name": "w_1"}, "node"),
        ({"role": "etcd"}, "role"),
        ({"address": "10.42.0.21/24"}, "10.42.0.21/24"),
        ({"address": "fd00::1"}, "fd00::1"),
        ({"cluster_domain": "bad_domain"}, "cluster_domain"),
        ({"api_endpoint": "api.example"}, "HOST:PORT"),
    ],
)
def test_node_identity_rejects_bad_input(kwargs: dict[str, str], message: str) -> None:
    fields = {"cluster": "c1", "name": "w1", "role": "worker", "address": "10.42.0.21", **kwargs}
    with pytest.raises(ValueError, match=message):
        NodeIdentity(**fields)


def test_the_vip_is_in_the_api_server_and_etcd_certificates_only() -> None:
    node = NodeIdentity(
        "c1", "m1", "master", "10.42.0.11", api_endpoint="10.42.0.5:6443", vip="10.42.0.5"
    )
    ips = {r.name: r.ip_sans for r in requests_for(node)}
    assert ips["apiserver"] == ("10.96.0.1", "10.42.0.11", "10.42.0.5")
    assert ips["etcd/server"] == ("10.42.0.11", "127.0.0.1", "10.42.0.5")
    assert ips["etcd/peer"] == ("10.42.0.11", "127.0.0.1", "10.42.0.5")
    with_vip = {name for name, sans in ips.items() if "10.42.0.5" in sans}
    assert with_vip == {"apiserver", "etcd/server", "etcd/peer"}
    before = {
        r.name: r.fingerprint() for r in requests_for(replace(node, vip=None, api_endpoint=None))
    }
    after = {r.name: r.fingerprint() for r in requests_for(node)}
    assert {name for name in after if after[name] != before[name]} == {
        "apiserver",
        "etcd/server",
        "etcd/peer",
    }
    with pytest.raises(ValueError):
        replace(node, vip="10.42.0.5/24")
