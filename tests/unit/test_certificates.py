"""hostagent.certificates: what a node's certificates depend on, from its record."""

from __future__ import annotations

import pytest

from common.errors import ProvisioningError
from hostagent.certificates import identity
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.store import NodeRecord
from pki.certset import NodeIdentity

SPEC = NodeSpec.model_validate(
    {
        "role": "master",
        "vcpus": 2,
        "memory_mib": 2048,
        "disk_gib": 10,
        "image": "debian",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 42, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
        "cluster": {"service_cidr": "10.100.0.0/16", "api_endpoint": "api.c1.example:6443"},
    }
)


def record(spec: NodeSpec) -> NodeRecord:
    key = NodeKey(cluster="c1", name="m1")
    return NodeRecord(key, spec, "tok", Phase.PENDING, "", "", False, None, None)


def test_identity_from_the_record() -> None:
    node = identity(record(SPEC))
    assert node == NodeIdentity(
        "c1", "m1", "master", "10.42.0.11", "10.100.0.0/16", "cluster.local", "api.c1.example:6443"
    )
    assert node.service_ip == "10.100.0.1"


def test_an_identity_the_pki_refuses_is_a_provisioning_error() -> None:
    # model_construct skips the model's own check of the endpoint, so the identity's answers.
    cluster = SPEC.cluster.model_construct(**{**dict(SPEC.cluster), "api_endpoint": "api"})
    spec = SPEC.model_copy(update={"cluster": cluster})
    with pytest.raises(ProvisioningError, match=r"certificates of c1/m1: .*HOST:PORT"):
        identity(record(spec))


def test_the_clusters_vip_reaches_the_identity() -> None:
    cluster = SPEC.cluster.model_copy(update={"vip": "10.42.0.5"})
    assert identity(record(SPEC.model_copy(update={"cluster": cluster}))).vip == "10.42.0.5"
    assert identity(record(SPEC)).vip is None
