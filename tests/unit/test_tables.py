"""The CLI's node table."""

from __future__ import annotations

from typing import Any

from hostagent.tables import nodes


def item(name: str, health: dict[str, Any] | None) -> dict[str, Any]:
    status = {"phase": "Ready", "updated_at": "2026-12-07T05:00:00.000000Z", "message": ""}
    return {
        "cluster": "alpha",
        "name": name,
        "spec": {"role": "worker", "network": {"address": "10.42.0.11/24"}},
        "status": status if health is None else {**status, "health": health},
    }


def test_the_node_table_shows_health() -> None:
    sick = {"healthy": False, "reason": "crash-loop", "message": "", "since": "x"}
    well = {"healthy": True, "reason": "", "message": "", "since": None}
    header, *rows = nodes([item("w1", sick), item("w2", well), item("w3", None)]).splitlines()
    assert header.split()[:5] == ["CLUSTER", "NODE", "ROLE", "PHASE", "HEALTH"]
    assert [row.split()[4] for row in rows] == ["crash-loop", "ok", "-"]
