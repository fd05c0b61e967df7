"""The CLI's output: plain-text tables (left-aligned columns, two spaces apart), JSON or
YAML, and ages."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from common import yamlio

NODE_COLUMNS = ("CLUSTER", "NODE", "ROLE", "PHASE", "HEALTH", "AGE", "ADDRESS", "MESSAGE")


def render(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def age(stamp: str) -> str:
    """How long ago an API timestamp (2026-11-24T03:00:00.000000Z) was: 5s, 3m, 2h, 1d."""
    then = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def nodes(items: list[dict[str, Any]]) -> str:
    """The agent's nodes (as the API returns them), one row each."""
    rows = [NODE_COLUMNS] + [
        (
            n["cluster"],
            n["name"],
            n["spec"]["role"],
            n["status"]["phase"],
            _health(n["status"].get("health")),
            age(n["status"]["updated_at"]),
            n["spec"]["network"]["address"],
            n["status"]["message"][:60],
        )
        for n in items
    ]
    return render(rows)


def node_events(node: dict[str, Any]) -> str:
    """A node's events (GET of one node), oldest first, after its row."""
    events = node.get("events") or []
    lines = [f"  {age(e['at'])} ago  {e['kind']:<12}  {e['message']}" for e in events]
    return "\n".join(["", "Events (oldest first):", *lines]) if lines else ""


def _health(health: dict[str, Any] | None) -> str:
    """ok, or why not (an older agent sends no health: -)."""
    if health is None:
        return "-"
    return "ok" if health["healthy"] else str(health["reason"])


def emit(data: Any, output: str, as_table: Callable[[], str]) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    elif output == "yaml":
        print(yamlio.dump(data), end="")
    else:
        print(as_table())
