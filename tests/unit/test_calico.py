"""network.calico: the guest cluster's Calico as data (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from network.calico import GROUP, KINDS, VERSION, calico_manifests


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


MANIFESTS = calico_manifests("172.20.0.0/16", 1450)


def test_every_object_has_api_version_kind_and_name() -> None:
    for manifest in MANIFESTS:
        assert manifest["apiVersion"] and manifest["kind"]
        assert manifest["metadata"]["name"]
    names = [(m["kind"], m["metadata"]["name"]) for m in MANIFESTS]
    assert len(names) == len(set(names))


def test_pool_has_no_encapsulation() -> None:
    # The cluster network is already an overlay: no IP-in-IP, no VXLAN on top.
    [pool] = by_kind(MANIFESTS, "IPPool")
    assert pool["apiVersion"] == f"{GROUP}/v1"
    assert pool["spec"]["cidr"] == "172.20.0.0/16"
    assert pool["spec"]["ipipMode"] == "Never"
    assert pool["spec"]["vxlanMode"] == "Never"
    assert pool["spec"]["natOutgoing"] is True
    [felix] = by_kind(MANIFESTS, "FelixConfiguration")
    assert felix["spec"]["ipipEnabled"] is False
    assert felix["spec"]["vxlanEnabled"] is False


def test_bgp_full_mesh() -> None:
    [bgp] = by_kind(MANIFESTS, "BGPConfiguration")
    assert bgp["metadata"]["name"] == "default"
    assert bgp["spec"]["nodeToNodeMeshEnabled"] is True
    [config] = by_kind(MANIFESTS, "ConfigMap")
    assert config["data"]["calico_backend"] == "bird"


@pytest.mark.parametrize("mtu", [576, 1450, 9000])
def test_mtu_is_the_network_mtu(mtu: int) -> None:
    # No encapsulation, no overhead: pods get the cluster network's full MTU.
    manifests = calico_manifests("192.168.0.0/16", mtu)
    [config] = by_kind(manifests, "ConfigMap")
    assert config["data"]["veth_mtu"] == str(mtu)
    cni = json.loads(config["data"]["cni_network_config"])
    assert cni["plugins"][0]["type"] == "calico"
    assert cni["plugins"][0]["mtu"] == mtu
    assert cni["plugins"][0]["ipam"] == {"type": "calico-ipam"}


def test_calico_node_daemonset() -> None:
    [daemonset] = by_kind(MANIFESTS, "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["serviceAccountName"] == "calico-node"
    [node] = spec["containers"]
    assert node["image"] == f"docker.io/calico/node:{VERSION}"
    env = env_of(node)
    assert env["CALICO_IPV4POOL_CIDR"] == "172.20.0.0/16"
    assert env["CALICO_IPV4POOL_IPIP"] == "Never"
    assert env["CALICO_IPV4POOL_VXLAN"] == "Never"
    assert env["CLUSTER_TYPE"] == "k8s,bgp"
    assert env["DATASTORE_TYPE"] == "kubernetes"
    volumes = {v["name"] for v in spec["volumes"]}
    for container in [*spec["initContainers"], node]:
        assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_a_crd_for_every_calico_kind() -> None:
    crds = by_kind(MANIFESTS, "CustomResourceDefinition")
    assert {c["spec"]["names"]["kind"] for c in crds} == {kind for kind, _p, _s in KINDS}
    for crd in crds:
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{GROUP}"
    used = {m["kind"] for m in MANIFESTS if m["apiVersion"] == f"{GROUP}/v1"}
    assert used <= {kind for kind, _p, _s in KINDS}


def test_crds_come_before_custom_resources() -> None:
    kinds = [m["kind"] for m in MANIFESTS]
    last_crd = max(i for i, kind in enumerate(kinds) if kind == "CustomResourceDefinition")
    first_custom = min(i for i, m in enumerate(MANIFESTS) if m["apiVersion"] == f"{GROUP}/v1")
    assert last_crd < first_custom


def test_rbac_binds_every_service_account() -> None:
    accounts = {m["metadata"]["name"] for m in by_kind(MANIFESTS, "ServiceAccount")}
    bound = {s["name"] for b in by_kind(MANIFESTS, "ClusterRoleBinding") for s in b["subjects"]}
    roles = {m["metadata"]["name"] for m in by_kind(MANIFESTS, "ClusterRole")}
    assert (
        accounts
        == bound
        == roles
        == {
            "calico-node",
            "calico-cni-plugin",
            "calico-kube-controllers",
        }
    )


def test_pure_and_dumpable() -> None:
    again = calico_manifests("172.20.0.0/16", 1450)
    assert again == MANIFESTS
    assert again is not MANIFESTS
    text = yaml.safe_dump_all(again)
    assert list(yaml.safe_load_all(text)) == MANIFESTS


@pytest.mark.parametrize(
    ("pod_cidr", "mtu", "match"),
    [
        ("fd00::/64", 1450, "IPv4"),
        ("10.0.0.0/27", 1450, "/26"),
        ("10.0.0.1/16", 1450, "host bits"),
        ("nonsense", 1450, "nonsense"),
        ("10.0.0.0/16", 575, "mtu"),
        ("10.0.0.0/16", 9001, "mtu"),
        ("10.0.0.0/16", True, "mtu"),
    ],
)
def test_bad_input_is_refused(pod_cidr: str, mtu: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        calico_manifests(pod_cidr, mtu)
