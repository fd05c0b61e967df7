"""Run every benchmark under bench/ and write a report: OUTDIR/report.md plus PNG plots.

Each benchmark runs as its own subprocess (`python -m bench.<name>`); its printed figures
are captured, parsed where a plot or table needs them, and shown verbatim. A benchmark
that fails is reported with the end of its stderr; the others still run.
Run as root with libvirtd up:  .venv/bin/python -m bench.report OUTDIR [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Benchmark:
    name: str  # module bench.<name>
    title: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    needs_root: bool = True


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("node_startup", "Node start-up: agent vs. direct libvirt", (), ("--repeat", "1")),
    Benchmark("qemu_overhead", "QEMU memory overhead per VM", (), ("--sizes", "256,1024")),
    Benchmark("render", "Cloud-config rendering and config drive", (), ("--rounds", "1"), False),
    Benchmark("pki", "Certificate sets: local CA and Vault API", (), ("--repeat", "3"), False),
    Benchmark(
        "network",
        "Cluster network wiring: netlink vs. ip/bridge",
        (),
        ("--clusters", "20", "--peers", "3", "--repeat", "1"),
    ),
    Benchmark("placement", "Zone placement: nodes over 1000 hosts", (), ("--repeat", "3"), False),
    Benchmark("store_writes", "Store commits and the event loop", (), ("--writes", "20"), False),
    Benchmark(
        "zone_pass", "Zone delivery round over 250-2000 hosts", (), ("--hosts", "250,500"), False
    ),
    Benchmark(
        "zone_load",
        "Zone heartbeats: 1000 hosts on SQLite and on 3 replicas over etcd",
        (),
        ("--hosts", "200", "--seconds", "10"),
        False,
    ),
)


@dataclass
class Result:
    bench: Benchmark
    args: tuple[str, ...]
    returncode: int | None  # None: timed out or could not start
    stdout: str
    stderr: str
    seconds: float
    error: str = ""  # why it did not finish, when returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(bench: Benchmark, args: Sequence[str], timeout_s: float) -> Result:
    command = [sys.executable, "-m", f"bench.{bench.name}", *args]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return Result(bench, tuple(args), None, _text(exc.stdout), _text(exc.stderr),
                      time.monotonic() - started, f"timed out after {timeout_s:.0f} s")  # fmt: skip
    except OSError as exc:
        return Result(bench, tuple(args), None, "", "", 0.0, f"could not start: {exc}")
    seconds = time.monotonic() - started
    return Result(bench, tuple(args), proc.returncode, proc.stdout, proc.stderr, seconds)


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


# --- parsing the printed figures --------------------------------------------------------

_NUM = r"([-+]?\d+(?:\.\d+)?)"


def parse_node_startup(out: str) -> dict[str, float]:
    """Keys baseline_{1,8}_running, agent_{1,8}_{running,ready}; missing lines are left out."""
    figures: dict[str, float] = {}
    for line in out.splitlines():
        m = re.search(rf"baseline\b.*?\b(\d+) nodes? +to Running: *{_NUM}", line)
        if m:
            figures[f"baseline_{m[1]}_running"] = float(m[2])
            continue
        m = re.search(
            rf"^\s*agent, (\d+) nodes? +to Running: *{_NUM}(?:.*to Ready: *{_NUM})?", line
        )
        if m:
            figures[f"agent_{m[1]}_running"] = float(m[2])
            if m[3] is not None:
                figures[f"agent_{m[1]}_ready"] = float(m[3])
    return figures


@dataclass
class Overhead:
    domain_type: str = ""
    points: list[tuple[int, int]] = field(default_factory=list)  # (memory_mib, overhead_mib)
    fit: tuple[float, float] | None = None  # (base MiB, MiB per GiB)


def parse_qemu_overhead(out: str) -> Overhead:
    result = Overhead()
    for line in out.splitlines():
        if m := re.search(r"QEMU overhead \((\w+)\)", line):
            result.domain_type = m[1]
        elif m := re.search(r"memory_mib\s+(\d+): overhead\s+(-?\d+) MiB", line):
            result.points.append((int(m[1]), int(m[2])))
        elif m := re.search(rf"fit: {_NUM} MiB \+ {_NUM} MiB per GiB", line):
            result.fit = (float(m[1]), float(m[2]))
    return result


def parse_figures(out: str) -> list[tuple[str, str]]:
    """Generic `label: value` lines that carry a number: the headline figures of any
    benchmark, whatever its layout (tables stay in the verbatim output)."""
    figures = []
    section = ""
    for line in out.splitlines():
        label, sep, value = line.strip().partition(": ")
        if not line.strip():
            continue
        if not line[0].isspace() and not (sep and re.search(r"\d", value)):
            section = line.strip()  # an unindented heading names the indented lines below
            continue
        if sep and label and re.search(r"\d", value) and len(label) <= 80:
            if line[0].isspace() and section:
                label = f"{section.split(':')[0].split(' (')[0]}: {label}"
            figures.append((label, value.strip()))
    return figures


# --- machine -----------------------------------------------------------------------------


def machine_info(results: Sequence[Result] = ()) -> dict[str, str]:
    info = {
        "host": platform.node(),
        "cores": str(os.cpu_count() or "?"),
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "domain type": _domain_type(results),
    }
    cpu = _cpu_model()
    if cpu:
        info["cpu"] = cpu
    return info


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def _domain_type(results: Sequence[Result]) -> str:
    kvm = "/dev/kvm present" if Path("/dev/kvm").exists() else "no /dev/kvm"
    for result in results:
        if result.bench.name == "qemu_overhead":
            measured = parse_qemu_overhead(result.stdout).domain_type
            if measured:
                return f"{measured} (benchmark VMs; {kvm})"
    return f"qemu (TCG, the benchmarks' default; {kvm})"


# --- plots -------------------------------------------------------------------------------


def plot_node_startup(figures: dict[str, float], path: Path) -> bool:
    groups = [("1 node", "1"), ("8 nodes", "8")]
    series = [
        ("baseline to Running", "baseline_{}_running"),
        ("agent to Running", "agent_{}_running"),
        ("agent to Ready", "agent_{}_ready"),
    ]
    if not any(key.format(n) in figures for _, n in groups for _, key in series):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, (label, key) in enumerate(series):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        ys = [figures.get(key.format(n), 0.0) for _, n in groups]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel("seconds from PUT (median)")
    ax.set_title("Node start-up: agent vs. direct libvirt-python")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_qemu_overhead(overhead: Overhead, path: Path) -> bool:
    if not overhead.points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [m for m, _ in overhead.points]
    ax.plot(xs, [o for _, o in overhead.points], "o-", label="measured")
    if overhead.fit:
        base, per_gib = overhead.fit
        ax.plot(xs, [base + per_gib * m / 1024 for m in xs], "--",
                label=f"fit: {base:.0f} MiB + {per_gib:.1f} MiB/GiB")  # fmt: skip
    ax.plot(xs, [192 + 16 * -(-m // 1024) for m in xs], ":",
            label="default allowance (192 + 16/GiB)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("guest memory_mib")
    ax.set_ylabel("QEMU RSS beyond guest RAM (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"QEMU overhead per VM ({overhead.domain_type or '?'})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- the report --------------------------------------------------------------------------


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def write_report(
    outdir: Path,
    results: Sequence[Result],
    machine: dict[str, str],
    *,
    quick: bool = False,
    now: datetime | None = None,
) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    now = now or datetime.now(UTC)
    plots: dict[str, str] = {}
    plot_errors: list[str] = []
    for result in results:
        try:
            if result.bench.name == "node_startup":
                name = "node_startup.png"
                if plot_node_startup(parse_node_startup(result.stdout), outdir / name):
                    plots["node_startup"] = name
            elif result.bench.name == "qemu_overhead":
                name = "qemu_overhead.png"
                if plot_qemu_overhead(parse_qemu_overhead(result.stdout), outdir / name):
                    plots["qemu_overhead"] = name
        except ImportError as exc:
            plot_errors.append(f"plots skipped: {exc} (pip install the test extras)")
            break
        except Exception as exc:  # a plot must not cost the report
            plot_errors.append(f"{result.bench.name} plot failed: {exc!r}")

    lines = [
        "# hostagent benchmarks",
        "",
        f"Run {now:%Y-%m-%d %H:%M} UTC"
        + (" with `--quick` (small repeat counts)" if quick else ""),
        "by `python -m bench.report`.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in machine.items()),
        "",
        "| benchmark | result | time | arguments |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        status = "ok" if r.ok else ("**failed**: " + (r.error or f"exit {r.returncode}"))
        args = " ".join(r.args) or "(defaults)"
        lines.append(f"| [{r.bench.name}](#{r.bench.name}) | {status} | {r.seconds:.0f} s "
                     f"| `{args}` |")  # fmt: skip
    lines += ["", *(f"- {e}" for e in plot_errors)] if plot_errors else []
    for r in results:
        lines += ["", f"## {r.bench.name}", "", f"{r.bench.title}: `python -m bench.{r.bench.name}"
                  + "".join(f" {a}" for a in r.args) + "`", ""]  # fmt: skip
        if not r.ok:
            why = r.error or f"exited with status {r.returncode}"
            lines += [f"**Failed**: {why}. Last lines of its stderr:", "", "```",
                      tail(r.stderr) or "(empty)", "```", ""]  # fmt: skip
        if r.bench.name == "node_startup":
            lines += _node_startup_table(parse_node_startup(r.stdout))
        elif r.bench.name == "qemu_overhead":
            lines += _overhead_table(parse_qemu_overhead(r.stdout))
        figures = parse_figures(r.stdout)
        if figures and r.bench.name not in ("node_startup", "qemu_overhead"):
            lines += ["| figure | value |", "| --- | --- |"]
            lines += [f"| {label} | {value} |" for label, value in figures]
            lines.append("")
        if r.bench.name in plots:
            lines += [f"![{r.bench.name}]({plots[r.bench.name]})", ""]
        if r.stdout.strip():
            lines += ["Printed:", "", "```", r.stdout.rstrip(), "```"]
    report = outdir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report


def _node_startup_table(f: dict[str, float]) -> list[str]:
    if not f:
        return []

    def cell(key: str) -> str:
        return f"{f[key]:.3f} s" if key in f else ""

    rows = ["| | to Running | to Ready |", "| --- | --- | --- |"]
    for n in ("1", "8"):
        rows.append(f"| baseline, {n} node(s) | {cell(f'baseline_{n}_running')} | |")
        rows.append(f"| agent, {n} node(s) | {cell(f'agent_{n}_running')} "
                    f"| {cell(f'agent_{n}_ready')} |")  # fmt: skip
    ratio = [
        f"- agent/baseline to Running, {n} node(s): {f[f'agent_{n}_running'] / b:.2f}"
        for n in ("1", "8")
        if f"agent_{n}_running" in f and (b := f.get(f"baseline_{n}_running", 0.0)) > 0
    ]
    return [*rows, "", *ratio, ""] if ratio else [*rows, ""]


def _overhead_table(o: Overhead) -> list[str]:
    if not o.points:
        return []
    rows = [
        "| memory_mib | " + " | ".join(str(m) for m, _ in o.points) + " |",
        "| --- |" + " --- |" * len(o.points),
        "| overhead (MiB) | " + " | ".join(str(v) for _, v in o.points) + " |",
        "",
    ]
    if o.fit:
        rows += [f"Fit: {o.fit[0]:.0f} MiB + {o.fit[1]:.1f} MiB per GiB "
                 "(defaults: 192 MiB + 16 MiB per GiB).", ""]  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path, help="folder for report.md and the plots")
    parser.add_argument("--quick", action="store_true", help="small repeat counts (minutes)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    args = parser.parse_args(argv)
    wanted = [b for b in BENCHMARKS if not args.only or b.name in args.only.split(",")]
    if args.only and len(wanted) != len(args.only.split(",")):
        parser.error(f"--only: known benchmarks are {', '.join(b.name for b in BENCHMARKS)}")
    results = []
    for bench in wanted:
        bench_args = bench.quick_args if args.quick else bench.args
        print(f"bench.report: running {bench.name} {' '.join(bench_args)}", flush=True)
        if bench.needs_root and os.geteuid() != 0:
            result = Result(bench, bench_args, None, "", "", 0.0, "needs root (and libvirtd)")
        else:
            result = run(bench, bench_args, args.timeout)
        print(f"bench.report: {bench.name}: "
              f"{'ok' if result.ok else 'FAILED ' + (result.error or str(result.returncode))}"
              f" ({result.seconds:.0f} s)", flush=True)  # fmt: skip
        results.append(result)
    report = write_report(args.outdir, results, machine_info(results), quick=args.quick)
    print(f"bench.report: wrote {report}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
