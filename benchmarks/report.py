"""The markdown report of a benchmark run: the tables, the data-arrival checks, the machine.

:func:`render` turns the JSON results of :mod:`benchmarks.publish_overhead` and
:mod:`benchmarks.drain_throughput` into markdown; :func:`environment` describes the machine
and the versions; :func:`default_out_path` is ``benchmarks/results/<YYYY-MM-DD>-<hostname>.md``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "default_out_path", "environment", "loadavg", "render"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_PASSED = "All data-arrival checks passed."


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"


def default_out_path(today: _dt.date | None = None) -> Path:
    """``benchmarks/results/<YYYY-MM-DD>-<hostname>.md``."""
    day = (today or _dt.date.today()).isoformat()
    return RESULTS_DIR / f"{day}-{_hostname()}.md"


def _version(dist: str, module: str | None = None) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = __import__(module or dist)
        return str(getattr(mod, "__version__", "?"))
    except ImportError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> str:
    """The system's 1/5/15-minute load averages (other processes skew the numbers)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def environment(load_at_start: str | None = None) -> dict[str, str]:
    """Versions and machine facts for the report (``load_at_start``: see :func:`loadavg`)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "expbus": f"{_version('expbus')} (git {_git_describe()})",
        "msgspec": _version("msgspec"),
        "anyio": _version("anyio"),
        "platform": platform.platform(),
        "CPU count": f"{os.cpu_count()} (usable by this process: {affinity})",
        "CPU model": _cpu_model(),
        "GIL switch interval": f"{sys.getswitchinterval() * 1000:g} ms",
        "load average (1/5/15 min) before the run": load_at_start or "not recorded",
        "load average (1/5/15 min) after the run": loadavg(),
    }


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _publish_section(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = {row["key"]: row for row in res["rows"]}
    out = [
        "## Publish overhead (the training thread's cost per call)",
        "",
        f"{p['rounds']} interleaved rounds x {p['calls']:,} calls per variant, order rotated every round; "
        "a real open bus (journal + jsonl sink in a temp dir) drains what the publish rounds put in "
        "while the rounds run. ns per call: median / mean / p99 over the per-round values; "
        "net = median minus the empty loop; ratio = median of per-round (paired) ratios. "
        "See `benchmarks/publish_overhead.py` for how to read them.",
        "",
        "| operation | median ns | mean ns | p99 ns | net ns | ratio |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in res["rows"]:
        ratio = "-"
        if row["ratio"] is not None:
            base = "`dq.append(ev)`" if row["key"] == "bus_publish" else "pre-bound `append(ev)`"
            ratio = f"{row['ratio']:.2f}x {base}"
        out.append(
            f"| {row['label']} | {_f(row['median_ns'])} | {_f(row['mean_ns'])} | {_f(row['p99_ns'])} "
            f"| {_f(row['net_median_ns'])} | {ratio} |"
        )
    bp, da = rows["bus_publish"], rows["deque_append"]
    out += [
        "",
        f"**`bus.publish(ev)` vs `dq.append(ev)`: {bp['median_ns']:.1f} ns vs {da['median_ns']:.1f} ns, "
        f"ratio {bp['ratio']:.2f}x** (median of per-round ratios; ratio of medians "
        f"{bp['ratio_of_medians']:.2f}x; net of the loop {bp['net_median_ns']:.1f} vs {da['net_median_ns']:.1f} ns).",
        "",
        f"{res['published']:,} events were published to the bus; the timed rounds took "
        f"{res['timed_rounds_s']:.2f} s and the bus needed {res['drain_after_rounds_s']:.2f} s more "
        "to journal and write the backlog (`flush()`).",
        "",
    ]
    return out


def _drain_section(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    out = [
        "## Drain throughput (first publish until `flush()` returns True)",
        "",
        f"Pre-built `Metrics` events with K float values, published in a tight loop on a fresh bus; "
        f"median of {p['repeats']} run(s) per case; sinks under `when_full=\"block\"` (lossless). "
        "See `benchmarks/drain_throughput.py` for how to read them.",
        "",
        "| setup | K | events | events/s | values/s | events/s min-max | publish ns/ev | s per run |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in res["rows"]:
        out.append(
            f"| {row['label']} | {row['k']} | {row['events']:,} | {_f(row['events_per_s'], 0)} "
            f"| {_f(row['values_per_s'], 0)} | {_f(row['events_per_s_min'], 0)} - {_f(row['events_per_s_max'], 0)} "
            f"| {_f(row['publish_ns_per_event'])} | {row['seconds']:.3f} |"
        )
    b = res["burst"]
    out += [
        "",
        "### A burst under the default sink policy",
        "",
        f"The same publish loop, K=1, under the default policy ({b['policy']}): a burst larger "
        "than the sink's queue is partly dropped by design (and counted); the journal keeps everything.",
        "",
        "| setup | events | sink delivered | sink dropped | journal records | events/s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {b['label']} | {b['events']:,} | {b['delivered']:,} | {b['dropped']:,} | {b['journal_records']:,} "
        f"| {_f(b['events_per_s'], 0)} |",
        "",
    ]
    return out


def _checks_section(results: dict[str, dict[str, Any] | None], errors: dict[str, str]) -> list[str]:
    out = ["## Data-arrival checks", "", "| benchmark | checks | passed | failed |", "|---|---:|---:|---:|"]
    failed: list[str] = []
    for name, res in results.items():
        if res is None:
            out.append(f"| {name} | - | - | did not finish |")
            failed.append(f"{name}: did not finish: {errors.get(name, '?')}")
            continue
        items = res["checks"]
        bad = [item for item in items if not item["ok"]]
        out.append(f"| {name} | {len(items)} | {len(items) - len(bad)} | {len(bad)} |")
        failed += [f"{name}: {item['name']}: {item['detail']}" for item in bad]
    out.append("")
    if failed:
        out.append("**FAILED: published data did not all arrive (numbers above are not valid):**")
        out.append("")
        out += [f"- {line}" for line in failed]
    else:
        out.append(f"{ALL_PASSED} (jsonl lines, journal records and sink counters read back after `flush()`.)")
    out.append("")
    return out


def render(
    results: dict[str, dict[str, Any] | None],
    env: dict[str, str],
    command: str,
    errors: dict[str, str] | None = None,
) -> str:
    """The whole report as markdown."""
    errors = errors or {}
    ok = all(res is not None and res["ok"] for res in results.values())
    out = [
        f"# expbus benchmarks: {env['date'][:10]}, {env['host']}",
        "",
        f"Command: `{command}`. Status: " + ("all data-arrival checks passed." if ok else "**FAILED**."),
        "Times are measured on this machine only; they are never asserted by the tests.",
        "",
    ]
    if results.get("publish_overhead") is not None:
        out += _publish_section(results["publish_overhead"])  # type: ignore[arg-type]
    if results.get("drain_throughput") is not None:
        out += _drain_section(results["drain_throughput"])  # type: ignore[arg-type]
    out += _checks_section(results, errors)
    out += ["## Environment", "", "| | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in env.items()]
    out.append("")
    return "\n".join(out)
