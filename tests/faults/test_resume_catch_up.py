"""Fault: a real Lightning run under exp_manager is SIGKILLed while its sinks lag the journal;
``resume_if_exists`` resumes it, and the bridge's bus catches every sink up first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from expbus.bus import CursorStore, Metrics, RunStarted, from_json, read_journal

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
            time.sleep(0.01)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            with progress.open("a") as f:
                f.write(f"{self.trainer.global_step}\\n")


    torch.manual_seed(0)
    x = torch.randn(4000, 4)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    exp_manager(trainer, {
        "explicit_log_dir": log_dir, "resume_if_exists": True, "resume_ignore_no_checkpoint": True,
        "create_tensorboard_logger": False,
        # Slow batches: at the kill the sink lags the journal by up to two seconds of events.
        "sinks": {"events": {"type": "jsonl", "batch_delay": 2.0}},
        "checkpoint_callback_params": {"monitor": None, "filename": "{step}", "every_n_train_steps": 25, "every_n_epochs": 0,
                                       "save_top_k": -1},
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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_run_resumes_with_its_sinks_caught_up_from_the_journal(tmp_path: Path) -> None:
    log_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    first = _train(tmp_path, log_dir, 100_000, progress)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not progress.is_file() or len(progress.read_text().split()) < 110):
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    first.kill()
    output = first.communicate(timeout=60)[0]
    assert first.returncode == -signal.SIGKILL, output

    journal_before = read_journal(log_dir)
    cursor = CursorStore(log_dir, "journal.msgpack").load("events")
    lag = len(journal_before) - (cursor.position if cursor else 0)
    assert lag > 0, "the sink was not behind the journal at the kill: nothing to catch up"
    lines_before = (log_dir / "events.jsonl").read_bytes().splitlines()
    assert len(lines_before) < len(journal_before)

    killed_step = max(e.step for e in journal_before if isinstance(e, Metrics))
    second = _train(tmp_path, log_dir, killed_step + 30, tmp_path / "progress2.txt")
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 0 and "FIT_RETURNED" in output, output

    journal = read_journal(log_dir)
    assert journal[: len(journal_before)] == journal_before, "the journal kept the killed run's records"
    assert sum(isinstance(e, RunStarted) for e in journal) == 2
    # The jsonl sink mirrors the journal: the killed run's tail arrived first, then the resumed
    # run's events; every record once, in order.
    events = [from_json(line) for line in (log_dir / "events.jsonl").read_bytes().splitlines()]
    assert events == journal
    assert CursorStore(log_dir, "journal.msgpack").load("events").position == len(journal)  # type: ignore[union-attr]
