"""Import time of ``expbus`` and of the Lightning bridge (on top of Lightning), with Lightning beside it.

What it measures
    ``python -X importtime -c STATEMENT`` in fresh interpreters, ``--repeats`` times each;
    the figure is the median, over repeats, of the summed *cumulative* time of the top-level
    import lines that belong to the module measured (CPython's own per-import clock, so the
    interpreter's start-up is not included):

    * ``import expbus``: the public API (events, bus, journal; sinks and bridge are lazy);
    * ``import torch; import lightning.pytorch; from expbus import BridgeCallback``, read three
      ways: what the bridge adds to a process that already runs Lightning (expbus, its sinks'
      registry and configuration, the callback; backend clients are imported by each sink when
      it opens, in the sink's own thread), and Lightning's and torch's own import, for scale.

    The wall time of each interpreter (start to exit) is reported beside it.

Data arrival
    Each statement must run (exit status 0) and its module must appear in the import log.

Run alone: ``python -m benchmarks.import_time [--quick] [--repeats 3] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks._common import Checks, finish, median
from benchmarks.report import REPO_ROOT

# One interpreter per statement and repeat; each statement yields one figure per (key, label, prefixes).
_STACK = "import torch; import lightning.pytorch; from expbus import BridgeCallback"
CASES: list[tuple[str, list[tuple[str, str, tuple[str, ...]]]]] = [
    ("import expbus", [("expbus", "`import expbus`", ("expbus",))]),
    (_STACK, [
        ("bridge", "`from expbus import BridgeCallback` (torch and Lightning already imported)", ("expbus",)),
        ("lightning", "`import lightning.pytorch` (torch already imported; for scale)", ("lightning",)),
        ("torch", "`import torch` (for scale)", ("torch",)),
    ]),
]

_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s+)(\S+)\s*$")


def top_level_us(log: str, prefixes: tuple[str, ...]) -> tuple[float, int]:
    """(summed cumulative µs, lines) of the outermost import lines of modules under ``prefixes``."""
    total = 0.0
    lines = 0
    for line in log.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        indent, name = len(m.group(3)), m.group(4)
        if indent == 1 and any(name == p or name.startswith(p + ".") for p in prefixes):
            total += int(m.group(2))
            lines += 1
    return total, lines


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run(repeats: int) -> dict[str, Any]:
    checks = Checks()
    samples: dict[str, list[tuple[float, float]]] = {key: [] for _, figures in CASES for key, *_ in figures}
    env = _env()
    for rep in range(repeats):
        for statement, figures in CASES:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], cwd=REPO_ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
            wall = time.perf_counter() - t0
            for key, _label, prefixes in figures:
                us, lines = top_level_us(proc.stderr, prefixes)
                if rep == 0:
                    checks.check(f"import {key}", proc.returncode == 0 and lines > 0,
                                 f"exit {proc.returncode}, {lines} top-level import lines of {prefixes}")
                samples[key].append((us / 1e3, wall * 1e3))
    rows = []
    for statement, figures in CASES:
        for key, label, _prefixes in figures:
            ms = [s[0] for s in samples[key]]
            walls = [s[1] for s in samples[key]]
            rows.append({"key": key, "label": label, "statement": statement, "import_ms": median(ms),
                         "import_ms_min": min(ms), "import_ms_max": max(ms), "wall_ms": median(walls)})
            print(f"  {median(ms):8.1f} ms  (wall {median(walls):7.1f} ms)  {label}", file=sys.stderr, flush=True)
    return {"benchmark": "import_time", "params": {"repeats": repeats}, "rows": rows, "checks": checks.items,
            "ok": checks.ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_time", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interpreters per statement (default 3)")
    parser.add_argument("--quick", action="store_true", help="one interpreter per statement")
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    result = run(1 if args.quick else args.repeats)
    return finish("import_time", result, args.json_out, failure="CHECK FAILED")


if __name__ == "__main__":
    sys.exit(main())
