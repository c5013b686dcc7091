"""Target (a) measured in pairs: expbus with every backend against no logging, run after run.

Why a second measurement of workload (a)
    :mod:`benchmarks.step_overhead` pools two runs per configuration. On the 2-core VM the
    median step of one ``none`` run differs from the next by up to 10% (the load of the
    machine drifts; every run is a fresh process), five times the 2% the target asks to
    resolve. Here every pair is one ``none`` run and one ``E:all`` run back to back (the order
    alternates from pair to pair), each a fresh process forked like the main benchmark's, and
    the overhead is taken within the pair: ``median(E:all steps) / median(none steps) - 1``.
    Drift slower than a pair cancels; what is left is the spread of the pair ratios, reported
    as a distribution-free 95% confidence interval of their median (order statistics of the
    ratios, from the binomial distribution). The verdict uses the median over pairs.

What runs
    Workload (a) of :mod:`benchmarks._workloads` (the ~2 ms GIL-releasing matmul plus the tiny
    step) at K in {1, 10, 100}, cells as long as the main benchmark's (``CELL_SECONDS`` of training), the same
    ``E:all`` configuration (CSV, TensorBoard, MLflow on sqlite, W&B offline, jsonl,
    DLLogger and the journal, each sink where its default puts it) and the same data-arrival
    checks (every step with all K metrics read back from every backend).

Run alone: ``python -m benchmarks.step_pairs [--pairs N] [--quick] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import step_overhead as so
from benchmarks._common import Checks, finish, median

__all__ = ["median_interval", "run"]

CONFIG = "E:all"
CELLS = [("a", 1), ("a", 10), ("a", 100)]
QUICK_CELLS = [("a", 1), ("a", 10)]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values`` (order statistics).

    The narrowest ``[x_(j), x_(n+1-j)]`` whose coverage, ``1 - 2 P(Binomial(n, 1/2) < j)``, is
    at least ``confidence``; the whole range when ``n`` is too small for that.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return (math.nan, math.nan)
    best = 1
    for j in range(1, n // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(j)) / 2**n
        if 1 - 2 * tail >= confidence:
            best = j
        else:
            break
    return (xs[best - 1], xs[n - best])


def run(pairs: int, steps: dict[tuple[str, int], tuple[int, int]], cells: list[tuple[str, int]], timeout: float,
        tmp: Path, seconds: float = 0.0) -> dict[str, Any]:
    """Calibrate the matmul, then ``pairs`` pairs of (``none``, ``E:all``) runs; aggregate per cell.

    ``seconds`` above 0: every cell trains that long after its warm-up (see ``step_overhead``).
    """
    checks = Checks()
    cal = so.calibrate_in_child(tmp)
    run_cells = [(w, k, *steps[(w, k)]) for w, k in cells]
    per_cell: dict[tuple[str, int], dict[str, list[float]]] = {
        (w, k): {"pct": [], "us": [], "none": [], "expbus": [], "wait_none": [], "wait_expbus": [],
                 "cpu_none": [], "cpu_expbus": [], "cpu_pct": [],
                 "step_wait_none": [], "step_wait_expbus": []} for w, k in cells
    }
    t_start = time.perf_counter()
    for p in range(pairs):
        order = ["none", CONFIG] if p % 2 == 0 else [CONFIG, "none"]
        medians: dict[str, dict[tuple[str, int], float]] = {}
        waits: dict[str, dict[tuple[str, int], float]] = {}
        cpus: dict[str, dict[tuple[str, int], float]] = {}
        step_waits: dict[str, dict[tuple[str, int], float]] = {}
        for config in order:
            res = so.run_in_child(config, run_cells, cal["n"], tmp, f"pair {p + 1}", checks, timeout, seconds)
            if res is None:
                continue
            for cell in res["cells"]:
                key = (cell["workload"], cell["k"])
                medians.setdefault(config, {})[key] = median(cell["intervals_us"])
                waits.setdefault(config, {})[key] = cell["main_wait_us"] / max(1, cell["steps"])
                cpus.setdefault(config, {})[key] = cell["step_cpu_median_us"]
                step_waits.setdefault(config, {})[key] = cell["step_wait_median_us"]
        for key, acc in per_cell.items():
            base, ours = medians.get("none", {}).get(key), medians.get(CONFIG, {}).get(key)
            if base is None or ours is None:
                continue
            acc["pct"].append(100.0 * (ours / base - 1.0))
            acc["us"].append(ours - base)
            acc["none"].append(base)
            acc["expbus"].append(ours)
            acc["wait_none"].append(waits["none"][key])
            acc["wait_expbus"].append(waits[CONFIG][key])
            cpu_base, cpu_ours = cpus["none"][key], cpus[CONFIG][key]
            acc["cpu_none"].append(cpu_base)
            acc["cpu_expbus"].append(cpu_ours)
            # The training thread's own extra CPU per step, as a share of the pair's no-logging step.
            acc["cpu_pct"].append(100.0 * (cpu_ours - cpu_base) / base)
            acc["step_wait_none"].append(step_waits["none"][key])
            acc["step_wait_expbus"].append(step_waits[CONFIG][key])
    rows = []
    for (workload, k), acc in per_cell.items():
        if not acc["pct"]:
            continue
        low, high = median_interval(acc["pct"])
        rows.append({
            "workload": workload, "k": k, "pairs": len(acc["pct"]),
            "overhead_pct": median(acc["pct"]), "ci_low_pct": low, "ci_high_pct": high,
            "overhead_us": median(acc["us"]),
            "none_median_us": median(acc["none"]), "expbus_median_us": median(acc["expbus"]),
            "none_run_range_us": [min(acc["none"]), max(acc["none"])],
            "wait_none_us": median(acc["wait_none"]), "wait_expbus_us": median(acc["wait_expbus"]),
            "pair_pcts": [round(x, 2) for x in acc["pct"]],
            # Median CPU per step of the training thread itself, and the paired difference as
            # a share of the step: what of the overhead is the thread running longer (the bridge's
            # own work, a slower interpreter) rather than waiting for the GIL or a core.
            "cpu_none_us": median(acc["cpu_none"]), "cpu_expbus_us": median(acc["cpu_expbus"]),
            "cpu_overhead_pct": median(acc["cpu_pct"]),
            "pair_cpu_pcts": [round(x, 2) for x in acc["cpu_pct"]],
            # The median step's own wait (wall minus CPU of that step), median over runs.
            "step_wait_none_us": median(acc["step_wait_none"]),
            "step_wait_expbus_us": median(acc["step_wait_expbus"]),
        })
    return {
        "benchmark": "step_pairs",
        "params": {"pairs": pairs, "config": CONFIG, "cells": [f"{w}:{k}" for w, k in cells],
                   "steps": {f"{w}:{k}": list(steps[(w, k)]) for w, k in cells},
                   "cell_seconds": seconds,
                   "matmul_n": cal["n"], "matmul_ms": cal["ms"], "torch_threads": 1},
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
        "checks": checks.items,
        "ok": checks.ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_pairs", description=__doc__.splitlines()[0])
    # Process to process, the K=1 step (a matmul of about 2 ms) varies by up to 20% on the 2-core
    # VM; 16 pairs give a 95% interval of the median from the 4th to the 13th ratio.
    parser.add_argument("--pairs", type=int, default=16,
                        help="pairs of runs (default 16; 10 is the fewest whose 95%% interval is narrower "
                        "than the range)")
    parser.add_argument("--quick", action="store_true", help="2 pairs, K in {1, 10}, 30 steps")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per child process (default 240)")
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    pairs = 2 if args.quick else args.pairs
    steps = so.QUICK_STEPS if args.quick else so.FULL_STEPS
    cells = QUICK_CELLS if args.quick else CELLS
    print(f"step_pairs: {pairs} pairs of none / {CONFIG}, cells {cells}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="expbus-bench-pairs-") as tmp:
        result = run(pairs, steps, cells, args.timeout, Path(tmp), 0.0 if args.quick else so.CELL_SECONDS)
    for row in result["rows"]:
        print(f"  a K={row['k']:<3} overhead {row['overhead_pct']:+.1f}% (95% CI {row['ci_low_pct']:+.1f}% .. "
              f"{row['ci_high_pct']:+.1f}%) over {row['pairs']} pairs: {row['pair_pcts']}", file=sys.stderr)
    return finish("step_pairs", result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
