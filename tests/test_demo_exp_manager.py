"""`expbus demo` through exp_manager from examples/, run twice: the second run resumes and every curve continues."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expbus.bus import Metrics, RunFinished, read_journal

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "exp_manager_demo.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _demo(cwd: Path, steps: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    return subprocess.run(
        [sys.executable, "-m", "expbus", "demo", "--config", str(EXAMPLE), "--out", "exps", "--steps", str(steps)],
        cwd=cwd, capture_output=True, text=True, timeout=240, env=env,
    )


@pytest.mark.timeout(300)
def test_demo_twice_with_resume_continues_every_curve(tmp_path: Path) -> None:
    first = _demo(tmp_path, 200)
    assert first.returncode == 0, first.stderr
    log_dir = tmp_path / "exps" / "expbus_demo_nemo"  # resume_if_exists: no version folder
    assert "expbus demo: 200 steps" in first.stdout
    second = _demo(tmp_path, 400)
    assert second.returncode == 0, second.stderr
    assert "expbus demo: 400 steps" in second.stdout

    # The journal holds both sessions: train steps strictly increasing, 9 ... 399, every 10.
    events = read_journal(log_dir)
    steps = [e.step for e in events if isinstance(e, Metrics) and "train_loss_step" in e.values]
    assert steps == list(range(9, 400, 10))
    finished = [e for e in events if isinstance(e, RunFinished)]
    assert [e.status for e in finished] == ["completed", "completed"]

    # TensorBoard: one event file, continued, no gap and no duplicate.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("train_loss_step")] == steps

    # MLflow: one run, continued, no gap and no duplicate.
    from mlflow.tracking import MlflowClient

    # NeMo's mlflow save_dir (./mlruns) is relative to the working directory.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("expbus_demo_nemo")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")] == steps

    # Exactly one -last checkpoint remains, and the earlier run's top-level files moved to run_0/.
    assert len(list((log_dir / "checkpoints").glob("*-last.ckpt"))) == 1
    assert (log_dir / "run_0" / "cmd-args.log").is_file()
