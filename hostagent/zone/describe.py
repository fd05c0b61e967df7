"""`hostagent cluster describe`: a cluster as a tree (cluster -> nodes -> host, phase, age),
in the manner of `clusterctl describe`, then its rollout (while one is on) and its latest
events. Pure: text from the zone's answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COLUMNS = ("NAME", "HOST", "PHASE", "AGE", "ADDRESS", "MESSAGE")
EVENTS_SHOWN = 10


def describe(cluster: dict[str, Any], age: Callable[[str], str]) -> str:
    status = cluster["status"]
    nodes = status["nodes"]
    rows = [
        COLUMNS,
        (
            f"Cluster/{cluster['name']}",
            "",
            status["phase"],
            age(status["created_at"]),
            f"vni {status['vni']}, {status['node_subnet']}",
            status["message"],
        ),
    ]
    for role, title in (("master", "ControlPlane"), ("worker", "Workers")):
        members = [n for n in nodes if n["role"] == role]
        if not members:
            continue
        last_group = role == "worker" or not any(n["role"] == "worker" for n in nodes)
        branch, stem = ("└─", "   ") if last_group else ("├─", "│  ")
        ready = sum(1 for n in members if n["phase"] == "Ready")
        rows.append((f"{branch}{title}", "", f"{ready}/{len(members)} Ready", "", "", ""))
        for i, node in enumerate(members):
            twig = "└─" if i == len(members) - 1 else "├─"
            rows.append(
                (
                    f"{stem}{twig}{node['name']}",
                    node["host"],
                    node["phase"],
                    age(node["created_at"]),
                    node["address"],
                    node["message"],
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1][:80]]).rstrip())
    rollout = status.get("rollout")
    if rollout is not None:
        lines += ["", f"Rollout: {rollout['state']}, {rollout['progress']}"]
        if rollout["message"]:
            lines.append(f"  {rollout['message']}")
    events = status.get("events") or []
    if events:
        lines += ["", "Events (newest first):"]
        lines += [
            f"  {age(e['at'])} ago  {e['kind']:<11}  {e['node']:<6}  {e['message']}"
            for e in events[:EVENTS_SHOWN]
        ]
    return "\n".join(lines)
