"""GET /v1/host's JSON, shaped from what the agent knows (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from hostagent.access import KvmDevice
from hostagent.capacity import Resources
from hostagent.hostview import HostFacts, host_view, network_view
from network.health import PeerHealth
from network.model import ClusterNetworkWanted, Peer

CHECKED = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _network(peers: tuple[Peer, ...]) -> ClusterNetworkWanted:
    return ClusterNetworkWanted(
        cluster="alpha", vni=4242, address="10.42.0.1/24", mtu=1450, taps=(), peers=peers
    )


def test_peers_leave_this_host_out_and_carry_their_last_check() -> None:
    peers = (
        Peer("192.0.2.12", frozenset({"52:54:00:00:00:02"})),
        Peer("192.0.2.11", frozenset()),  # this host
        Peer("192.0.2.13", frozenset()),
    )
    health = {"192.0.2.12": PeerHealth("192.0.2.12", True, 0.4, CHECKED)}
    [view] = network_view([_network(peers)], "192.0.2.11", health)
    assert view["vxlan"] == "havx4242" and view["bridge"] == "habr4242"
    assert view["peers"] == [
        {
            "address": "192.0.2.12",
            "macs": ["52:54:00:00:00:02"],
            "reachable": True,
            "rtt_ms": 0.4,
            "checked_at": CHECKED.isoformat(),
        },
        {
            "address": "192.0.2.13",
            "macs": [],
            "reachable": None,
            "rtt_ms": None,
            "checked_at": None,
        },
    ]


def test_without_an_underlay_there_is_no_vxlan() -> None:
    [view] = network_view([_network(())], None, {})
    assert view["vxlan"] is None and view["peers"] == []


def test_host_view_has_the_contract_fields() -> None:
    r = Resources(vcpus=2, memory_mib=4096, disk_gib=100)
    facts = HostFacts(
        host_id="h1",
        physical=r,
        allocatable=r,
        allocated=Resources(vcpus=0, memory_mib=0, disk_gib=0),
        domain_type="qemu",
        domain_type_reason="configured",
        kvm=KvmDevice("/dev/kvm", present=False),
        libvirt_uri="qemu:///system",
        libvirt_connected=True,
        reconciler={"queued": 0, "active": 0},
        underlay_address=None,
        vxlan_port=4789,
        zone=None,
    )
    view = host_view(facts, [])
    assert view["capacity"] == {"vcpus": 2, "memory_mib": 4096, "disk_gib": 100}
    assert view["domain_type"] == "qemu" and view["kvm_device"]["problem"] is None
    assert {"host_id", "capacity", "allocated", "domain_type", "version"} <= set(view)
