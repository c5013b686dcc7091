"""``python -m benchmarks``: run every benchmark in a fresh subprocess and write the report.

Usage (from the repository root)::

    python -m benchmarks                 # full run (~45 min on 2 cores)
                                         # writes benchmarks/results/<YYYY-MM-DD>-<hostname>.md
    python -m benchmarks --quick         # smoke run (<1 min): small sizes, prints the report, writes no file
    python -m benchmarks --quick --out R # ... and writes the report to R (a file, or a directory)
    python -m benchmarks --only step_overhead,import_time   # a subset
    python -m benchmarks --render benchmarks/results/D-H.json   # re-render a saved run's report

Beside every report written, ``<same name>.json`` keeps the raw results.

The markdown report goes to stdout as well. The exit status is 1 when a benchmark failed
or a data-arrival check failed (logged data missing from a backend, the journal or a sink's
counters); the report then says FAILED. ``python -m benchmarks.readme_table`` copies the
summary of the latest results file into the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import REPO_ROOT, default_out_path, environment, loadavg, render

BENCHMARKS = ["step_overhead", "step_pairs", "step_toggle", "publish_overhead", "drain_throughput", "memory_growth",
              "import_time"]


def _run_one(name: str, quick: bool, timeout: float, workdir: Path) -> tuple[dict[str, Any] | None, str]:
    """Run ``benchmarks.<name>`` in a fresh interpreter; (its JSON result, an error text)."""
    json_out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json-out", str(json_out)]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    print(f"[{name}: exit {proc.returncode} after {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    if not json_out.exists():
        return None, f"exit status {proc.returncode}, no result written"
    result: dict[str, Any] = json.loads(json_out.read_text(encoding="utf-8"))
    if proc.returncode != 0 and result.get("ok", False):
        return None, f"exit status {proc.returncode}"
    return result, ""


def _out_path(out: str | None, quick: bool) -> Path | None:
    if out is None:
        return None if quick else default_out_path()
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        return path / default_out_path().name
    return path


def _rerender(saved_path: Path, out: str | None) -> int:
    """Re-render a saved run's report (after a change to the report's layout)."""
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    path = Path(out) if out else saved_path.with_suffix(".md")
    report = render(saved["results"], saved["env"], saved["command"], saved.get("errors", {}), saved.get("source", ""))
    path.write_text(report, encoding="utf-8")
    print(f"[report re-rendered from {saved_path} to {path}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the expbus benchmarks.")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, no results file unless --out")
    parser.add_argument("--out", help="write the report here (a file, or a directory for <date>-<host>.md)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per benchmark (default 120 quick, 3600: the step benchmarks train every "
                        "cell for 6 s and take 10-25 minutes)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--render", metavar="JSON", help="run nothing: re-render the report of a saved run "
                        "(the .json written beside every report) to --out, or beside the JSON")
    args = parser.parse_args(argv)
    if args.render:
        return _rerender(Path(args.render), args.out)
    timeout = args.timeout or (120.0 if args.quick else 3600.0)
    names = BENCHMARKS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; known: {BENCHMARKS}")
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    command += f" --only {args.only}" if args.only else ""

    load_at_start = loadavg()
    load_during: list[str] = []
    results: dict[str, dict[str, Any] | None] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="expbus-bench-results-") as tmp:
        for name in names:
            result, error = _run_one(name, args.quick, timeout, Path(tmp))
            results[name] = result
            load_during.append(f"{name} {loadavg().split(' / ')[0]}")
            if error:
                errors[name] = error
    path = _out_path(args.out, args.quick)
    source = ""
    if path is not None:
        try:
            source = str(path.resolve().relative_to(REPO_ROOT))
        except ValueError:
            source = str(path)
    env = environment(load_at_start, load_during)
    report = render(results, env, command, errors, source)
    print(report)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report, encoding="utf-8")
        saved = {"command": command, "env": env, "errors": errors, "source": source, "results": results}
        path.with_suffix(".json").write_text(json.dumps(saved, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"[report written to {path}, raw results to {path.with_suffix('.json')}]", file=sys.stderr)
    ok = all(res is not None and res["ok"] for res in results.values())
    if not ok:
        print("BENCHMARKS FAILED: a benchmark did not finish or published data did not all arrive", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
