"""cloudconfig.addons.calico: the guest cluster's Calico as data, and an operator's release
manifest patched (pure)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconfig.addons.calico import (
    ENCAPSULATION,
    GROUP,
    IMAGES,
    KINDS,
    VERSION,
    Encapsulation,
    calico_manifests,
    manifest_file,
    patch_release,
    pool_env,
    read_release,
)
from cloudconfig.render import render_user_data
from hostagent.config import Config, load_config
from hostagent.errors import ConfigError
from tests.unit.test_render_snapshot import MASTER, WORKER


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


def test_built_in_images_name_one_version() -> None:
    images = [
        c["image"]
        for m in MANIFESTS
        if m["kind"] in ("DaemonSet", "Deployment")
        for c in [*m["spec"]["template"]["spec"].get("initContainers", [])]
        + m["spec"]["template"]["spec"]["containers"]
    ]
    assert sorted(images) == sorted(IMAGES.values())
    assert all(image.endswith(f":{VERSION}") for image in images)


# --- an operator's release manifest ---------------------------------------------------

RELEASE = Path(__file__).parent / "data" / "calico-release.yaml"


def release_docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(RELEASE.read_text()) if doc is not None]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def calico_node(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = one(docs, "DaemonSet", "calico-node")["spec"]["template"]["spec"]["containers"]
    return container


def test_release_gets_mtu_pod_cidr_and_no_encapsulation() -> None:
    docs = release_docs()
    patched = list(yaml.safe_load_all(patch_release(docs, "172.20.0.0/16", 1450)))
    assert one(patched, "ConfigMap", "calico-config")["data"]["veth_mtu"] == "1450"
    env = calico_node(patched)["env"]
    names = [e["name"] for e in env]
    # Set in place where the release has the variable, appended where it has not.
    assert names == [
        "DATASTORE_TYPE",
        "CLUSTER_TYPE",
        "IP",
        "CALICO_IPV4POOL_IPIP",
        "CALICO_IPV4POOL_VXLAN",
        "FELIX_IPINIPMTU",
        "CALICO_DISABLE_FILE_LOGGING",
        "CALICO_IPV4POOL_CIDR",
    ]
    values = env_of(calico_node(patched))
    assert values["CALICO_IPV4POOL_CIDR"] == "172.20.0.0/16"
    assert values["CALICO_IPV4POOL_IPIP"] == values["CALICO_IPV4POOL_VXLAN"] == "Never"
    assert env_of(calico_node(patched)) | pool_env(ENCAPSULATION) == values  # the built-in's
    # Everything else as the release has it, in its order; the input is left alone.
    assert [(d["kind"], d["metadata"]["name"]) for d in patched] == [
        (d["kind"], d["metadata"]["name"]) for d in docs
    ]
    assert one(patched, "Deployment", "calico-kube-controllers") == one(
        docs, "Deployment", "calico-kube-controllers"
    )
    assert docs == release_docs()


@pytest.mark.parametrize(
    ("encapsulation", "ipip", "vxlan"),
    [("none", "Never", "Never"), ("ipip", "Always", "Never"), ("vxlan", "Never", "Always")],
)
def test_release_encapsulation(encapsulation: Encapsulation, ipip: str, vxlan: str) -> None:
    patched = list(
        yaml.safe_load_all(patch_release(release_docs(), "10.0.0.0/16", 9000, encapsulation))
    )
    values = env_of(calico_node(patched))
    assert (values["CALICO_IPV4POOL_IPIP"], values["CALICO_IPV4POOL_VXLAN"]) == (ipip, vxlan)


def test_release_value_replaces_a_value_from() -> None:
    docs = release_docs()
    calico_node(docs)["env"].append(
        {"name": "CALICO_IPV4POOL_CIDR", "valueFrom": {"configMapKeyRef": {"name": "x"}}}
    )
    patched = list(yaml.safe_load_all(patch_release(docs, "10.0.0.0/16", 1500)))
    entries = [e for e in calico_node(patched)["env"] if e["name"] == "CALICO_IPV4POOL_CIDR"]
    assert entries == [{"name": "CALICO_IPV4POOL_CIDR", "value": "10.0.0.0/16"}]


def test_built_in_manifests_are_a_fixed_point() -> None:
    text = patch_release(MANIFESTS, "172.20.0.0/16", 1450)
    assert list(yaml.safe_load_all(text)) == MANIFESTS


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ({"ConfigMap"}, "lacks the ConfigMap calico-config$"),
        ({"DaemonSet"}, "lacks the container calico-node of the DaemonSet calico-node$"),
        ({"ConfigMap", "DaemonSet"}, "ConfigMap calico-config and the container calico-node"),
    ],
)
def test_release_without_the_objects_is_refused(drop: set[str], match: str) -> None:
    docs = [d for d in release_docs() if d["kind"] not in drop]
    with pytest.raises(ValueError, match=match):
        patch_release(docs, "10.0.0.0/16", 1500)


def test_release_whose_daemonset_has_another_container_is_refused() -> None:
    docs = release_docs()
    calico_node(docs)["name"] = "node"
    with pytest.raises(ValueError, match="container calico-node"):
        patch_release(docs, "10.0.0.0/16", 1500)


def test_release_with_bad_cluster_values_is_refused() -> None:
    with pytest.raises(ValueError, match="mtu"):
        patch_release(release_docs(), "10.0.0.0/16", 100)
    with pytest.raises(ValueError, match="pod_cidr"):
        patch_release(release_docs(), "10.0.0.0/30", 1500)


def test_read_release() -> None:
    release = read_release(RELEASE)
    assert release.path == RELEASE
    assert list(release.documents) == release_docs()
    assert manifest_file("10.0.0.0/16", 1500, release) == patch_release(
        release.documents, "10.0.0.0/16", 1500
    )
    built_in = yaml.safe_load_all(manifest_file("10.0.0.0/16", 1500))
    assert list(built_in) == calico_manifests("10.0.0.0/16", 1500)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        ("a: [unclosed\n", "cannot read"),
        ("- a list\n", "mapping"),
        ("kind: ConfigMap\nmetadata: {name: calico-config}\n", "lacks the container calico-node"),
    ],
)
def test_read_release_refuses(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "calico.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as caught:
        read_release(path)
    assert str(path) in str(caught.value)


# --- the configuration key, and the rendered add-on file -------------------------------


def load(tmp_path: Path, value: Path) -> Config:
    (tmp_path / "hostagent.toml").write_text(f"[cloudconfig]\ncalico_manifest = '{value}'\n")
    return load_config(tmp_path / "hostagent.toml")


@pytest.mark.parametrize("name", ["missing.yaml", "a-directory", "not-utf8.yaml", "empty.yaml"])
def test_config_key_needs_a_readable_release(tmp_path: Path, name: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "not-utf8.yaml").write_bytes(b"\xff\xfe")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"cloudconfig\.calico_manifest: .*" + name):
        load(tmp_path, tmp_path / name)


def test_config_key_defaults_to_the_built_in(tmp_path: Path) -> None:
    (tmp_path / "hostagent.toml").write_text("[cloudconfig]\n")
    assert load_config(tmp_path / "hostagent.toml").cloudconfig.calico_manifest is None


def calico_file(user_data: str) -> str:
    data = yaml.safe_load(user_data)
    [calico] = [f for f in data["write_files"] if f["path"] == "/etc/kubernetes/addons/calico.yaml"]
    return str(calico["content"])


def test_configured_release_reaches_masters(tmp_path: Path) -> None:
    release = load(tmp_path, RELEASE).cloudconfig.calico_manifest
    assert release is not None
    master = dataclasses.replace(MASTER, pod_cidr="172.20.0.0/16", mtu=1400)
    text = render_user_data(master, None, release)
    assert calico_file(text) == patch_release(release_docs(), "172.20.0.0/16", 1400)
    assert render_user_data(WORKER, None, release) == render_user_data(WORKER)


def test_render_command_uses_the_configured_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hostagent.cli import main

    (tmp_path / "hostagent.toml").write_text(f"[cloudconfig]\ncalico_manifest = '{RELEASE}'\n")
    network = {"vni": 7, "address": "10.42.0.11/24", "gateway": "10.42.0.1", "mtu": 1400}
    spec = {"role": "master", "vcpus": 1, "memory_mib": 256, "disk_gib": 2, "image": "lab"}
    spec |= {"kubernetes_version": "1.31.4", "network": network}
    (tmp_path / "node.yaml").write_text(
        yaml.safe_dump({"cluster": "a", "name": "m1", "spec": spec})
    )
    config, node = str(tmp_path / "hostagent.toml"), str(tmp_path / "node.yaml")
    main(["-c", config, "render", "--spec", node, "--only", "user-data"])
    content = calico_file(capsys.readouterr().out)
    assert content == patch_release(release_docs(), "192.168.0.0/16", 1400)
