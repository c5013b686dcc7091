"""``expbus bench``: run the benchmark suite of a source checkout (``python -m benchmarks``).

The suite lives in the repository's ``benchmarks/`` folder, next to the packages; it is not
installed with the distribution. ``expbus bench`` finds it beside the ``expbus`` package it
was imported from (an editable install or a checkout on ``PYTHONPATH``) and runs it with the
same interpreter, from the repository root.

Register it in ``expbus/_cli.py``'s ``build_parser`` with::

    from expbus._cli_bench import add_bench_parser
    add_bench_parser(commands)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["add_bench_parser", "find_repo_root", "run_bench"]


def find_repo_root() -> Path | None:
    """The checkout holding ``benchmarks/__main__.py`` beside the ``expbus`` package, or None."""
    import expbus

    root = Path(expbus.__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "__main__.py").is_file() else None


def add_bench_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add the ``bench`` subcommand to ``expbus``'s subparsers."""
    bench = commands.add_parser(
        "bench",
        help="measure what logging costs the training step (runs python -m benchmarks of a source checkout)",
        description="Run the benchmark suite: step overhead against Lightning's loggers, publish cost, drain "
                    "throughput, memory with a stalled sink, import time. Writes benchmarks/results/<date>-<host>.md.",
    )
    bench.add_argument("--quick", action="store_true", help="smoke run (<1 min): small sizes, writes no file")
    bench.add_argument("--out", metavar="PATH", help="write the report here (a file, or a directory)")
    bench.add_argument("--only", metavar="NAMES", help="comma-separated subset of the benchmarks")
    bench.add_argument("--timeout", type=float, metavar="S", help="seconds per benchmark")
    bench.add_argument("--readme", action="store_true",
                       help="afterwards, copy the summary of the latest results into README.md")
    bench.set_defaults(func=run_bench)
    return bench


def run_bench(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks`` (and ``benchmarks.readme_table`` with ``--readme``); its exit status."""
    root = find_repo_root()
    if root is None:
        print("expbus bench: the benchmark suite is not installed with the package; run it from a source "
              "checkout (git clone, then `pip install -e '.[all]'` and `expbus bench` or `python -m benchmarks`)",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "benchmarks"]
    if args.quick:
        cmd.append("--quick")
    if args.out:
        cmd += ["--out", os.path.abspath(args.out)]
    if args.only:
        cmd += ["--only", args.only]
    if args.timeout:
        cmd += ["--timeout", str(args.timeout)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    code = subprocess.call(cmd, cwd=root, env=env)
    if code == 0 and args.readme:
        code = subprocess.call([sys.executable, "-m", "benchmarks.readme_table"], cwd=root, env=env)
    return code
