"""Smoke test of ``python -m benchmarks --quick``: it runs, reports every row, and the data arrived.

Only the shape of the report and the data-arrival checks are asserted, never a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

PUBLISH_ROWS = [
    "`bus.publish(ev)`",
    "`dq.append(ev)`",
    "`publish(ev)` (pre-bound `bus.publish`)",
    "`append(ev)` (pre-bound `dq.append`)",
    "empty loop (`for _ in repeat(None, n)`)",
    "build `Metrics(time=time.time(), step=i, values=v)`, K=1",
    "build `Metrics(time=time.time(), step=i, values=v)`, K=10",
    "build `Metrics(time=now(), step=i, values=v)`, K=1",
]
DRAIN_SETUPS = ["journal only", "jsonl + journal", "jsonl, no journal", "memory (ceiling)"]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_quick_benchmark_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert out.exists(), "the report was not written to --out"
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()

    # Every data-arrival check passed, and the report says so.
    assert "All data-arrival checks passed." in text
    assert "FAILED" not in text
    assert "| publish_overhead | 7 | 7 | 0 |" in lines
    check_rows = [line for line in lines if line.startswith("| drain_throughput |")]
    assert len(check_rows) == 1
    _, _, total, passed, failed, _ = (cell.strip() for cell in check_rows[0].split("|"))
    assert int(total) > 0 and passed == total and failed == "0"

    # The publish-overhead table: one row per variant, with numbers in it.
    for label in PUBLISH_ROWS:
        matches = [_cells(line) for line in lines if line.startswith("| ")]
        matches = [cells for cells in matches if cells[0] == label]
        assert len(matches) == 1, f"no single row for {label!r}"
        cells = matches[0]
        assert len(cells) == 6
        float(cells[1].replace(",", ""))  # median ns is a number
    assert "`bus.publish(ev)` vs `dq.append(ev)`:" in text

    # The drain table: every setup for every K, and the default-policy burst.
    for setup in DRAIN_SETUPS:
        for k in (1, 10, 100):
            rows = [line for line in lines if line.startswith(f"| {setup} | {k} |")]
            assert len(rows) == 1, f"no single drain row for {setup!r}, K={k}"
            cells = _cells(rows[0])
            assert int(cells[2].replace(",", "")) > 0  # events
            float(cells[3].replace(",", ""))  # events/s is a number
    burst = [line for line in lines if line.startswith("| jsonl + journal, default policy |")]
    assert len(burst) == 1

    # The environment section names the versions and the machine.
    for key in ("python", "expbus", "msgspec", "anyio", "platform", "CPU count", "CPU model"):
        assert any(line.startswith(f"| {key} |") for line in lines), key
