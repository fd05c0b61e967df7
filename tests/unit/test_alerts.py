"""The shipped alerting rules and Grafana dashboard (deploy/) against the metrics the code
really exports: the agent's and the zone's registries (hostagent/metrics.py) are rendered
into exposition text, once as a troubled host and zone and once as healthy ones; every
metric a rule or a panel names must be among them, and `promtool test rules` (Debian's
prometheus package) fires each alert on the troubled series and none on the healthy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hostagent.metrics import Metrics, ZoneMetrics
from hostagent.model import Phase
from hostagent.zoneclient import ZoneStatus
from hostagent.zonetls import CertificateStatus
from pki.renewal import NodeRenewalStatus
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "hostagent-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "hostagent-dashboard.json"
METRIC = re.compile(r"\bhostagent_[a-z0-9_]+\b")
# promtool's clock starts at the Unix epoch: expiries are set relative to it.
EPOCH = datetime.fromtimestamp(0, UTC)
MINUTES = 150  # series long enough for every `for:` and every [1h] window
EVAL_AT = "2h"


def render(troubled: bool) -> str:
    """The agent's and the zone's /metrics, as a troubled or a healthy host and zone."""
    expiry = EPOCH + timedelta(days=3 if troubled else 30)
    zone = ZoneStatus(
        url="https://zone:8471",
        registered=True,
        connected=not troubled,
        last_heartbeat=None,
        last_error="down" if troubled else None,
        failures=5 if troubled else 0,
        heartbeat_interval_s=5.0,
        certificate=CertificateStatus(Path("client.pem"), expiry, None, None),
    )
    agent = Metrics(
        lambda: {Phase.READY: 2, **({Phase.FAILED: 1} if troubled else {})},
        lambda: 0,
        lambda: {("c1", "m1"): NodeRenewalStatus(failures=4 if troubled else 0)},
        lambda: {("c1", "m1"): expiry},
        lambda: zone,
        kvm_unusable=lambda: troubled,
        unhealthy=lambda: (
            {("c1", "m1"): "crash-loop", ("c1", "w1"): "guest-not-reporting"} if troubled else {}
        ),
        images=lambda: {"Ready": 1, **({"Failed": 1} if troubled else {})},
        image_bytes=lambda: 1000,
        peers=lambda: {"10.0.0.2": not troubled},
    )
    agent.reconcile_seconds.observe(0.2)
    agent.libvirt_call_seconds.labels(call="define").observe(10 if troubled else 0.01)
    agent.phone_homes.labels(result="ok").inc()
    agent.image_pulled(True)
    agent.image_removed(10)
    if troubled:
        agent.loop_error("health")
        agent.reconcile_errors.inc()
    zone_metrics = ZoneMetrics(
        lambda: {"Ready": 2, "NotReady": 1 if troubled else 0},
        lambda: {"Ready": 1},
        lambda: 1 if troubled else 0,
        lambda: 10,
    )
    zone_metrics.leading = lambda: not troubled
    zone_metrics.leader_changes.inc()
    return agent.render().decode() + zone_metrics.render().decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


def exported() -> set[str]:
    return {name for troubled in (True, False) for name, _, _ in samples(render(troubled))}


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_rule_names_exported_metrics_only() -> None:
    names = exported()
    for rule in rules():
        used = set(METRIC.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used <= names, (rule["alert"], sorted(used - names))


def test_the_rules_cover_what_an_operator_must_hear_of() -> None:
    alerts = {rule["alert"] for rule in rules()}
    for wanted in (
        "HostagentHostNotReady",
        "HostagentNodeFailed",
        "HostagentNodeCrashLooping",
        "HostagentCertificateExpiresSoon",
        "HostagentCertificateRenewalFailing",
        "HostagentPeerUnreachable",
        "HostagentZoneLeaderChanges",
        "HostagentImagePullFailed",
    ):
        assert wanted in alerts


def test_the_dashboard_loads_and_graphs_exported_metrics_only() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    shown: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(METRIC.findall(target["expr"]))
            assert used and used <= names, (panel["title"], sorted(used - names))
            shown |= used
    # Every family the code exports has a panel (histograms by their buckets).
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}
    graphed = {re.sub(r"_(bucket|count|sum)$", "", name) for name in shown}
    assert not families - graphed, sorted(families - graphed)


def series(text: str, troubled: bool) -> list[dict[str, str]]:
    """promtool input series: gauges stay, counters (histogram parts too) grow by their
    value each minute when troubled and stay when healthy."""
    found = []
    for name, labels, value in samples(text):
        selector = ",".join(f'{key}="{val}"' for key, val in sorted(labels.items()))
        counter = name.endswith(("_total", "_bucket", "_count", "_sum"))
        values = f"0+{value:g}x{MINUTES}" if counter and troubled else f"{value:g}x{MINUTES}"
        found.append({"series": f"{name}{{{selector}}}", "values": values})
    return found


def firing(names: list[str]) -> dict[str, Any]:
    return {
        "expr": 'clamp_max(count by (alertname) (ALERTS{alertstate="firing"}), 1)',
        "eval_time": EVAL_AT,
        "exp_samples": [{"labels": f'{{alertname="{name}"}}', "value": 1} for name in names],
    }


def test_promtool_checks_the_rules() -> None:
    require(shutil.which("promtool") is not None, "needs promtool (Debian's prometheus)")
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("troubled", [True, False], ids=["troubled", "healthy"])
def test_each_alert_fires_on_the_real_metrics(tmp_path: Path, troubled: bool) -> None:
    require(shutil.which("promtool") is not None, "needs promtool (Debian's prometheus)")
    alerts = sorted(rule["alert"] for rule in rules())
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series(render(troubled), troubled),
                "promql_expr_test": [firing(alerts if troubled else [])],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
