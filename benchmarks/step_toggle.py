"""Target (a) measured within one run: the bridge publishing in alternate windows, on and off.

Why a third measurement of workload (a)
    :mod:`benchmarks.step_pairs` compares fresh processes. On the 2-core VM the training
    thread of one fresh process runs its *own CPU work* up to 20% faster or slower than the
    next one's (the median step's wall time equals its CPU time in both arms: the step does
    not wait, it runs at another speed), and the host's speed drifts within seconds. A 2%
    effect is then hard to resolve across processes. Here one ``E:all`` run (every backend,
    each sink where its default puts it) publishes in alternate windows of ``WINDOW_S``
    seconds: the bridge's tap is installed, then removed (:class:`benchmarks._workloads.TapToggle`).
    The overhead is ``median(on steps) / median(off steps) - 1`` within the run: same
    process, same memory, same minute.

What it does and does not include
    Everything publishing sets off: the bridge's event on the training thread, the bus's
    drain, the journal, the sinks' writes and their worker processes' work, as far as it
    lands in the *on* windows. The bus thread, the sink threads and worker processes exist in
    both windows (idle ones cost nothing); a sink's batch (every ``batch_delay``, 2 s) can land
    in either window, which the median mostly ignores either way. The pairs measure the rest
    (everything expbus sets up), with the noise described above.

Run alone: ``python -m benchmarks.step_toggle [--runs N] [--quick] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import step_overhead as so
from benchmarks._common import Checks, finish, median
from benchmarks.step_pairs import median_interval

__all__ = ["WINDOW_S", "run"]

CONFIG = "E:all"
CELLS = [("a", 1), ("a", 10), ("a", 100)]
QUICK_CELLS = [("a", 1), ("a", 10)]
# Long enough for several K=100 steps (about 30 ms each) and several bus drains (every
# 0.2 s) per window; short enough that the host's drift is alike in neighbouring windows.
WINDOW_S = 0.5
# Each cell trains this many times the main benchmark's cell length: about 24 windows.
CELL_FACTOR = 2


def run(runs: int, steps: dict[tuple[str, int], tuple[int, int]], cells: list[tuple[str, int]], timeout: float,
        tmp: Path, seconds: float = 0.0, window_s: float = WINDOW_S) -> dict[str, Any]:
    """Calibrate the matmul, then ``runs`` fresh ``E:all`` processes publishing in alternate windows."""
    checks = Checks()
    cal = so.calibrate_in_child(tmp)
    run_cells = [(w, k, *steps[(w, k)]) for w, k in cells]
    per_cell: dict[tuple[str, int], dict[str, list[float]]] = {
        key: {"pct": [], "cpu_pct": [], "on": [], "off": [], "on_steps": [], "off_steps": []} for key in cells
    }
    t_start = time.perf_counter()
    for index in range(runs):
        res = so.run_in_child(CONFIG, run_cells, cal["n"], tmp, f"run {index + 1}", checks, timeout, seconds,
                              toggle_s=window_s)
        if res is None:
            continue
        for cell in res["cells"]:
            split = cell["toggle"]
            key = (cell["workload"], cell["k"])
            checks.check(f"run {index + 1} {cell['workload']}-k{cell['k']}: on and off steps", bool(split),
                         f"on {split.get('on_steps', 0):.0f}, off {split.get('off_steps', 0):.0f} steps")
            if not split:
                continue
            acc = per_cell[key]
            acc["pct"].append(100.0 * (split["on_median_us"] / split["off_median_us"] - 1.0))
            acc["cpu_pct"].append(100.0 * (split["on_cpu_median_us"] - split["off_cpu_median_us"])
                                  / split["off_median_us"])
            acc["on"].append(split["on_median_us"])
            acc["off"].append(split["off_median_us"])
            acc["on_steps"].append(split["on_steps"])
            acc["off_steps"].append(split["off_steps"])
    rows = []
    for (workload, k), acc in per_cell.items():
        if not acc["pct"]:
            continue
        low, high = median_interval(acc["pct"])
        rows.append({
            "workload": workload, "k": k, "runs": len(acc["pct"]),
            "overhead_pct": median(acc["pct"]), "ci_low_pct": low, "ci_high_pct": high,
            "on_median_us": median(acc["on"]), "off_median_us": median(acc["off"]),
            "cpu_overhead_pct": median(acc["cpu_pct"]),
            "steps_on": sum(acc["on_steps"]), "steps_off": sum(acc["off_steps"]),
            "run_pcts": [round(x, 2) for x in acc["pct"]],
        })
    return {
        "benchmark": "step_toggle",
        "params": {"runs": runs, "config": CONFIG, "cells": [f"{w}:{k}" for w, k in cells], "window_s": window_s,
                   "cell_seconds": seconds, "matmul_n": cal["n"], "matmul_ms": cal["ms"], "torch_threads": 1},
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
        "checks": checks.items,
        "ok": checks.ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_toggle", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="fresh E:all processes (default 6)")
    parser.add_argument("--quick", action="store_true", help="1 run, K in {1, 10}, 2 s cells, 0.25 s windows")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child process (default 300)")
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    cells = QUICK_CELLS if args.quick else CELLS
    # Time-limited cells: the step counts are only the warm-up and an upper bound.
    steps = {key: (warmup, 100 * limit) for key, (warmup, limit) in so.FULL_STEPS.items()}
    seconds = 2.0 if args.quick else CELL_FACTOR * so.CELL_SECONDS
    window_s = 0.25 if args.quick else WINDOW_S
    print(f"step_toggle: {runs} runs of {CONFIG}, cells {cells}, windows of {window_s} s", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="expbus-bench-toggle-") as tmp:
        result = run(runs, steps, cells, args.timeout, Path(tmp), seconds, window_s)
    for row in result["rows"]:
        print(f"  a K={row['k']:<3} on/off {row['overhead_pct']:+.1f}% (95% CI {row['ci_low_pct']:+.1f}% .. "
              f"{row['ci_high_pct']:+.1f}%) over {row['runs']} runs: {row['run_pcts']}", file=sys.stderr)
    return finish("step_toggle", result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
