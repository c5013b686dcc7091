"""The markdown report of a benchmark run: the tables, the data-arrival checks, the machine.

:func:`render` turns the JSON results of every benchmark (:mod:`benchmarks.step_overhead`,
:mod:`benchmarks.publish_overhead`, :mod:`benchmarks.drain_throughput`,
:mod:`benchmarks.memory_growth`, :mod:`benchmarks.import_time`) into markdown, with the
summary of :mod:`benchmarks.summary` first; :func:`environment` describes the machine
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

from benchmarks.summary import summary_lines

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


def environment(load_at_start: str | None = None, load_during: list[str] | None = None) -> dict[str, str]:
    """Versions and machine facts for the report (``load_at_start``: see :func:`loadavg`;
    ``load_during``: the 1-minute load average sampled after each benchmark)."""
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
        "torch": _version("torch"),
        "lightning": _version("lightning"),
        "tensorboard": _version("tensorboard"),
        "mlflow": _version("mlflow"),
        "wandb": _version("wandb"),
        "platform": platform.platform(),
        "CPU count": f"{os.cpu_count()} (usable by this process: {affinity})",
        "CPU model": _cpu_model(),
        "GIL switch interval": f"{sys.getswitchinterval() * 1000:g} ms",
        "load average (1/5/15 min) before the run": load_at_start or "not recorded",
        "load average (1 min) after each benchmark": ", ".join(load_during) if load_during else "not recorded",
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
        f"median of {p['repeats']} run(s) per case ({p.get('sink_repeats', p['repeats'])} for the backend sinks, "
        "which get fewer events); sinks under `when_full=\"block\"` (lossless). "
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


def _step_section(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    rows = res["rows"]
    seconds = p.get("cell_seconds", 0.0)
    if seconds:
        warmups = ", ".join(f"{key.replace(':', ' K=')}: {w}" for key, (w, _n) in p["steps"].items())
        steps = (f"each cell trains for {seconds:g} s after its warm-up steps ({warmups}), three times the default "
                 "`batch_delay` (2 s), so that every sink writes several batches during training in every "
                 "configuration")
    else:
        steps = ", ".join(f"{key.replace(':', ' K=')}: {w} warm-up + {n} measured"
                          for key, (w, n) in p["steps"].items())
    out = [
        "## Step overhead (what logging costs the training step)",
        "",
        f"Real `Trainer.fit` runs on CPU with `torch.set_num_threads(1)` (the other core is left to logging "
        f"threads and background processes). Workload (a): a {p['matmul_n']}x{p['matmul_n']} `torch.mm` "
        f"({p['matmul_ms']:.2f} ms on one thread, GIL released, as a device step) plus the tiny step; workload "
        "(b): `Linear(32, 32)` on a batch of 8 (Python-bound). K metrics logged every step with `self.log` "
        f"(`log_every_n_steps=1`). Steps per run: {steps}. "
        f"{', '.join(p['core_configs'])} run {p['repeats']} time(s), "
        f"the per-backend configurations {p['single_repeats']}, each "
        "in a fresh process forked from one that has imported only torch and Lightning, in alternating order. "
        "A step is the interval between two `on_train_batch_start` calls (it includes the logger connector's "
        "work after `on_train_batch_end`). Statistics pool the steps of all repeats. Overheads are against "
        "`none` (logger=False, no callbacks; the module still calls `self.log`). *Other threads* is the CPU "
        "time per step of every thread but the training thread (bus and sink threads, TensorBoard's writer, "
        "wandb's threads): the part of it that runs Python holds the GIL the training thread needs (C code "
        "that releases the GIL, such as sqlite's, runs on the other core). The mean overhead keeps the periodic "
        "stalls (a sink writing a batch every `batch_delay`) that the median hides. *Training thread waiting* "
        "is its wall time minus its CPU time during training, per step: time it waited for the GIL (or for a "
        "core, when another process ran). *Close* is "
        "`on_train_end` until `fit` returns (plus `wandb.finish()` for Lightning's `WandbLogger`, which leaves "
        "its run open). See `benchmarks/step_overhead.py`.",
        "",
    ]
    base = [r for r in rows if r["config"] == "none"]
    if base and len(base[0]["repeat_medians"]) > 1:
        spread = ", ".join(
            f"{r['workload']} K={r['k']}: {min(r['repeat_medians']):,.0f}-{max(r['repeat_medians']):,.0f} µs"
            for r in base
        )
        out += [f"Noise floor: `none` ran {len(base[0]['repeat_medians'])} times (at the start of each repeat and "
                f"after every few configurations; its steps are pooled); the medians of its runs ranged {spread}.",
                ""]
    out += [
        "| configuration | workload | K | median µs | p99 µs | overhead µs | overhead | mean overhead µs "
        "| p99 overhead µs | vs Lightning | close ms | other threads CPU µs/step | training thread waiting µs/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = r.get("fraction_of_peer")
        vs = f"{100 * frac:.1f}%" if frac is not None else "-"
        out.append(
            f"| {r['label']} | {r['workload']} | {r['k']} | {_f(r['median'], 0)} | {_f(r['p99'], 0)} "
            f"| {_f(r.get('overhead_us'), 0)} | {_f(r.get('overhead_pct'))}% | {_f(r.get('mean_overhead_us'), 0)} "
            f"| {_f(r.get('p99_overhead_us'), 0)} | {vs} | {_f(r['close_ms'])} | {_f(r['bg_cpu_us_per_step'], 0)} "
            f"| {_f(r.get('main_wait_us_per_step'), 0)} |"
        )
    pairs = [r for r in rows if r.get("peer")]
    if pairs:
        out += [
            "",
            "### expbus against Lightning's loggers, same backends",
            "",
            "| backends | workload | K | Lightning overhead µs | expbus overhead µs | expbus / Lightning "
            "| mean overhead µs (Lightning / expbus) | close ms (Lightning / expbus) |",
            "|---|---|---:|---:|---:|---:|---|---|",
        ]
        by_key = {(r["config"], r["workload"], r["k"]): r for r in rows}
        for r in pairs:
            peer = by_key[(r["peer"], r["workload"], r["k"])]
            frac = r.get("fraction_of_peer")
            backends = r["config"].split(":", 1)[1]
            fraction = f"{100 * frac:.1f}%" if frac is not None else "-"
            out.append(
                f"| {backends} | {r['workload']} | {r['k']} | {_f(peer['overhead_us'], 0)} | {_f(r['overhead_us'], 0)} "
                f"| {fraction} | {_f(peer['mean_overhead_us'], 0)} / {_f(r['mean_overhead_us'], 0)} "
                f"| {_f(peer['close_ms'])} / {_f(r['close_ms'])} |"
            )
    shown = ("L:all", "E:all", "E:all:thread", "E:all:process", "E:journal")
    threads = [r for r in rows if r["config"] in shown and r["bg_threads"]]
    if threads:
        out += [
            "",
            "### CPU of the other threads, by thread (µs per step), and of child processes",
            "",
            "*Child processes* is the CPU of the child processes that exited during the run (median per run, start-up "
            "and imports included): expbus's sink workers under `workers: process` (the work they take off the "
            "training process still needs a core), and wandb-core when it exits before `fit` returns.",
            "",
            "| configuration | workload | K | threads | child processes ms per run |",
            "|---|---|---:|---|---:|",
        ]
        for r in threads:
            parts = ", ".join(f"{name} {us:,.0f}" for name, us in r["bg_threads"].items() if us >= 0.5)
            children = r.get("children_cpu_s")
            cell = f"{1000 * children:,.0f}" if children is not None else "-"
            out.append(f"| {r['label']} | {r['workload']} | {r['k']} | {parts or '-'} | {cell} |")
    out.append("")
    return out


def _held_text(p: dict[str, Any]) -> str:
    """The events a stalled sink may hold, in words (results before the batch counted: the queue only)."""
    if "held_events" not in p:
        return f"its queue of {p['queue_size']:,} events"
    return (f"{p['queue_size']:,} queued events plus one `batch_size` batch of {p['batch_size']:,} inside the hung "
            f"`write` ({p['held_events']:,} events)")


def _memory_section(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    requested = p.get("requested_bytes_per_event")
    requested_text = (f" (the bytes requested: {requested:.0f}, {p['requested_bound_mb']:.1f} MB)"
                      if requested is not None else "")
    out = [
        "## Memory with a stalled sink (peak RSS growth)",
        "",
        f"{p['events']:,} `Metrics` events (K={p['k']}, a new values dict each, as the bridge publishes) into a bus "
        f"whose only sink hangs in `write`, under the default policy with `queue_size={p['queue_size']:,}`; the "
        f"bound is what that policy lets the sink hold, {_held_text(p)}, times the {p['bytes_per_event']:.0f} bytes "
        f"one queued event holds{requested_text}: "
        "tracemalloc over events kept in a deque, the deque slot included, each block counted as the allocator "
        "hands it out (pymalloc's 16-byte size classes; glibc's header above 512 bytes); not included: pool "
        "headers. "
        "Peak RSS (`VmHWM`) against the RSS before the first publish, each run in a fresh process. `paced`: "
        "250 events then a 1 ms sleep (the bus keeps up); `burst`: one tight loop (the publisher outruns the "
        "bus thread and the ingress, which has no bound, grows too). *At fill*: RSS growth when the queue had "
        "just filled (paced only). *Healthy sink*: the same run with a sink whose `write` returns at once (what "
        "the bus costs at that rate whatever the sink); *the stall's own cost* is the stalled run's growth minus "
        "it. Events beyond the queue spill to the journal (counted, not dropped) and reach the sink once it is "
        "released. See `benchmarks/memory_growth.py`.",
        "",
        "| publishing | events | queue_size | bound MB | RSS growth at fill MB | peak RSS growth MB | growth / bound "
        "| healthy sink: peak RSS growth MB | the stall's own cost MB | cost / bound "
        "| spilled (dropped) while stalled | delivered after release |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    controls = []
    for r in res["rows"]:
        fill = r.get("growth_at_fill_mb")
        control = r.get("control")
        cost = r.get("stall_cost_mb")
        control_cell = f"{control['growth_mb']:.1f}" if control else "-"
        cost_cells = f"{cost:.1f} | {r['stall_cost_vs_bound']:.2f}x" if cost is not None else "- | -"
        out.append(
            f"| {r['mode']} | {r['events']:,} | {r['queue_size']:,} | {r['bound_mb']:.1f} "
            f"| {f'{fill:.1f}' if fill is not None else '-'} | {r['growth_mb']:.1f} "
            f"| {r['growth_vs_bound']:.2f}x | {control_cell} | {cost_cells} "
            f"| {r.get('spilled_while_stalled', 0):,} ({r['dropped_while_stalled']:,}) "
            f"| {r['delivered_after_release']:,} |"
        )
        if control:
            controls.append((r["mode"], control))
    out.append("")
    if controls:
        out += [
            "The healthy-sink control runs (every event delivered before the close; *spilled*: events read back "
            "from the journal because the queue was full when they were fanned out, as a burst can do):",
            "",
            "| publishing | RSS growth at fill MB | peak RSS growth MB | spilled (dropped) before the close "
            "| delivered | publish s | until all taken s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for mode, c in controls:
            fill = c.get("growth_at_fill_mb")
            out.append(
                f"| {mode}, healthy sink | {f'{fill:.1f}' if fill is not None else '-'} | {c['growth_mb']:.1f} "
                f"| {c['spilled_while_stalled']:,} ({c['dropped_while_stalled']:,}) "
                f"| {c['delivered_after_release']:,} | {c['publish_s']:.1f} | {c['drain_s']:.1f} |"
            )
        out.append("")
    return out


def _pairs_section(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    out = [
        "## Workload (a) in pairs (the measurement behind target (a))",
        "",
        f"{p['pairs']} pairs of runs, each a `none` run and an `{p['config']}` run back to back (the order alternates; "
        "every run a fresh process forked like the main benchmark's, same cell length and data-arrival checks). The "
        "overhead is taken within each pair, `median(expbus steps) / median(none steps) - 1`, so that the "
        "machine's drift from run to run (the `none` medians' range below) cancels; the figure is the median "
        "over pairs with a distribution-free 95% confidence interval (order statistics). *Wait*: the training "
        "thread's wall time minus its CPU time over training, per step (waiting for the GIL or a core), and the "
        "same for the median step alone (the hand-offs land on a few steps). *Training thread CPU*: "
        "the median per step of the training thread's own CPU clock, and the paired difference as a share of "
        "the step (the thread running longer: the bridge's own work, or a slower interpreter). See "
        "`benchmarks/step_pairs.py`.",
        "",
        "| workload | K | pairs | no logging µs (range of run medians) | expbus µs | overhead (median of pairs) "
        "| 95% interval | wait µs/step (none / expbus) | training thread CPU µs/step (none / expbus; paired) "
        "| every pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lo, hi = r["none_run_range_us"]
        out.append(
            f"| {r['workload']} | {r['k']} | {r['pairs']} | {r['none_median_us']:,.0f} ({lo:,.0f}-{hi:,.0f}) "
            f"| {r['expbus_median_us']:,.0f} | {r['overhead_pct']:+.1f}% ({r['overhead_us']:+,.0f} µs) "
            f"| {r['ci_low_pct']:+.1f}% .. {r['ci_high_pct']:+.1f}% | {r['wait_none_us']:,.0f} / "
            f"{r['wait_expbus_us']:,.0f}{_pair_step_wait(r)} | {_pair_cpu(r)} "
            f"| {', '.join(f'{x:+.1f}' for x in r['pair_pcts'])} |"
        )
    out.append("")
    return out


def _toggle_section(res: dict[str, Any]) -> list[str]:
    p = res["params"]
    out = [
        "## Workload (a) within one run: publishing on and off in alternate windows",
        "",
        f"{p['runs']} fresh `{p['config']}` processes (every backend, each sink where its default puts it); in each, "
        f"every cell trains {p['cell_seconds']:.0f} s and the bridge publishes in alternate windows of "
        f"{p['window_s']} s (its tap installed, then removed). The overhead is `median(on steps) / median(off "
        "steps) - 1` within a run (same process, same minute: the process's own speed and the machine's drift "
        "cancel), then the median over runs with its distribution-free 95% interval. *CPU*: the same for the "
        "training thread's own CPU per step. The backends must hold exactly the published steps. See "
        "`benchmarks/step_toggle.py`.",
        "",
        "| workload | K | runs | steps off | off µs | on µs | overhead (median of runs) | 95% interval | CPU "
        "| every run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['workload']} | {r['k']} | {r['runs']} | {r['steps_off']:,.0f} | {r['off_median_us']:,.0f} "
            f"| {r['on_median_us']:,.0f} | {r['overhead_pct']:+.1f}% | {r['ci_low_pct']:+.1f}% .. "
            f"{r['ci_high_pct']:+.1f}% | {r['cpu_overhead_pct']:+.1f}% "
            f"| {', '.join(f'{x:+.1f}' for x in r['run_pcts'])} |"
        )
    out.append("")
    return out


def _pair_cpu(row: dict[str, Any]) -> str:
    """The training thread's CPU per step in a ``step_pairs`` row (absent from results before it was measured)."""
    if "cpu_overhead_pct" not in row:
        return "-"
    return f"{row['cpu_none_us']:,.0f} / {row['cpu_expbus_us']:,.0f}; {row['cpu_overhead_pct']:+.1f}%"


def _pair_step_wait(row: dict[str, Any]) -> str:
    """The typical step's wait in a ``step_pairs`` row (absent from results before it was measured)."""
    if "step_wait_expbus_us" not in row:
        return ""
    return f"; median step {row['step_wait_none_us']:,.0f} / {row['step_wait_expbus_us']:,.0f}"


def _import_section(res: dict[str, Any]) -> list[str]:
    out = [
        "## Import time",
        "",
        f"`python -X importtime -c ...` in fresh interpreters, {res['params']['repeats']} each: the summed "
        "cumulative time of the measured package's top-level imports (median, min-max), and the interpreter's "
        "wall time from start to exit. See `benchmarks/import_time.py`.",
        "",
        "| import | median ms | min-max ms | interpreter wall ms |",
        "|---|---:|---|---:|",
    ]
    for r in res["rows"]:
        out.append(f"| {r['label']} | {r['import_ms']:.1f} | {r['import_ms_min']:.1f}-{r['import_ms_max']:.1f} "
                   f"| {r['wall_ms']:,.0f} |")
    out.append("")
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
        out.append(f"{ALL_PASSED} (every backend read back: CSV rows, TensorBoard scalars, MLflow metric history, "
                   "W&B offline run records, jsonl and DLLogger lines, journal records; sink counters.)")
    out.append("")
    return out


def render(
    results: dict[str, dict[str, Any] | None],
    env: dict[str, str],
    command: str,
    errors: dict[str, str] | None = None,
    source: str = "",
) -> str:
    """The whole report as markdown (``source``: where it will be written, named in the summary)."""
    errors = errors or {}
    ok = all(res is not None and res["ok"] for res in results.values())
    out = [
        f"# expbus benchmarks: {env['date'][:10]}, {env['host']}",
        "",
        f"Command: `{command}`. Status: " + ("all data-arrival checks passed." if ok else "**FAILED**."),
        "Times are measured on this machine only; they are never asserted by the tests.",
        "",
        "## Summary",
        "",
        *summary_lines({k: v for k, v in results.items() if v is not None}, env, source, "--quick" in command),
        "",
    ]
    if results.get("step_overhead") is not None:
        out += _step_section(results["step_overhead"])  # type: ignore[arg-type]
    if results.get("step_pairs") is not None:
        out += _pairs_section(results["step_pairs"])  # type: ignore[arg-type]
    if results.get("step_toggle") is not None:
        out += _toggle_section(results["step_toggle"])  # type: ignore[arg-type]
    if results.get("publish_overhead") is not None:
        out += _publish_section(results["publish_overhead"])  # type: ignore[arg-type]
    if results.get("drain_throughput") is not None:
        out += _drain_section(results["drain_throughput"])  # type: ignore[arg-type]
    if results.get("memory_growth") is not None:
        out += _memory_section(results["memory_growth"])  # type: ignore[arg-type]
    if results.get("import_time") is not None:
        out += _import_section(results["import_time"])  # type: ignore[arg-type]
    out += _checks_section(results, errors)
    out += ["## Environment", "", "| | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in env.items()]
    out.append("")
    return "\n".join(out)
