"""Smoke test of ``python -m benchmarks --quick``: it runs, reports every row, and the data arrived.

Only the shape of the report and the data-arrival checks are asserted, never a time. The
README table generator is tested on synthetic files (markers present, missing, out of order).
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
DRAIN_SETUPS = [
    "journal only", "jsonl + journal", "jsonl, no journal", "memory (ceiling)",
    "tensorboard + journal", "csv + journal", "dllogger + journal", "mlflow (sqlite) + journal",
]
# The --quick step-overhead matrix: configuration label x workload x K.
STEP_CONFIGS = ["no logging", "Lightning: CSV + TB + MLflow + W&B", "expbus: CSV + TB + MLflow + W&B + jsonl + dllogger"]
STEP_WORKLOADS = ["a", "b"]
STEP_KS = [1, 10]
TARGETS = [
    "Workload (a), all backends on",
    "Workload (b), all backends on",
    "`publish()`",
    "Drain through the bus (journal on) into jsonl",
    "Drain through the bus (journal on) into tensorboard",
    "Stalled sink",
]
BENCHMARKS = [
    "step_overhead", "step_pairs", "step_toggle", "publish_overhead", "drain_throughput", "memory_growth", "import_time",
]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _check_row(lines: list[str], name: str) -> None:
    rows = [line for line in lines if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"no single data-arrival row for {name}"
    _, _, total, passed, failed, _ = (cell.strip() for cell in rows[0].split("|"))
    assert int(total) > 0 and passed == total and failed == "0", rows[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_benchmark_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert out.exists(), "the report was not written to --out"
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()

    # Every data-arrival check passed, and the report says so.
    assert "All data-arrival checks passed." in text
    assert "FAILED" not in text
    assert "| publish_overhead | 7 | 7 | 0 |" in lines
    for name in BENCHMARKS:
        _check_row(lines, name)

    # The summary: between its markers, the headline table and one row per target.
    assert text.count("<!-- summary:start -->") == 1 and text.count("<!-- summary:end -->") == 1
    summary = text.split("<!-- summary:start -->")[1].split("<!-- summary:end -->")[0]
    for workload in ("(a) ~2 ms GIL-releasing step", "(b) Python-bound tiny step"):
        for k in STEP_KS:
            assert any(line.startswith(f"| {workload} | {k} |") for line in summary.splitlines()), (workload, k)
    for target in TARGETS:
        rows = [line for line in summary.splitlines() if line.startswith(f"| {target}")]
        assert len(rows) == 1, f"no single target row for {target!r}"
        assert _cells(rows[0])[-1] in ("met", "**missed**"), rows[0]

    # The step-overhead table (13 columns): every configuration x workload x K, with a number in it.
    for label in STEP_CONFIGS:
        for workload in STEP_WORKLOADS:
            for k in STEP_KS:
                rows = [_cells(line) for line in lines if line.startswith(f"| {label} | {workload} | {k} |")]
                rows = [cells for cells in rows if len(cells) == 13]
                assert len(rows) == 1, f"no single step row for {label!r} {workload} K={k}"
                float(rows[0][3].replace(",", ""))  # median µs is a number

    # The paired workload (a) table: one row per K, with the median of the pairs and its interval.
    for k in STEP_KS:
        rows = [_cells(line) for line in lines if line.startswith(f"| a | {k} | 2 |")]
        assert len(rows) == 1, f"no single paired row for a K={k}"
        assert rows[0][5].endswith("µs)") and ".." in rows[0][6], rows[0]
        # The training thread's own CPU per step, both arms and the paired difference.
        none_cpu, rest = rows[0][8].split(" / ")
        assert float(none_cpu.replace(",", "")) > 0 and rest.endswith("%"), rows[0]
    assert "paired runs (2 pairs)" in summary

    # The within-run table (publishing on and off in alternate windows): one row per K.
    for k in STEP_KS:
        rows = [_cells(line) for line in lines if line.startswith(f"| a | {k} | 1 |")]
        assert len(rows) == 1, f"no single within-run row for a K={k}"
        assert rows[0][6].endswith("%") and ".." in rows[0][7], rows[0]
        assert float(rows[0][3].replace(",", "")) > 0, rows[0]  # steps with the tap off were measured
    assert "within one run, publishing on / off in alternate windows (1 runs)" in summary

    # Memory and import tables.
    for mode in ("paced", "burst"):
        assert sum(line.startswith(f"| {mode} | 100,000 |") for line in lines) == 1, mode
    assert any(line.startswith("| `import expbus` |") for line in lines)
    assert any(line.startswith("| `from expbus import BridgeCallback`") for line in lines)

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
    for key in ("python", "expbus", "msgspec", "anyio", "torch", "lightning", "platform", "CPU count", "CPU model"):
        assert any(line.startswith(f"| {key} |") for line in lines), key
    assert any(line.startswith("| load average (1 min) after each benchmark |") for line in lines)


# -- the README table generator -------------------------------------------------------------------
def _results_file(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(f"# run\n\n<!-- summary:start -->\n{body}\n<!-- summary:end -->\n\nmore\n", encoding="utf-8")
    return path


def _readme_table(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.readme_table", *args], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)


def test_readme_table_replaces_the_text_between_the_markers(tmp_path: Path) -> None:
    results = _results_file(tmp_path, "2026-11-28-host.md", "| a | b |\n|---|---|\n| 1 | 2 |")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n", encoding="utf-8")
    proc = _readme_table("--results", str(results), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and "| 1 | 2 |" in text
    assert text.startswith("intro\n<!-- bench:start -->") and text.endswith("<!-- bench:end -->\noutro\n")
    assert _readme_table("--results", str(results), "--readme", str(readme), "--check").returncode == 0
    readme.write_text(text.replace("| 1 | 2 |", "| 9 | 9 |"), encoding="utf-8")
    assert _readme_table("--results", str(results), "--readme", str(readme), "--check").returncode == 1


@pytest.mark.parametrize(
    ("readme_text", "message"),
    [
        ("no markers at all\n", "<!-- bench:start --> is missing"),
        ("<!-- bench:start -->\nx\n", "<!-- bench:end --> is missing"),
        ("<!-- bench:end -->\nx\n<!-- bench:start -->\n", "comes before"),
        ("<!-- bench:start --><!-- bench:start --><!-- bench:end -->", "appears 2 times"),
    ],
)
def test_readme_table_fails_clearly_without_its_markers(tmp_path: Path, readme_text: str, message: str) -> None:
    results = _results_file(tmp_path, "2026-11-28-host.md", "| a |")
    readme = tmp_path / "README.md"
    readme.write_text(readme_text, encoding="utf-8")
    proc = _readme_table("--results", str(results), "--readme", str(readme))
    assert proc.returncode == 2
    assert message in proc.stderr and str(readme) in proc.stderr
    assert readme.read_text(encoding="utf-8") == readme_text  # nothing written


def test_readme_table_fails_clearly_when_the_results_have_no_summary(tmp_path: Path) -> None:
    results = tmp_path / "2026-11-28-host.md"
    results.write_text("# an old report without a summary\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n", encoding="utf-8")
    proc = _readme_table("--results", str(results), "--readme", str(readme))
    assert proc.returncode == 2
    assert "<!-- summary:start --> is missing" in proc.stderr


def test_latest_results_picks_the_latest_date(tmp_path: Path) -> None:
    from benchmarks.readme_table import latest_results

    for name in ("2026-11-27-b.md", "2026-11-28-a.md", "2025-12-31-z.md", "notes.md"):
        _results_file(tmp_path, name, "x")
    assert latest_results(tmp_path).name == "2026-11-28-a.md"


def test_the_pairs_interval_is_the_order_statistics_of_the_median() -> None:
    from benchmarks.step_pairs import median_interval

    # n=10: P(Binomial(10, 1/2) < 2) = 11/1024, so [x_(2), x_(9)] covers 97.9% >= 95%; [x_(3), x_(8)] only 89%.
    assert median_interval([float(x) for x in range(10, 0, -1)]) == (2.0, 9.0)
    assert median_interval([1.0, 2.0, 3.0]) == (1.0, 3.0)  # too few values: the whole range
    assert median_interval([float(x) for x in range(20)]) == (5.0, 14.0)  # P(B(20, 1/2) < 6) = 2.07%


def test_a_timed_cell_stops_training_after_its_seconds() -> None:
    from types import SimpleNamespace

    from benchmarks._workloads import StepClock

    clock = StepClock(warmup=2, stop_after_s=1.0)
    trainer = SimpleNamespace(should_stop=False)
    for start_ns in (0, 10, 20, 500_000_000, 999_999_999):  # warm-up, warm-up, then measured steps
        clock.starts.append(start_ns)
        clock.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
        assert trainer.should_stop is False
    clock.starts.append(1_000_000_020)  # one second after the first measured step
    clock.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
    assert trainer.should_stop is True
    untimed = StepClock(warmup=0)
    untimed.starts.extend([0, 10**12])
    untimed.on_train_batch_end(trainer := SimpleNamespace(should_stop=False), None, None, None, 0)  # type: ignore[arg-type]
    assert trainer.should_stop is False


def test_tap_toggle_alternates_windows_and_splits_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from benchmarks import _workloads

    class Tap:
        def __init__(self) -> None:
            self.installed = True
            self.changes: list[bool] = []

        def install(self) -> None:
            self.installed = True
            self.changes.append(True)

        def uninstall(self) -> None:
            self.installed = False
            self.changes.append(False)

    tap = Tap()
    toggle = _workloads.TapToggle(SimpleNamespace(_tap=tap), window_s=1.0)
    # Steps start at these seconds: a window flips at the first step at least 1 s after the last flip.
    for second in (0.0, 0.4, 0.8, 1.0, 1.5, 2.1, 2.5, 3.2):
        monkeypatch.setattr(_workloads, "_perf", lambda s=second: int(s * 1e9))
        toggle.on_train_batch_start(None, None, None, 0)  # type: ignore[arg-type]
    assert toggle.on == [True, True, True, False, False, True, True, False]
    assert toggle.toggled == [False, False, False, True, False, True, False, True]
    assert tap.changes == [False, True, False] and tap.installed is False
    assert toggle.published_steps() == 5

    # Steps 1.. (warm-up 1): the steps that flipped the tap are left out of both sides.
    walls = [10.0, 11.0, 99.0, 20.0, 99.0, 12.0, 99.0]
    cpus = [9.0, 10.0, 0.0, 19.0, 0.0, 11.0, 0.0]
    split = toggle.split(walls, cpus, warmup=1)
    assert split == {"on_median_us": 11.0, "off_median_us": 20.0, "on_cpu_median_us": 10.0,
                     "off_cpu_median_us": 19.0, "on_steps": 3.0, "off_steps": 1.0}
