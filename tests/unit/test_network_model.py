"""network.model: validation of what the agent asks for (pure, no kernel)."""

from __future__ import annotations

import pytest

from network.model import (
    ZERO_MAC,
    ClusterNetworkWanted,
    FdbEntry,
    HostNetworkWanted,
    HostSeen,
    Peer,
    Underlay,
)
from network.names import Owner, tap_name


def test_underlay_defaults_to_iana_port_and_device_mtu() -> None:
    underlay = Underlay("192.0.2.1")
    assert (underlay.port, underlay.mtu) == (4789, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "eth0"}, "underlay address 'eth0' is not an IPv4 address"),
        ({"address": "192.0.2.1/24"}, "not an IPv4 address"),
        ({"address": "2001:db8::1"}, "not an IPv4 address"),
        ({"address": "192.0.2.1", "port": 0}, "port 0 is outside"),
        ({"address": "192.0.2.1", "port": 65536}, "port 65536 is outside"),
        ({"address": "192.0.2.1", "mtu": 625}, r"MTU 625 is outside 626\.\.65535"),
    ],
)
def test_underlay_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Underlay(**kwargs)  # type: ignore[arg-type]


def test_peer_normalises_macs_and_builds_its_fdb() -> None:
    peer = Peer("192.0.2.2", frozenset({"52:54:00:AB:CD:EF"}))
    assert peer.macs == {"52:54:00:ab:cd:ef"}
    assert peer.fdb() == {
        FdbEntry(ZERO_MAC, "192.0.2.2"),
        FdbEntry("52:54:00:ab:cd:ef", "192.0.2.2"),
    }


@pytest.mark.parametrize(
    "mac", [ZERO_MAC, "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "52:54:00:ab:cd", "5254.00ab.cdef"]
)
def test_peer_rejects_non_unicast_macs(mac: str) -> None:
    with pytest.raises(ValueError, match="not a unicast MAC"):
        Peer("192.0.2.2", frozenset({mac}))


def test_peer_rejects_names() -> None:
    with pytest.raises(ValueError, match="peer address 'host-2' is not an IPv4 address"):
        Peer("host-2")


def test_cluster_network_names_and_fdb() -> None:
    cluster = ClusterNetworkWanted(
        "alpha",
        42,
        "10.42.0.1/24",
        peers=frozenset({Peer("192.0.2.1"), Peer("192.0.2.2", frozenset({"52:54:00:00:00:02"}))}),
    )
    assert (cluster.bridge, cluster.vxlan) == ("habr42", "havx42")
    assert cluster.alias("h1") == "hostagent host=h1 cluster=alpha vni=42"
    assert cluster.owner("h1") == Owner("h1", "alpha", 42)
    assert cluster.fdb("192.0.2.1") == {
        FdbEntry(ZERO_MAC, "192.0.2.2"),
        FdbEntry("52:54:00:00:00:02", "192.0.2.2"),
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "10.42.0.1"}, "prefix"),
        ({"cluster": "Alpha"}, "DNS-1123"),
        ({"vni": 0}, "vni 0"),
        ({"mtu": 575}, "MTU 575 is outside"),
        ({"taps": ["vnet0"]}, "tap 'vnet0' is not a hostagent tap name"),
        ({"taps": [tap_name("alpha", "m1").upper()]}, "not a hostagent tap name"),
        (
            {"peers": [Peer("192.0.2.2"), Peer("192.0.2.2", frozenset({"52:54:00:00:00:01"}))]},
            "listed twice",
        ),
        (
            {
                "peers": [
                    Peer("192.0.2.2", frozenset({"52:54:00:00:00:09"})),
                    Peer("192.0.2.3", frozenset({"52:54:00:00:00:09"})),
                ]
            },
            "52:54:00:00:00:09 is claimed by peers",
        ),
    ],
)
def test_cluster_network_rejects(kwargs: dict[str, object], message: str) -> None:
    good: dict[str, object] = {"cluster": "alpha", "vni": 42, "address": "10.42.0.1/24"}
    with pytest.raises(ValueError, match=message):
        ClusterNetworkWanted(**(good | kwargs))  # type: ignore[arg-type]


def test_peers_given_as_any_iterable_compare_equal() -> None:
    peers = [Peer("192.0.2.3"), Peer("192.0.2.2")]
    one = ClusterNetworkWanted("alpha", 42, "10.42.0.1/24", peers=peers)  # type: ignore[arg-type]
    other = ClusterNetworkWanted("alpha", 42, "10.42.0.1/24", peers=frozenset(reversed(peers)))
    assert one == other
    assert hash(one) == hash(other)


def test_taps_given_as_any_iterable_compare_equal() -> None:
    taps = [tap_name("alpha", "m1"), tap_name("alpha", "w1")]
    one = ClusterNetworkWanted("alpha", 42, "10.42.0.1/24", taps=taps)  # type: ignore[arg-type]
    other = ClusterNetworkWanted("alpha", 42, "10.42.0.1/24", taps=frozenset(reversed(taps)))
    assert one == other
    assert one.taps == frozenset(taps)


def test_host_network_needs_a_host_id() -> None:
    assert HostNetworkWanted.of([], host="lab-1.example").host == "lab-1.example"
    with pytest.raises(TypeError):
        HostNetworkWanted()  # type: ignore[call-arg]


def test_host_seen_finds_the_device_of_an_address() -> None:
    assert HostSeen().holder("192.0.2.1") is None
