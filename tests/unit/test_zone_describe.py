"""`hostagent cluster describe` output and how the CLI finds the zone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostagent.zone import client as zone_client
from hostagent.zone.client import ZoneContext, resolve_context
from hostagent.zone.describe import describe


def node(name: str, role: str, host: str, phase: str, message: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "host": host,
        "address": f"10.128.0.{10 + int(name[1:])}",
        "phase": phase,
        "message": message,
        "updated_at": "u",
        "created_at": f"c-{name}",
    }


CLUSTER = {
    "name": "demo",
    "status": {
        "phase": "Degraded",
        "message": "w1 on h3: Unknown (host h3 is not reporting)",
        "vni": 4096,
        "node_subnet": "10.128.0.0/24",
        "created_at": "c-cluster",
        "nodes": [
            node("m1", "master", "h1", "Ready"),
            node("m2", "master", "h2", "Ready"),
            node("w1", "worker", "h3", "Unknown", "host h3 is not reporting"),
        ],
    },
}


def test_describe_draws_the_tree() -> None:
    text = describe(CLUSTER, lambda stamp: stamp.removeprefix("c-"))
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "HOST", "PHASE", "AGE", "ADDRESS", "MESSAGE"]
    assert lines[1].split()[:3] == ["Cluster/demo", "Degraded", "cluster"]
    assert "w1 on h3: Unknown" in lines[1]
    assert lines[2].startswith("├─ControlPlane") and "2/2 Ready" in lines[2]
    assert lines[3].split() == ["│", "├─m1", "h1", "Ready", "m1", "10.128.0.11"]
    assert lines[4].split()[:3] == ["│", "└─m2", "h2"]
    assert lines[5].startswith("└─Workers") and "0/1 Ready" in lines[5]
    assert lines[6].split()[:4] == ["└─w1", "h3", "Unknown", "w1"]
    assert lines[6].endswith("host h3 is not reporting")


def test_describe_without_workers_ends_the_tree_at_the_control_plane() -> None:
    masters_only = json.loads(json.dumps(CLUSTER))
    masters_only["status"]["nodes"] = masters_only["status"]["nodes"][:2]
    lines = describe(masters_only, lambda stamp: "1s").splitlines()
    assert lines[2].startswith("└─ControlPlane")
    assert lines[3].startswith("   ├─m1")


def test_context_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zone_client, "LAB_CONTEXT", tmp_path / "absent.json")
    saved = tmp_path / "ctx.json"
    ZoneContext("https://10.0.0.1:8471", "file-token", "/ca.pem").save(saved)
    assert saved.stat().st_mode & 0o777 == 0o600
    from_file = resolve_context(None, None, saved, {})
    assert from_file == ZoneContext("https://10.0.0.1:8471", "file-token", "/ca.pem")
    env = {"HOSTAGENT_ZONE_TOKEN": "env-token"}
    assert resolve_context(None, None, saved, env).token == "env-token"
    assert resolve_context("http://127.0.0.1:9", "flag", saved, env).url == "http://127.0.0.1:9"
    assert resolve_context("http://127.0.0.1:9", "flag", None, {}).token == "flag"


def test_no_token_anywhere_says_where_to_put_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zone_client, "LAB_CONTEXT", tmp_path / "absent.json")
    monkeypatch.setattr(zone_client, "DEFAULT_TOKEN_FILE", tmp_path / "absent-token")
    with pytest.raises(SystemExit, match="--zone-token"):
        resolve_context(None, None, None, {})


def test_describe_shows_the_rollout_and_the_latest_events_first() -> None:
    upgrading = {
        **CLUSTER,
        "status": {
            **CLUSTER["status"],
            "phase": "Upgrading",
            "message": "1/3 nodes at 1.31.2; waiting for master m2 to become Ready",
            "rollout": {
                "state": "Rolling",
                "progress": "1/3 nodes at 1.31.2",
                "message": "waiting for master m2 to become Ready",
            },
            "events": [
                {
                    "at": "c-2",
                    "kind": "remediation",
                    "node": "w1",
                    "role": "worker",
                    "message": "replacing worker w1 by w2: crash-loop",
                },
                {
                    "at": "c-1",
                    "kind": "drain",
                    "node": "w1",
                    "role": "worker",
                    "message": "drain hook answered 200 in 0.1 s",
                },
            ],
        },
    }
    lines = describe(upgrading, lambda stamp: stamp.removeprefix("c-")).splitlines()
    at = lines.index("Rollout: Rolling, 1/3 nodes at 1.31.2")
    assert lines[at + 1] == "  waiting for master m2 to become Ready"
    events = lines[lines.index("Events (newest first):") + 1 :]
    assert events[0].split()[:4] == ["2", "ago", "remediation", "w1"]
    assert events[1].endswith("drain hook answered 200 in 0.1 s")
