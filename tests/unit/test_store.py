"""hostagent.store against a real SQLite file: records, transitions, transactions, WAL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pytest_mock import MockerFixture

import hostagent.sqlite as sqlite_module
import hostagent.store as store_module
from hostagent.model import NodeKey, NodeSpec, Phase
from hostagent.store import NodeRecord, Store
from network.model import Peer

KEY = NodeKey(cluster="alpha", name="m1")
OTHER = NodeKey(cluster="alpha", name="w1")


def make_spec(**overrides: Any) -> NodeSpec:
    data: dict[str, Any] = {
        "role": "master",
        "vcpus": 2,
        "memory_mib": 2048,
        "disk_gib": 20,
        "image": "lab",
        "kubernetes_version": "1.31.2",
        "network": {"vni": 4242, "address": "10.42.0.11/24", "gateway": "10.42.0.1"},
        **overrides,
    }
    return NodeSpec.model_validate(data)


SPEC = make_spec()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    store = Store(db_path)
    yield store
    store.close()


def record(store: Store, key: NodeKey = KEY) -> NodeRecord:
    found = store.get(key)
    assert found is not None
    return found


def phases(store: Store, key: NodeKey = KEY) -> list[tuple[Phase, str]]:
    return [(t.phase, t.message) for t in store.transitions(key)]


def snapshot(store: Store) -> tuple[list[NodeRecord], list[list[tuple[Phase, str]]]]:
    return store.all(), [phases(store, key) for key in (KEY, OTHER)]


# --- create / get / all -----------------------------------------------------------------------


async def test_create_returns_a_pending_record(store: Store) -> None:
    created = await store.create(KEY, SPEC, "tok")
    assert created.key == KEY
    assert created.spec == SPEC
    assert created.token == "tok"
    assert created.phase is Phase.PENDING
    assert created.message == ""
    assert created.deleting is False
    assert created.guest is None
    assert created.domain_id is None
    assert created.updated_at.endswith("Z")
    assert store.get(KEY) == created
    assert phases(store) == [(Phase.PENDING, "accepted")]


def test_get_unknown_is_none(store: Store) -> None:
    assert store.get(KEY) is None
    assert store.all() == []
    assert store.transitions(KEY) == []


async def test_all_is_sorted_by_cluster_then_name(store: Store) -> None:
    keys = [
        NodeKey(cluster="beta", name="a"),
        NodeKey(cluster="alpha", name="w1"),
        NodeKey(cluster="alpha", name="m1"),
    ]
    for key in keys:
        await store.create(key, SPEC, "tok")
    assert [r.key for r in store.all()] == sorted(keys, key=lambda k: (k.cluster, k.name))


async def test_create_of_an_existing_key_fails_and_changes_nothing(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    before = snapshot(store)
    with pytest.raises(sqlite3.IntegrityError):
        await store.create(KEY, make_spec(vcpus=4), "other-token")
    assert snapshot(store) == before
    assert record(store).token == "tok"
    # The connection is usable afterwards: no transaction was left open.
    await store.create(OTHER, SPEC, "tok2")
    assert record(store, OTHER).phase is Phase.PENDING


async def test_a_failure_inside_a_transaction_rolls_back_every_statement(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failure injection at one exact point: the transition insert after the node's update."""
    await store.create(KEY, SPEC, "tok")
    before = snapshot(store)

    def broken_log(*_args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_module, "_log", broken_log)
    with pytest.raises(sqlite3.OperationalError):
        await store.create(OTHER, SPEC, "tok2")
    with pytest.raises(sqlite3.OperationalError):
        await store.update_spec(KEY, make_spec(vcpus=4))
    with pytest.raises(sqlite3.OperationalError):
        await store.mark_deleting(KEY)
    with pytest.raises(sqlite3.OperationalError):
        await store.set_ready(KEY, {"ip": "10.42.0.11"})
    assert snapshot(store) == before


# --- update_spec ------------------------------------------------------------------------------


async def test_update_spec_stores_the_spec_and_records_a_transition(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.RUNNING, domain_id=3)
    bigger = make_spec(vcpus=4, disk_gib=30)
    await store.update_spec(KEY, bigger)
    updated = record(store)
    assert updated.spec == bigger
    assert updated.phase is Phase.PENDING
    assert updated.message == "spec changed"
    assert updated.token == "tok"
    assert phases(store)[-1] == (Phase.PENDING, "spec changed")
    assert len(phases(store)) == 3


# --- set_phase --------------------------------------------------------------------------------


async def test_set_phase_records_phase_message_and_transition(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    assert await store.set_phase(KEY, Phase.PROVISIONING, "making the disk") is True
    current = record(store)
    assert (current.phase, current.message) == (Phase.PROVISIONING, "making the disk")
    assert phases(store) == [
        (Phase.PENDING, "accepted"),
        (Phase.PROVISIONING, "making the disk"),
    ]


async def test_set_phase_without_change_returns_false_and_writes_nothing(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.RUNNING, "", domain_id=7)
    before = record(store)
    transitions = store.transitions(KEY)
    assert await store.set_phase(KEY, Phase.RUNNING, "") is False
    assert await store.set_phase(KEY, Phase.RUNNING, "", domain_id=7) is False
    assert record(store) == before  # updated_at untouched too
    assert store.transitions(KEY) == transitions


async def test_set_phase_on_a_disk_too_full_for_its_event_records_the_phase_alone(
    store: Store, mocker: MockerFixture
) -> None:
    await store.create(KEY, SPEC, "tok")
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # what sqlite3 sets on a full disk
    real_event = store_module._event

    def event(db: Any, key: NodeKey, kind: str, message: str, stamp: str) -> None:
        if kind == "failed":
            raise full
        real_event(db, key, kind, message, stamp)

    mocker.patch.object(store_module, "_event", side_effect=event)
    assert await store.set_phase(KEY, Phase.FAILED, "disk full", event="failed") is True
    assert (record(store).phase, record(store).message) == (Phase.FAILED, "disk full")
    assert [e.kind for e in store.events(KEY)] == ["created"]


async def test_set_phase_message_change_is_a_change(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.PENDING, "attempt 1 failed")
    assert await store.set_phase(KEY, Phase.PENDING, "attempt 2 failed") is True
    assert phases(store)[-1] == (Phase.PENDING, "attempt 2 failed")


async def test_set_phase_on_unknown_node_is_false(store: Store) -> None:
    assert await store.set_phase(KEY, Phase.RUNNING) is False
    assert store.all() == []
    assert store.transitions(KEY) == []


async def test_domain_id_change_updates_without_a_transition(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    assert await store.set_phase(KEY, Phase.RUNNING, domain_id=3) is True
    assert record(store).domain_id == 3
    count = len(store.transitions(KEY))
    assert await store.set_phase(KEY, Phase.RUNNING, domain_id=9) is True
    assert record(store).domain_id == 9
    assert len(store.transitions(KEY)) == count


async def test_set_phase_without_domain_id_keeps_the_known_one(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.RUNNING, domain_id=3)
    await store.set_phase(KEY, Phase.FAILED, "broken")
    assert record(store).domain_id == 3


# --- set_ready / mark_deleting / remove -------------------------------------------------------


async def test_set_ready_stores_the_guest_report(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.RUNNING, "something", domain_id=1)
    report = {"hostname": "alpha-m1", "addresses": ["10.42.0.11"], "uptime": 3.5}
    await store.set_ready(KEY, report)
    ready = record(store)
    assert ready.phase is Phase.READY
    assert ready.message == ""
    assert ready.guest == report
    assert ready.domain_id == 1
    assert phases(store)[-1] == (Phase.READY, "guest phoned home")


async def test_mark_deleting(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.FAILED, "broken")
    await store.mark_deleting(KEY)
    deleting = record(store)
    assert deleting.deleting is True
    assert deleting.phase is Phase.DELETING
    assert deleting.message == ""
    assert phases(store)[-1] == (Phase.DELETING, "delete requested")


async def test_a_node_being_deleted_reads_deleting_until_its_deletion_fails(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.mark_deleting(KEY)
    assert await store.set_phase(KEY, Phase.RUNNING, domain_id=3) is False
    assert (record(store).phase, record(store).domain_id) == (Phase.DELETING, None)
    assert await store.set_phase(KEY, Phase.FAILED, "deleting the node failed") is True
    assert phases(store)[-2:] == [
        (Phase.DELETING, "delete requested"),
        (Phase.FAILED, "deleting the node failed"),
    ]


async def test_remove_deletes_the_node_and_its_transitions_only(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.create(OTHER, SPEC, "tok2")
    await store.set_phase(KEY, Phase.RUNNING)
    await store.remove(KEY)
    assert store.get(KEY) is None
    assert store.transitions(KEY) == []
    assert [r.key for r in store.all()] == [OTHER]
    assert phases(store, OTHER) == [(Phase.PENDING, "accepted")]


async def test_recreated_node_starts_a_fresh_history(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_phase(KEY, Phase.RUNNING)
    await store.remove(KEY)
    await store.create(KEY, SPEC, "tok")
    assert phases(store) == [(Phase.PENDING, "accepted")]


# --- the file ---------------------------------------------------------------------------------


def test_creates_the_parent_directory(db_path: Path, store: Store) -> None:
    assert db_path.is_file()


def test_wal_mode_is_on(db_path: Path, store: Store) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_data_survives_closing_and_reopening(db_path: Path) -> None:
    first = Store(db_path)
    await first.create(KEY, SPEC, "tok")
    await first.set_phase(KEY, Phase.RUNNING, "up", domain_id=5)
    await first.set_ready(KEY, {"k": "v"})
    before = first.all(), first.transitions(KEY)
    first.close()

    second = Store(db_path)
    try:
        assert (second.all(), second.transitions(KEY)) == before
        assert record(second).guest == {"k": "v"}
        assert record(second).domain_id == 5
    finally:
        second.close()


async def test_a_second_store_on_the_same_file_sees_commits(db_path: Path, store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    reader = Store(db_path)
    try:
        assert reader.get(KEY) == store.get(KEY)
        await store.set_phase(KEY, Phase.RUNNING)
        assert record(reader).phase is Phase.RUNNING
    finally:
        reader.close()


# --- peers ------------------------------------------------------------------------------------

PEER_A = Peer("10.250.0.12", frozenset({"52:54:00:aa:bb:cc", "52:54:00:aa:bb:cd"}))
PEER_B = Peer("10.250.0.9")


async def test_peers_round_trip_and_survive_reopening(db_path: Path) -> None:
    first = Store(db_path)
    assert first.peers("alpha") is None
    await first.set_peers("alpha", [PEER_A, PEER_B])
    await first.set_peers("beta", [PEER_B])
    assert first.peers("alpha") == [PEER_B, PEER_A]  # in address order, numerically
    first.close()

    second = Store(db_path)
    try:
        assert second.peers("alpha") == [PEER_B, PEER_A]
        assert second.all_peers() == {"alpha": [PEER_B, PEER_A], "beta": [PEER_B]}
    finally:
        second.close()


async def test_set_peers_replaces_and_an_empty_list_is_a_list(store: Store) -> None:
    await store.set_peers("alpha", [PEER_A, PEER_B])
    await store.set_peers("alpha", [])
    assert store.peers("alpha") == []
    await store.set_peers("alpha", [PEER_B])
    assert store.peers("alpha") == [PEER_B]


async def test_delete_peers(store: Store) -> None:
    await store.set_peers("alpha", [PEER_A])
    await store.set_peers("beta", [PEER_B])
    assert await store.delete_peers("alpha") is True
    assert await store.delete_peers("alpha") is False
    assert store.peers("alpha") is None
    assert store.peers("beta") == [PEER_B]


async def test_peers_are_apart_from_nodes(store: Store) -> None:
    await store.create(KEY, SPEC, "tok")
    await store.set_peers("alpha", [PEER_A])
    await store.remove(KEY)
    assert store.peers("alpha") == [PEER_A]
    assert store.all() == []


# --- the event loop ---------------------------------------------------------------------------


async def test_a_slow_commit_does_not_hold_the_event_loop(
    store: Store, mocker: MockerFixture
) -> None:
    """Failure injection at the one commit: it takes 0.3 s (a loaded disk's fsync) while a
    coroutine on the loop keeps ticking every 10 ms."""
    real = sqlite_module.transaction

    @contextmanager
    def slow_commit(db: sqlite_module.Connection) -> Iterator[sqlite_module.Connection]:
        with real(db) as conn:
            yield conn
            time.sleep(0.3)

    mocker.patch.object(sqlite_module, "transaction", slow_commit)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    await store.create(KEY, SPEC, "tok")
    ticker.cancel()
    assert ticks >= 10  # about 30 without the 10 ms timer's slack; 0 on the loop
    assert record(store).phase is Phase.PENDING
