"""Two CPU processes (``ddp_spawn``): one run id and run dir, rank 0 alone feeds the sinks, every rank journals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expbus.bus import Metrics, RunFinished, RunStarted, read_journal
from expbus.sinks import load_config
from expbus.trainer_bridge._run_identity import config_for_rank

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_each_rank_but_zero_journals_into_its_own_file() -> None:
    config = load_config({"journal": {"name": "events.msgpack"}})
    assert config_for_rank(config, 0) is config
    assert config_for_rank(config, 3).journal.name == "events.rank3.msgpack"
    assert config.journal.name == "events.msgpack"


_DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression

if __name__ == "__main__":
    run_dir, root = sys.argv[1], sys.argv[2]
    bridge = BridgeCallback({"run_dir": run_dir, "sinks": {"events": {"type": "jsonl"}}})
    torch.manual_seed(0)
    model = DemoRegressor(in_features=4, hidden=8)
    data = SyntheticRegression(in_features=4, train_size=64, val_size=16, batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, log_every_n_steps=1,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root,
                         callbacks=[bridge])
    trainer.fit(model, datamodule=data)
"""


@pytest.mark.slow
@pytest.mark.timeout(115)
def test_ddp_spawn_on_two_cpu_processes(tmp_path: Path) -> None:
    # In a process of its own: spawning leaves multiprocessing's resource tracker running
    # for the life of the parent, which must not be the test session.
    run_dir = tmp_path / "run"
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(script), str(run_dir), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rank0 = read_journal(run_dir)
    rank1 = read_journal(run_dir / "journal.rank1.msgpack")
    start0, start1 = rank0[0], rank1[0]
    assert isinstance(start0, RunStarted) and isinstance(start1, RunStarted)
    assert (start0.global_rank, start1.global_rank) == (0, 1)
    assert start0.world_size == start1.world_size == 2
    assert start0.run_id == start1.run_id == (run_dir / ".expbus" / "run_id").read_text().strip()
    assert start0.run_dir == start1.run_dir == str(run_dir)
    assert start0.pid != start1.pid != os.getpid()
    for journal in (rank0, rank1):
        assert isinstance(journal[-1], RunFinished) and journal[-1].status == "completed"
        assert [e.step for e in journal if isinstance(e, Metrics) and "train_loss_step" in e.values] == list(range(6))
    # The jsonl sink is rank_zero_only (the default): only rank 0's events are in it.
    lines = [line for line in (run_dir / "events.jsonl").read_text().splitlines() if line]
    assert len(lines) == len(rank0)
