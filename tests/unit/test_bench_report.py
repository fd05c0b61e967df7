"""bench/report.py: parsing the benchmarks' printed figures and writing the report, from
canned outputs (no VMs, no root)."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import report
from bench.report import BENCHMARKS, Result
from tests.conftest import require

NODE_STARTUP = """\
median of 3 runs, seconds from PUT (baseline: from first step)
  baseline (direct libvirt-python), 1 node  to Running:   0.290
  baseline (direct libvirt-python), 8 nodes to Running:   1.237
  agent, 1 node   to Running:   0.291   to Ready:   5.500
  agent, 8 nodes  to Running:   1.626   to Ready:  22.900
  agent/baseline to Running (1 node):  1.00  (target <= 1.10)
  agent/baseline to Running (8 nodes):  1.31
  8 nodes / 1 node to Running, agent:     5.59  (target < 3)
  8 nodes / 1 node to Running, baseline:  4.27  (what this machine allows)
"""

QEMU_OVERHEAD = """\
QEMU overhead (qemu): resident memory beyond the guest's RAM
  memory_mib    256: overhead   115 MiB
  memory_mib    512: overhead   116 MiB
  memory_mib   1024: overhead   115 MiB
  fit: 115 MiB + 0.2 MiB per GiB of guest memory
  max observed: 116 MiB
"""

PKI = """\

local CA (ecdsa, 3 sets per role)
  cold master set (creates the CAs): 184.1 ms
  worker set: median 19.2 ms, p90 23.0 ms, 52.2 sets/s sequential

Vault API: OpenBao dev server on loopback (ecdsa)
  cold master set (creates the CAs): 175.0 ms
  worker set: median 23.5 ms, p90 24.0 ms, 42.6 sets/s sequential
"""

NETWORK = """\
10 clusters x 2 peers x 1 MAC(s) per peer: 20 devices, 40 FDB entries; median of 1 runs
                                      wall s  requests
hostagent netlink, wire all            0.042       113
ip/bridge commands, wire all           0.245       110
baseline / hostagent, wire all: 5.8x
"""

BY_NAME = {b.name: b for b in BENCHMARKS}
MACHINE = {"cores": "2", "memory": "7.8 GiB", "kernel": "Linux 6.18", "domain type": "qemu"}


def result(
    name: str, stdout: str, code: int | None = 0, stderr: str = "", error: str = ""
) -> Result:
    return Result(BY_NAME[name], ("--quick-ish",), code, stdout, stderr, 12.0, error)


def test_every_benchmark_module_is_listed() -> None:
    modules = {p.stem for p in Path(report.__file__).parent.glob("*.py")}
    helpers = {"__init__", "report", "zone_profiled"}  # zone_profiled: zone_load --profile
    assert {b.name for b in BENCHMARKS} == modules - helpers


def test_parse_node_startup() -> None:
    assert report.parse_node_startup(NODE_STARTUP) == {
        "baseline_1_running": 0.290,
        "baseline_8_running": 1.237,
        "agent_1_running": 0.291,
        "agent_1_ready": 5.5,
        "agent_8_running": 1.626,
        "agent_8_ready": 22.9,
    }


def test_parse_node_startup_tolerates_garbage_and_partial_output() -> None:
    partial = "Traceback (most recent call last):\n  agent, 1 node   to Running:   0.5\n"
    assert report.parse_node_startup(partial) == {"agent_1_running": 0.5}
    assert report.parse_node_startup("") == {}


def test_parse_qemu_overhead() -> None:
    parsed = report.parse_qemu_overhead(QEMU_OVERHEAD)
    assert parsed.domain_type == "qemu"
    assert parsed.points == [(256, 115), (512, 116), (1024, 115)]
    assert parsed.fit == (115.0, 0.2)
    assert report.parse_qemu_overhead("nonsense").points == []


def test_parse_figures_names_sections() -> None:
    figures = dict(report.parse_figures(PKI))
    assert figures["local CA: cold master set (creates the CAs)"] == "184.1 ms"
    assert figures["Vault API: worker set"].startswith("median 23.5 ms")
    assert dict(report.parse_figures(NETWORK))["baseline / hostagent, wire all"] == "5.8x"


def test_report_with_a_failure(tmp_path: Path) -> None:
    results = [
        result("node_startup", NODE_STARTUP),
        result("qemu_overhead", QEMU_OVERHEAD),
        result("render", "", 1, "Traceback ...\nRuntimeError: libvirt is down\n"),
        result("pki", PKI),
        result("network", "partial\n", None, "", "timed out after 60 s"),
    ]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    path = report.write_report(tmp_path / "out", results, MACHINE, quick=True, now=now)
    text = path.read_text()
    assert path == tmp_path / "out" / "report.md"
    assert "Run 2026-11-24 12:00 UTC with `--quick`" in text
    assert "| cores | 2 |" in text and "| domain type | qemu |" in text
    assert "| [render](#render) | **failed**: exit 1 |" in text
    assert "RuntimeError: libvirt is down" in text
    assert "**failed**: timed out after 60 s" in text
    assert "| agent, 8 node(s) | 1.626 s | 22.900 s |" in text
    assert "agent/baseline to Running, 1 node(s): 1.00" in text
    assert "| overhead (MiB) | 115 | 116 | 115 |" in text
    assert "| local CA: worker set | median 19.2 ms" in text
    for section in ("node_startup", "qemu_overhead", "render", "pki", "network"):
        assert f"## {section}" in text


def test_report_plots(tmp_path: Path) -> None:
    require(importlib.util.find_spec("matplotlib") is not None, "needs matplotlib (bench extra)")
    results = [result("node_startup", NODE_STARTUP), result("qemu_overhead", QEMU_OVERHEAD)]
    report.write_report(tmp_path, results, MACHINE)
    for name in ("node_startup.png", "qemu_overhead.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (tmp_path / "report.md").read_text()


def test_no_plot_without_figures(tmp_path: Path) -> None:
    results = [result("node_startup", "", 1, "boom"), result("qemu_overhead", "", 1, "boom")]
    report.write_report(tmp_path, results, MACHINE)
    assert not list(tmp_path.glob("*.png"))


def test_run_captures_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = report.Benchmark("does_not_exist", "missing")
    got = report.run(bench, [], timeout_s=60)
    assert got.returncode not in (0, None)
    assert "No module named bench.does_not_exist" in got.stderr


def test_machine_info_keys() -> None:
    info = report.machine_info()
    assert {"cores", "memory", "kernel", "domain type"} <= info.keys()
