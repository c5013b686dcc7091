"""Preemption: a real training process gets SIGTERM mid-epoch, saves ``-last``, loses no telemetry, resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from expbus.bus import Metrics, RunFinished, RunStarted, from_json, read_journal
from expbus.trainer_bridge.preemption import PreemptionCallback

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from expbus.trainer_bridge.exp_manager import exp_manager

    log_dir, max_steps, progress = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            time.sleep(0.02)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_start(self):
            progress.with_suffix(".start").write_text(str(self.trainer.global_step))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            with progress.open("a") as f:
                f.write(f"{self.trainer.global_step}\\n")
            # When each step's metrics are about to be published (Lightning logs right after this hook).
            with progress.with_suffix(".times").open("a") as f:
                f.write(f"{self.trainer.global_step} {time.time()}\\n")


    torch.manual_seed(0)
    x = torch.randn(800, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)  # 200 steps an epoch
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    exp_manager(trainer, {
        "explicit_log_dir": log_dir, "resume_if_exists": True, "resume_ignore_no_checkpoint": True,
        "sinks": {"events": {"type": "jsonl"}}, "ema": {"enable": True, "decay": 0.9},
        "create_mlflow_logger": True, "mlflow_logger_kwargs": {"save_dir": str(Path(log_dir) / "mlruns")},
        "checkpoint_callback_params": {"monitor": None, "filename": "{step}", "every_n_epochs": 1},
    })
    trainer.fit(Slow(), data)
    print("FIT_RETURNED", trainer.global_step, flush=True)
""")


def _train(tmp_path: Path, log_dir: Path, max_steps: int, progress: Path) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(script), str(log_dir), str(max_steps), str(progress)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for_steps(progress: Path, process: subprocess.Popen[str], steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended early: {process.stdout.read() if process.stdout else ''}")
        if progress.is_file() and len(progress.read_text().split()) >= steps:
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail("training did not reach the expected step")


def _steps(events: list[object]) -> list[int]:
    return [e.step for e in events if isinstance(e, Metrics) and "train_loss" in e.values]


def _tensorboard_steps(log_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return sorted(e.step for e in acc.Scalars("train_loss"))


def _mlflow_steps(log_dir: Path) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{log_dir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))


def test_invalid_signal_is_an_error() -> None:
    with pytest.raises(ValueError):
        PreemptionCallback(sig=12345)


@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_sigterm_mid_epoch_saves_last_keeps_telemetry_and_resumes_at_the_next_step(tmp_path: Path) -> None:
    log_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    process = _train(tmp_path, log_dir, 10_000, progress)
    _wait_for_steps(progress, process, 15)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    # Documented: fit returns normally after a preemption, so the script exits 0 (as NeMo's sys.exit(0)).
    assert process.returncode == 0, output
    stopped = int(output.split("FIT_RETURNED")[1].split()[0])
    assert 15 <= stopped < 200  # mid-epoch

    folder = log_dir / "checkpoints"
    last = folder / f"step={stopped}-last.ckpt"
    assert last.is_file() and (folder / f"step={stopped}-last-EMA.ckpt").is_file(), sorted(os.listdir(folder))
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == stopped and "optimizer_states" in state

    journal = read_journal(log_dir)
    finished = [e for e in journal if isinstance(e, RunFinished)]
    assert [(e.status, e.step) for e in finished] == [("interrupted", stopped)]
    steps = _steps(journal)
    assert steps == sorted(set(steps)) and len(steps) == stopped  # one train_loss per step, none lost
    lines = (log_dir / "events.jsonl").read_bytes().splitlines()
    assert _steps([from_json(line) for line in lines]) == steps
    assert _tensorboard_steps(log_dir) == steps
    assert _mlflow_steps(log_dir) == steps

    progress.unlink()
    resumed = _train(tmp_path, log_dir, stopped + 3, progress)
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, output
    assert int(progress.with_suffix(".start").read_text()) == stopped  # continues at the next step
    assert progress.read_text().split() == [str(stopped + i) for i in (1, 2, 3)]
    journal = read_journal(log_dir)
    second = journal[max(i for i, e in enumerate(journal) if isinstance(e, RunStarted)):]
    assert _steps(second) == [s + 1 for s in (steps[-1], steps[-1] + 1, steps[-1] + 2)]
    assert [e.status for e in second if isinstance(e, RunFinished)] == ["completed"]


@pytest.mark.filterwarnings("ignore:.*exists and is not empty.*")
def test_sigkill_loses_nothing_older_than_the_fsync_interval(tmp_path: Path) -> None:
    """A SIGKILL gives no chance to flush: the journal must still hold every event older than its fsync window."""
    log_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    process = _train(tmp_path, log_dir, 10_000, progress)
    _wait_for_steps(progress, process, 150)
    killed_at = time.time()
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    fsync_interval = 1.0  # the journal's default (README: Reliability)
    published: dict[int, float] = {}
    for line in progress.with_suffix(".times").read_text().splitlines():
        step, when = line.split()
        published[int(step)] = float(when)
    old_enough = {step for step, when in published.items() if when < killed_at - fsync_interval}
    assert len(old_enough) >= 40
    journal_steps = set(_steps(read_journal(log_dir)))
    missing = sorted(old_enough - journal_steps)
    assert not missing, f"steps published over {fsync_interval}s before the kill but not in the journal: {missing}"


def test_exp_manager_preemption_signal_is_configurable(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from expbus.sinks import ConfigError
    from expbus.trainer_bridge.exp_manager import exp_manager

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    exp_manager(trainer, {"explicit_log_dir": str(tmp_path / "run"), "preemption_signal": "SIGUSR1"})
    (callback,) = [c for c in trainer.callbacks if isinstance(c, PreemptionCallback)]
    assert callback.sig == signal.SIGUSR1
    with pytest.raises(ConfigError, match="preemption_signal"):
        exp_manager(pl.Trainer(logger=False, enable_checkpointing=False), {"preemption_signal": "SIGKILL"})
