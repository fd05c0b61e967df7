"""The SQLite zone store writes a host's report only when it changed or every
report_interval_s, as the etcd store does (liveness.report_due): a heartbeat with an
unchanged report costs no fsync; the heartbeat's time is kept in memory meanwhile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hostagent.sqlite import read_only
from hostagent.zone.store import SqliteZoneStore
from tests.unit.test_zone_service import report

INTERVAL_S = 60.0
T0 = 1_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteZoneStore]:
    opened = SqliteZoneStore(tmp_path / "zone.db", report_interval_s=INTERVAL_S)
    await opened.start()
    yield opened
    await opened.close()


def stored_beat(path: Path, host: str) -> float:
    with read_only(path) as db:
        row = db.execute("SELECT last_heartbeat FROM hosts WHERE id = ?", (host,)).fetchone()
    return float(row["last_heartbeat"])


async def test_an_unchanged_report_is_not_written_until_the_interval(
    store: SqliteZoneStore, tmp_path: Path
) -> None:
    assert await store.put_host("h1", report(1), T0) is True
    assert await store.put_host("h1", report(1), T0 + 5) is False
    record = store.host("h1")
    assert record is not None and record.last_heartbeat == T0 + 5  # seen at once
    assert stored_beat(tmp_path / "zone.db", "h1") == T0  # but not written
    await store.put_host("h1", report(1), T0 + INTERVAL_S)
    assert stored_beat(tmp_path / "zone.db", "h1") == T0 + INTERVAL_S


async def test_a_changed_report_is_written_at_once(store: SqliteZoneStore, tmp_path: Path) -> None:
    await store.put_host("h1", report(1), T0)
    await store.put_host("h1", report(1, memory_mib=8192), T0 + 5)
    assert stored_beat(tmp_path / "zone.db", "h1") == T0 + 5
    record = store.host("h1")
    assert record is not None and record.report.allocatable.memory_mib == 8192


async def test_a_reopened_store_has_the_last_written_heartbeat(tmp_path: Path) -> None:
    first = SqliteZoneStore(tmp_path / "zone.db", report_interval_s=INTERVAL_S)
    await first.start()
    await first.put_host("h1", report(1), T0)
    await first.put_host("h1", report(1), T0 + 30)
    await first.close()
    again = SqliteZoneStore(tmp_path / "zone.db", report_interval_s=INTERVAL_S)
    await again.start()
    try:
        record = again.host("h1")
        assert record is not None and record.last_heartbeat == T0
        # the first heartbeat after the restart is written whatever it holds
        await again.put_host("h1", report(1), T0 + 35)
        assert stored_beat(tmp_path / "zone.db", "h1") == T0 + 35
    finally:
        await again.close()
