"""hostagent.networks.wanted_networks: node records -> the host's cluster networks (pure)."""

from __future__ import annotations

from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.networks import wanted_networks
from hostagent.store import NodeRecord
from network.model import Peer
from network.names import tap_name


class NoPeers:
    def peers(self, cluster: str) -> frozenset[Peer]:
        return frozenset()


def record(cluster: str, name: str, vni: int) -> NodeRecord:
    spec = NodeSpec.model_validate(
        {
            "role": "worker",
            "vcpus": 1,
            "memory_mib": 1024,
            "disk_gib": 10,
            "image": "lab",
            "kubernetes_version": "1.31.2",
            "network": {"vni": vni, "address": f"10.{vni}.0.11/24", "gateway": f"10.{vni}.0.1"},
        }
    )
    key = NodeKey(cluster=cluster, name=name)
    return NodeRecord(key, spec, "tok", Phase.PENDING, "", "", False, None, None)


def test_each_cluster_network_lists_the_taps_of_its_nodes_on_this_host() -> None:
    records = [record("alpha", "m1", 42), record("beta", "w1", 43), record("alpha", "w1", 42)]
    alpha, beta = wanted_networks(records, NoPeers(), with_underlay=False)
    assert (alpha.cluster, beta.cluster) == ("alpha", "beta")
    assert alpha.taps == {tap_name("alpha", "m1"), tap_name("alpha", "w1")}
    assert beta.taps == {tap_name("beta", "w1")}
