"""A real 2 x 3 multirun on CPU slots through the expbus launcher: one job fails, the rest finish, a rerun resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expbus.bus import Metrics, RunStarted, read_journal

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hydra_sweep" / "train.py"
FAILING = "sweep-lr-0.001-h-16"
NAMES = [f"sweep-lr-{lr}-h-{h}" for lr in ("0.01", "0.001") for h in (8, 16, 32)]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _sweep(cwd: Path) -> subprocess.CompletedProcess[str]:
    # hydra_plugins/ is found on the path (the installed package also ships it).
    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, str(SCRIPT), "-m", f"fail_on_name={FAILING}", "hydra.launcher.cpu_slots=3"],
        cwd=cwd, capture_output=True, text=True, timeout=200, env=env,
    )


def _last_step(run_dir: Path) -> int:
    import torch

    (last,) = (run_dir / "checkpoints").glob("*-last.ckpt")
    return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.timeout(450)
def test_sweep_runs_every_job_reports_the_failure_and_resumes(tmp_path: Path) -> None:
    first = _sweep(tmp_path)
    output = first.stdout + first.stderr
    assert first.returncode != 0, output
    assert "JobFailedError: sweep job #4 failed" in output
    assert "configured to fail" in output  # the job's own error, from its log tail
    summary = (tmp_path / "multirun" / "expbus_sweep" / "summary_0.txt").read_text()
    rows = {line.split()[0]: line for line in summary.splitlines()[2:]}
    assert sorted(rows) == [str(i) for i in range(6)]
    assert " failed " in rows["4"] and "model.hidden=16" in rows["4"]
    assert all(" done " in rows[str(i)] for i in (0, 1, 2, 3, 5))
    assert summary.splitlines()[0].split() == ["job", "overrides", "status", "rc", "duration", "log"]
    assert "expbus sweep summary" in output

    exps = tmp_path / "nemo_experiments"
    finished = [n for n in NAMES if n != FAILING]
    steps, metrics = {}, {}
    for name in finished:
        run_dir = exps / name  # resume_if_exists: no version folder
        assert (run_dir / "events.jsonl").stat().st_size > 0  # the jsonl sink
        assert (run_dir / "nemo_log_globalrank-0_localrank-0.txt").is_file()
        steps[name] = _last_step(run_dir)
        metrics[name] = sum(isinstance(e, Metrics) for e in read_journal(run_dir))
        assert metrics[name] > 0
    assert set(steps.values()) == {24}
    assert not list((exps / FAILING).glob("checkpoints/*.ckpt"))
    for num in range(6):
        job_dir = tmp_path / "multirun" / "expbus_sweep" / f"job_{num}"
        assert (job_dir / "job.log").stat().st_size > 0
        assert "exp_manager:" in (job_dir / "config.yaml").read_text()
    assert "name: sweep-lr-0.01-h-32" in (tmp_path / "multirun" / "expbus_sweep" / "job_2" / "config.yaml").read_text()

    second = _sweep(tmp_path)
    assert second.returncode != 0, second.stdout + second.stderr
    assert "JobFailedError: sweep job #4 failed" in second.stdout + second.stderr
    for name in finished:
        run_dir = exps / name
        events = read_journal(run_dir)
        assert sum(isinstance(e, RunStarted) for e in events) == 2  # it ran again, resumed ...
        assert sum(isinstance(e, Metrics) for e in events) == metrics[name]  # ... and trained no step
        assert _last_step(run_dir) == steps[name]
        job_log = tmp_path / "multirun" / "expbus_sweep" / f"job_{NAMES.index(name)}" / "job.log"
        assert "Resuming training from checkpoint" in job_log.read_text()
