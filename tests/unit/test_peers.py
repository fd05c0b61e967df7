"""hostagent.networks' peer sources: the PUT body, the stored lists, the union with the
static configuration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import NetworkConfig, StaticCluster, StaticPeer
from hostagent.errors import Invalid, MalformedRequest, NotFound
from hostagent.networks import MergedPeers, StaticPeers, StoredPeers, parse_peers
from hostagent.store import Store
from network.model import Peer

MAC_A, MAC_B, MAC_C = "52:54:00:aa:bb:01", "52:54:00:aa:bb:02", "52:54:00:aa:bb:03"


def body(*peers: dict[str, Any]) -> bytes:
    return json.dumps({"peers": list(peers)}).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


# --- parse_peers ------------------------------------------------------------------------------


def test_parse_canonicalises() -> None:
    peers = parse_peers(
        "alpha",
        body({"address": "10.250.0.12", "macs": ["52:54:00:AA:BB:01"]}, {"address": "10.250.0.13"}),
    )
    assert peers == [Peer("10.250.0.12", frozenset({MAC_A})), Peer("10.250.0.13")]


def test_an_empty_list_is_valid() -> None:
    assert parse_peers("alpha", body()) == []


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"peers"', b""])
def test_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_peers("alpha", raw)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{}", "peers"),
        (b'{"peers": [], "extra": 1}', "extra"),
        (b'{"peers": "10.0.0.1"}', "peers"),
        (body({"address": "10.250.0.300"}), "not an IPv4 address"),
        (body({"address": "fe80::1"}), "not an IPv4 address"),
        (body({"address": "224.0.0.1"}), "unicast"),
        (body({"address": "0.0.0.0"}), "unicast"),
        (body({"address": "255.255.255.255"}), "unicast"),
        (body({"address": "10.0.0.1", "macs": ["01:00:5e:00:00:01"]}), "unicast MAC"),
        (body({"address": "10.0.0.1", "macs": ["00:00:00:00:00:00"]}), "unicast MAC"),
        (body({"address": "10.0.0.1", "macs": ["52-54-00-aa-bb-01"]}), "unicast MAC"),
        (body({"address": "10.0.0.1", "port": 4789}), "port"),
        (body({"address": "10.0.0.1"}, {"address": "10.0.0.1"}), "listed twice"),
        (
            body(
                {"address": "10.0.0.1", "macs": [MAC_A]}, {"address": "10.0.0.2", "macs": [MAC_A]}
            ),
            "a MAC lives on one host",
        ),
    ],
)
def test_invalid(raw: bytes, words: str) -> None:
    with pytest.raises(Invalid) as exc:
        parse_peers("alpha", raw)
    assert words in str(exc.value)


# --- StoredPeers ------------------------------------------------------------------------------


async def test_stored_peers_put_get_delete(store: Store) -> None:
    changed: list[str] = []
    stored = StoredPeers(store, changed.append)
    with pytest.raises(NotFound):
        stored.get("alpha")
    assert stored.peers("alpha") == frozenset()

    peers = [Peer("10.250.0.12", frozenset({MAC_A}))]
    assert await stored.put("alpha", peers) == peers
    assert changed == ["alpha"]
    assert stored.peers("alpha") == frozenset(peers)

    await stored.put("alpha", list(reversed(peers)))  # the same list: nothing to rewire
    assert changed == ["alpha"]

    await stored.delete("alpha")
    await stored.delete("alpha")  # idempotent, and nothing changed the second time
    assert changed == ["alpha", "alpha"]
    assert stored.peers("alpha") == frozenset()


# --- MergedPeers ------------------------------------------------------------------------------


def static(*peers: StaticPeer) -> StaticPeers:
    return StaticPeers(NetworkConfig(clusters=[StaticCluster(cluster="alpha", peers=list(peers))]))


async def test_union_merges_macs_per_address(store: Store) -> None:
    stored = StoredPeers(store, lambda _c: None)
    await stored.put("alpha", [Peer("10.0.0.2", frozenset({MAC_A})), Peer("10.0.0.3")])
    config = static(
        StaticPeer(address="10.0.0.2", macs=[MAC_B]), StaticPeer(address="10.0.0.4", macs=[MAC_C])
    )
    merged = MergedPeers(stored, config)
    assert merged.peers("alpha") == {
        Peer("10.0.0.2", frozenset({MAC_A, MAC_B})),
        Peer("10.0.0.3"),
        Peer("10.0.0.4", frozenset({MAC_C})),
    }
    assert merged.peers("beta") == frozenset()


async def test_union_gives_a_disputed_mac_to_the_first_source(store: Store) -> None:
    stored = StoredPeers(store, lambda _c: None)
    await stored.put("alpha", [Peer("10.0.0.2", frozenset({MAC_A}))])
    config = static(StaticPeer(address="10.0.0.3", macs=[MAC_A, MAC_B]))
    assert MergedPeers(stored, config).peers("alpha") == {
        Peer("10.0.0.2", frozenset({MAC_A})),
        Peer("10.0.0.3", frozenset({MAC_B})),
    }
    # Either source alone is what it says.
    assert MergedPeers(config).peers("alpha") == config.peers("alpha")
    assert MergedPeers(stored).peers("alpha") == stored.peers("alpha")


async def test_union_follows_the_store(store: Store) -> None:
    stored = StoredPeers(store, lambda _c: None)
    merged = MergedPeers(stored, static(StaticPeer(address="10.0.0.4")))
    assert merged.peers("alpha") == {Peer("10.0.0.4")}
    await stored.put("alpha", [Peer("10.0.0.5")])
    assert merged.peers("alpha") == {Peer("10.0.0.4"), Peer("10.0.0.5")}
    await stored.delete("alpha")
    assert merged.peers("alpha") == {Peer("10.0.0.4")}
