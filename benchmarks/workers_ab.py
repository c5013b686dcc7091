"""``workers: thread`` against ``workers: process``, paired round by round (not part of ``python -m benchmarks``).

The full step-overhead benchmark pools every repeat of a configuration; on a shared machine
whose load drifts by a factor of two within minutes, pooled medians then compare moments
rather than configurations. This runs short rounds instead: in each round every
configuration runs once (fresh forked process, the same cell as
:mod:`benchmarks.step_overhead`, same read-back checks), between two runs of ``none``, in an
order that alternates from round to round (A B C, C B A, ...). Every figure is computed
within its round (overhead = the configuration's median step minus the mean of the round's
two ``none`` medians) and then summarised over rounds by the median, so the ratios compare
runs that were seconds apart.

Figures per configuration: median step overhead, overhead as a fraction of Lightning's for
the same backends, the training thread's waiting time per step (wall minus CPU: the GIL, or
a core), the CPU per step of the training process's other threads (Python there holds the
GIL), the *in-process logging CPU* per step (the training thread's CPU beyond ``none``'s
plus the other threads' CPU: what logging costs the training process in CPU time, which a
Python-bound step can only share through the GIL; a CPU-time figure, so other load on the
machine barely moves it, unlike the wall-clock overheads), and the CPU of the child processes
(sink workers under ``workers: process``; start-up and imports included, per run).

Run: ``python -m benchmarks.workers_ab --configs L:all,E:all:thread,E:all:process --cell b:100
--rounds 6`` (``none`` is always run, twice per round).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import step_overhead as so
from benchmarks._common import median
from benchmarks._workloads import calibrate_matmul


def _round_figures(results: dict[str, dict[str, Any]], base: float,
                   base_main_cpu: float) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    for config, cell in results.items():
        steps = max(1, cell["steps"])
        main_cpu = cell["cpu_main_us"] / steps
        others = cell["cpu_others_total_us"] / steps
        figures[config] = {
            "median": median(cell["intervals_us"]),
            "overhead": median(cell["intervals_us"]) - base,
            "waiting": cell["main_wait_us"] / steps,
            "main_cpu": main_cpu,
            "others_cpu": others,
            "logging_cpu": main_cpu - base_main_cpu + others,
            "children_cpu_ms": 1000.0 * cell.get("cpu_children_s", 0.0),
        }
    for config, fig in figures.items():
        peer = so.peer_of(config)
        if peer in figures and figures[peer]["overhead"] > 0:
            fig["fraction"] = fig["overhead"] / figures[peer]["overhead"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="L:all,E:all:thread,E:all:process",
                        help="step_overhead configurations (none is added)")
    parser.add_argument("--cell", default="b:100", help="workload:K (default b:100)")
    parser.add_argument("--measured", type=int, default=None, help="measured steps per run (default: step_overhead's)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json-out", help="write every round's figures here")
    args = parser.parse_args(argv)
    workload, k_text = args.cell.split(":")
    k = int(k_text)
    warmup, measured = so.FULL_STEPS[(workload, k)]
    measured = args.measured or measured
    configs = [c for c in args.configs.split(",") if c and c != "none"]
    unknown = []
    for config in configs:
        try:
            so.describe(config)
        except KeyError:
            unknown.append(config)
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {list(so.CONFIGS)}")
    tmp = Path(tempfile.mkdtemp(prefix="expbus-workers-ab-"))
    calib = tmp / "calibration.json"
    so._fork_run(lambda out: (out.write_text(json.dumps(calibrate_matmul())), 0)[1], (calib,), 120)
    matmul_n = json.loads(calib.read_text())[0]
    rounds: list[dict[str, dict[str, float]]] = []
    ok = True
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        results: dict[str, dict[str, Any]] = {}
        bases: list[float] = []
        base_cpu: list[float] = []
        for config in ["none", *order, "none"]:
            root = Path(tempfile.mkdtemp(dir=tmp))
            out = root / "r.json"
            so._fork_run(so._child, (config, [(workload, k, warmup, measured)], matmul_n, out, root), 600)
            res = json.loads(out.read_text(encoding="utf-8"))
            ok = ok and all(c["ok"] for c in res["checks"])
            (cell,) = res["cells"]
            if config == "none":
                bases.append(median(cell["intervals_us"]))
                base_cpu.append(cell["cpu_main_us"] / max(1, cell["steps"]))
            else:
                results[config] = cell
        base = sum(bases) / len(bases)
        figures = _round_figures(results, base, sum(base_cpu) / len(base_cpu))
        figures["none"] = {"median": base, "spread": abs(bases[0] - bases[1]), "main_cpu": sum(base_cpu) / 2}
        rounds.append(figures)
        shown = ", ".join(f"{c} {figures[c]['overhead']:+,.0f} µs" for c in order)
        print(f"round {r + 1}: none {base:,.0f} µs (two runs {bases[0]:,.0f} / {bases[1]:,.0f}); {shown}",
              file=sys.stderr, flush=True)
    print(f"\nworkload {workload}, K={k}: {warmup} warm-up + {measured} measured steps per run, {args.rounds} rounds; "
          "medians over rounds of per-round figures\n")
    print("| configuration | overhead µs | overhead / none | overhead / Lightning's (same backends) "
          "| per-round fractions | training thread waiting µs/step | training thread CPU µs/step "
          "| other threads CPU µs/step | in-process logging CPU µs/step | child processes CPU ms/run |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    print(f"| none | - | - | - | - | - | {median([fig['none']['main_cpu'] for fig in rounds]):,.0f} | - | - | - |")
    base_med = median([fig["none"]["median"] for fig in rounds])
    for config in configs:
        per = [fig[config] for fig in rounds]
        fractions = [p["fraction"] for p in per if "fraction" in p]
        frac = f"{100 * median(fractions):.1f}%" if fractions else "-"
        listed = ", ".join(f"{100 * f:.0f}%" for f in fractions) or "-"
        over = median([p["overhead"] for p in per])
        print(f"| {config} | {over:+,.0f} | {100 * over / base_med:+.1f}% | {frac} | {listed} "
              f"| {median([p['waiting'] for p in per]):,.0f} | {median([p['main_cpu'] for p in per]):,.0f} "
              f"| {median([p['others_cpu'] for p in per]):,.0f} | {median([p['logging_cpu'] for p in per]):,.0f} "
              f"| {median([p['children_cpu_ms'] for p in per]):,.0f} |")
    pairs = [("E:all:process", "E:all:thread"), ("E:mlflow:process", "E:mlflow:thread")]
    for a, b in pairs:
        if a in configs and b in configs:
            ratios = [fig[a]["overhead"] / fig[b]["overhead"] for fig in rounds if fig[b]["overhead"] > 0]
            if ratios:
                print(f"\n{a} overhead / {b} overhead, per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
                      f"median {median(ratios):.2f}")
            cpu = [fig[a]["logging_cpu"] / fig[b]["logging_cpu"] for fig in rounds if fig[b]["logging_cpu"] > 0]
            if cpu:
                print(f"{a} / {b} in-process logging CPU, per round: {', '.join(f'{x:.2f}' for x in cpu)}; "
                      f"median {median(cpu):.2f}")
    print(f"\nnone: median {base_med:,.0f} µs; data arrived in every run: {'yes' if ok else 'NO'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rounds, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
