"""hostagent.model: names, NetworkSpec, NodeSpec, spec_hash, NodeKey; pure validation."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from common.names import check_name
from hostagent.model import EtcdMode, NetworkSpec, NodeKey, NodeSpec, Role

NETWORK: dict[str, Any] = {
    "vni": 4242,
    "address": "10.42.0.11/24",
    "gateway": "10.42.0.1",
    "mtu": 1450,
}
SPEC: dict[str, Any] = {
    "role": "master",
    "vcpus": 2,
    "memory_mib": 2048,
    "disk_gib": 20,
    "image": "lab",
    "kubernetes_version": "1.31.2",
    "network": NETWORK,
    "ssh_authorized_keys": [],
}
LONGEST = "a" + "-b" * 30 + "9" + "z"  # 63 characters


def spec_data(**overrides: Any) -> dict[str, Any]:
    return {**SPEC, "network": dict(NETWORK), **overrides}


def network_data(**overrides: Any) -> dict[str, Any]:
    return {**NETWORK, **overrides}


# --- DNS-1123 names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "alpha", "m1", "a-b", "1-2-3", LONGEST])
def test_valid_names_pass_unchanged(name: str) -> None:
    assert check_name("cluster", name) == name


def test_longest_name_has_63_characters() -> None:
    assert len(LONGEST) == 63
    assert check_name("node", LONGEST) == LONGEST


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alpha",
        "ALPHA",
        "a..b",
        "a.b",
        "a/b",
        "../etc",
        "-a",
        "a-",
        "-",
        "a_b",
        "a b",
        "a\n",
        "\na",
        LONGEST + "x",  # 64 characters
        "é",
    ],
)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a DNS-1123 label"):
        check_name("cluster", name)


def test_name_error_names_the_kind() -> None:
    with pytest.raises(ValueError, match=r"^node 'Bad'"):
        check_name("node", "Bad")


def test_name_error_truncates_huge_values() -> None:
    with pytest.raises(ValueError) as exc:
        check_name("node", "X" * 10_000)
    assert len(str(exc.value)) < 400


# --- NodeKey ----------------------------------------------------------------------------------


def test_node_key_domain_is_cluster_dash_node() -> None:
    key = NodeKey(cluster="alpha", name="m1")
    assert key.domain == "alpha-m1"
    assert str(key) == "alpha/m1"


@pytest.mark.parametrize(
    ("cluster", "name", "field"),
    [("Alpha", "m1", "cluster"), ("alpha", "m_1", "name"), ("", "m1", "cluster")],
)
def test_node_key_validates_both_parts(cluster: str, name: str, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeKey(cluster=cluster, name=name)
    assert exc.value.errors()[0]["loc"] == (field,)


def test_node_key_is_hashable_and_compares_by_value() -> None:
    a = NodeKey(cluster="alpha", name="m1")
    b = NodeKey(cluster="alpha", name="m1")
    assert a == b
    assert len({a, b, NodeKey(cluster="alpha", name="m2")}) == 2


# --- NetworkSpec ------------------------------------------------------------------------------


def test_network_valid_and_derived_interfaces() -> None:
    net = NetworkSpec.model_validate(NETWORK)
    assert str(net.interface) == "10.42.0.11/24"
    assert str(net.gateway_interface) == "10.42.0.1/24"


def test_network_mtu_defaults_to_1450() -> None:
    data = network_data()
    del data["mtu"]
    assert NetworkSpec.model_validate(data).mtu == 1450


@pytest.mark.parametrize("address", ["10.42.0.11", "10.42.0.11/", "not-an-ip/24", "10.42.0/24"])
def test_network_address_needs_a_prefix_length(address: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NetworkSpec.model_validate(network_data(address=address))
    assert exc.value.errors()[0]["loc"] == ("address",)


@pytest.mark.parametrize(
    ("address", "gateway"),
    [
        ("10.42.0.0/24", "10.42.0.1"),  # network address
        ("10.42.0.255/24", "10.42.0.1"),  # broadcast address
        ("10.42.0.0/16", "10.42.0.1"),
        ("10.42.255.255/16", "10.42.0.1"),
    ],
)
def test_network_address_is_not_network_or_broadcast(address: str, gateway: str) -> None:
    with pytest.raises(ValidationError, match="network or broadcast"):
        NetworkSpec.model_validate(network_data(address=address, gateway=gateway))


@pytest.mark.parametrize("gateway", ["10.43.0.1", "192.168.0.1", "10.42.1.1"])
def test_network_gateway_must_be_inside_the_subnet(gateway: str) -> None:
    with pytest.raises(ValidationError, match=r"is not inside 10\.42\.0\.0/24"):
        NetworkSpec.model_validate(network_data(gateway=gateway))


def test_network_gateway_must_differ_from_address() -> None:
    with pytest.raises(ValidationError, match="gateway and address must differ"):
        NetworkSpec.model_validate(network_data(gateway="10.42.0.11"))


@pytest.mark.parametrize("gateway", ["10.42.0.0", "10.42.0.255"])
def test_network_gateway_is_not_network_or_broadcast(gateway: str) -> None:
    """The host puts the gateway on the cluster bridge: it must be a usable host address."""
    with pytest.raises(ValidationError):
        NetworkSpec.model_validate(network_data(gateway=gateway))


@pytest.mark.parametrize(
    ("address", "gateway", "field"),
    [
        ("fd00::11/64", "fd00::1", "address"),
        ("10.42.0.11/24", "fd00::1", "gateway"),
        ("::ffff:10.42.0.11/120", "10.42.0.1", "address"),
    ],
)
def test_network_refuses_ipv6(address: str, gateway: str, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NetworkSpec.model_validate(network_data(address=address, gateway=gateway))
    assert exc.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    ("field", "value"),
    [("vni", 0), ("vni", 16_777_216), ("mtu", 575), ("mtu", 9001)],
)
def test_network_bounds(field: str, value: int) -> None:
    with pytest.raises(ValidationError) as exc:
        NetworkSpec.model_validate(network_data(**{field: value}))
    assert exc.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    ("field", "value"),
    [("vni", 1), ("vni", 16_777_215), ("mtu", 576), ("mtu", 9000)],
)
def test_network_bounds_inclusive(field: str, value: int) -> None:
    assert getattr(NetworkSpec.model_validate(network_data(**{field: value})), field) == value


def test_network_refuses_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        NetworkSpec.model_validate(network_data(vlan=7))


# --- NodeSpec ---------------------------------------------------------------------------------


def test_spec_example_from_the_api_contract_is_valid() -> None:
    spec = NodeSpec.model_validate(SPEC)
    assert spec.role is Role.MASTER
    assert spec.network.vni == 4242
    dumped = spec.model_dump(mode="json")
    assert {key: dumped[key] for key in SPEC} == SPEC
    assert dumped["cluster"]["service_cidr"] == "10.96.0.0/12"  # defaults filled in
    assert spec.etcd_disk_size == 5


def test_spec_hash_ignores_fields_left_at_their_default() -> None:
    """An agent upgrade that adds a defaulted field must not re-create every VM."""
    plain = NodeSpec.model_validate(SPEC)
    explicit = NodeSpec.model_validate({**SPEC, "cluster": {"pod_cidr": "192.168.0.0/16"}})
    other = NodeSpec.model_validate({**SPEC, "cluster": {"pod_cidr": "172.16.0.0/16"}})
    assert plain.spec_hash() == explicit.spec_hash() != other.spec_hash()


def test_spec_ssh_keys_default_to_empty() -> None:
    data = spec_data()
    del data["ssh_authorized_keys"]
    assert NodeSpec.model_validate(data).ssh_authorized_keys == []


@pytest.mark.parametrize("role", ["master", "worker"])
def test_spec_roles(role: str) -> None:
    assert NodeSpec.model_validate(spec_data(role=role)).role.value == role


@pytest.mark.parametrize("role", ["Master", "control-plane", "", "etcd"])
def test_spec_refuses_unknown_roles(role: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeSpec.model_validate(spec_data(role=role))
    assert exc.value.errors()[0]["loc"] == ("role",)


@pytest.mark.parametrize("extra", [{"cpu": 2}, {"name": "m1"}, {"status": {}}])
def test_spec_refuses_unknown_fields(extra: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeSpec.model_validate(spec_data(**extra))
    assert exc.value.errors()[0]["type"] == "extra_forbidden"


def test_spec_refuses_unknown_nested_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        NodeSpec.model_validate(spec_data(network=network_data(bridge="br0")))
    assert exc.value.errors()[0]["loc"] == ("network", "bridge")


@pytest.mark.parametrize("missing", ["role", "vcpus", "image", "network", "kubernetes_version"])
def test_spec_requires_fields(missing: str) -> None:
    data = spec_data()
    del data[missing]
    with pytest.raises(ValidationError) as exc:
        NodeSpec.model_validate(data)
    assert exc.value.errors()[0]["loc"] == (missing,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vcpus", 0),
        ("vcpus", 257),
        ("memory_mib", 63),
        ("memory_mib", 4 * 1024 * 1024 + 1),
        ("disk_gib", 0),
        ("disk_gib", 65_537),
        ("vcpus", "two"),
        ("vcpus", 1.5),
    ],
)
def test_spec_bounds(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeSpec.model_validate(spec_data(**{field: value}))
    assert exc.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vcpus", 1),
        ("vcpus", 256),
        ("memory_mib", 64),
        ("memory_mib", 4 * 1024 * 1024),
        ("disk_gib", 1),
        ("disk_gib", 65_536),
    ],
)
def test_spec_bounds_inclusive(field: str, value: int) -> None:
    assert getattr(NodeSpec.model_validate(spec_data(**{field: value})), field) == value


@pytest.mark.parametrize("version", ["1.31.2", "1.0.0", "1.100.999"])
def test_spec_kubernetes_version_accepted(version: str) -> None:
    assert NodeSpec.model_validate(spec_data(kubernetes_version=version)).kubernetes_version == (
        version
    )


@pytest.mark.parametrize(
    "version",
    ["v1.31.2", "1.31", "1.31.2-rc.1", "2.0.0", "1.31.2\n", " 1.31.2", "1.1000.0", "", "latest"],
)
def test_spec_kubernetes_version_refused(version: str) -> None:
    with pytest.raises(ValidationError, match=r"must look like 1\.31\.2"):
        NodeSpec.model_validate(spec_data(kubernetes_version=version))


@pytest.mark.parametrize("image", ["Lab", "../lab", "lab/x", "", "lab.qcow2"])
def test_spec_image_must_be_a_name(image: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeSpec.model_validate(spec_data(image=image))
    assert exc.value.errors()[0]["loc"] == ("image",)


def test_spec_accepts_single_line_ssh_keys() -> None:
    keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI me@host", "ssh-rsa AAAAB3 other"]
    assert NodeSpec.model_validate(spec_data(ssh_authorized_keys=keys)).ssh_authorized_keys == keys


@pytest.mark.parametrize(
    "key",
    [
        "ssh-ed25519 AAAA me\nssh-ed25519 BBBB intruder",
        "ssh-ed25519 AAAA me\r\nruncmd: [reboot]",
        "ssh-ed25519 AAAA me\r",
        "\n",
    ],
)
def test_spec_refuses_multi_line_ssh_keys(key: str) -> None:
    with pytest.raises(ValidationError, match="single line"):
        NodeSpec.model_validate(spec_data(ssh_authorized_keys=[key]))


def test_spec_limits_ssh_keys() -> None:
    with pytest.raises(ValidationError):
        NodeSpec.model_validate(spec_data(ssh_authorized_keys=["k"] * 65))
    with pytest.raises(ValidationError):
        NodeSpec.model_validate(spec_data(ssh_authorized_keys=["k" * 16_385]))
    assert (
        len(NodeSpec.model_validate(spec_data(ssh_authorized_keys=["k"] * 64)).ssh_authorized_keys)
        == 64
    )


def test_spec_is_frozen() -> None:
    spec = NodeSpec.model_validate(SPEC)
    with pytest.raises(ValidationError):
        spec.vcpus = 4


# --- spec_hash --------------------------------------------------------------------------------


def test_spec_hash_is_stable_across_dict_ordering() -> None:
    reordered = {key: SPEC[key] for key in reversed(list(SPEC))}
    reordered["network"] = {key: NETWORK[key] for key in reversed(list(NETWORK))}
    assert list(reordered) != list(SPEC)
    a = NodeSpec.model_validate(SPEC)
    b = NodeSpec.model_validate(reordered)
    assert a.spec_hash() == b.spec_hash()


def test_spec_hash_is_stable_across_processes_and_json_round_trip() -> None:
    spec = NodeSpec.model_validate(SPEC)
    again = NodeSpec.model_validate_json(spec.model_dump_json())
    assert spec.spec_hash() == again.spec_hash()
    assert len(spec.spec_hash()) == 16
    int(spec.spec_hash(), 16)  # hexadecimal


def test_spec_hash_counts_defaults_like_explicit_values() -> None:
    implicit = spec_data(network=network_data())
    del implicit["network"]["mtu"]
    del implicit["ssh_authorized_keys"]
    assert (
        NodeSpec.model_validate(implicit).spec_hash() == NodeSpec.model_validate(SPEC).spec_hash()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"role": "worker"},
        {"vcpus": 3},
        {"memory_mib": 4096},
        {"disk_gib": 21},
        {"image": "lab2"},
        {"kubernetes_version": "1.31.3"},
        {"network": {**NETWORK, "vni": 4243}},
        {"network": {**NETWORK, "address": "10.42.0.12/24"}},
        {"network": {**NETWORK, "mtu": 1400}},
        {"ssh_authorized_keys": ["ssh-ed25519 AAAA me"]},
    ],
)
def test_spec_hash_changes_with_every_field(change: dict[str, Any]) -> None:
    base = NodeSpec.model_validate(SPEC)
    other = NodeSpec.model_validate(spec_data(**change))
    assert base.spec_hash() != other.spec_hash()


# --- etcd mode and the cluster's VIP --------------------------------------------------------


def test_cluster_etcd_mode_and_vip_default_to_static_pod_and_none() -> None:
    spec = NodeSpec.model_validate(SPEC)
    assert spec.cluster.etcd_mode is EtcdMode.STATIC_POD
    assert spec.cluster.vip is None
    chosen = NodeSpec.model_validate(
        spec_data(cluster={"etcd_mode": "systemd", "vip": "10.42.0.5"})
    )
    assert chosen.cluster.etcd_mode is EtcdMode.SYSTEMD
    assert chosen.cluster.vip == "10.42.0.5"
    assert chosen.spec_hash() != spec.spec_hash()


@pytest.mark.parametrize(
    ("cluster", "match"),
    [
        ({"etcd_mode": "docker"}, "etcd_mode"),
        ({"vip": "fd00::5"}, "IPv4"),
        ({"vip": "10.42.0.5/24"}, "does not appear to be"),
        ({"vip": "10.43.0.5"}, "not inside the node subnet"),
        ({"vip": NETWORK["address"].split("/")[0]}, "free address"),
        ({"vip": NETWORK["gateway"]}, "free address"),
        ({"vip": "10.42.0.12", "masters": [{"name": "m2", "address": "10.42.0.12"}]}, "free"),
    ],
)
def test_cluster_bad_vip_or_etcd_mode_is_refused(cluster: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        NodeSpec.model_validate(spec_data(cluster=cluster))
