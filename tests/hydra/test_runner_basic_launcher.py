"""``hydra_runner`` under Hydra's basic launcher: two jobs in one process get their own run dirs, journals and sinks.

Each job ends with ``clean_exp_ckpt(log_dir, remove_ckpt=True, remove_nemo=False)``, as NeMo's multirun docs show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expbus.bus import CheckpointSaved, RunStarted, read_journal

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hydra_sweep" / "train.py"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.timeout(200)
def test_jobs_in_one_process_do_not_share_a_version_and_clean_at_the_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    # Same experiment name for both jobs: only the version folder keeps them apart, and job 0 publishes
    # its version in NEMO_EXPM_VERSION (for DDP ranks), which job 1 must not inherit.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "-m", "hydra/launcher=basic", "seed=0,1", "model.lr=0.01", "model.hidden=8",
         "exp_manager.name=same", "exp_manager.resume_if_exists=false", "+exp_manager.use_datetime_version=false",
         "trainer.max_steps=4", "clean_exp_ckpt.remove_ckpt=true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = sorted(p.name for p in (tmp_path / "nemo_experiments" / "same").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        run_dir = tmp_path / "nemo_experiments" / "same" / run
        assert sum(isinstance(e, RunStarted) for e in read_journal(run_dir)) == 1
        assert (run_dir / "events.jsonl").stat().st_size > 0
        # clean_exp_ckpt at the end of the job: the .ckpt files are gone, the weights-only .nemo stays.
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["same.nemo"]
        saved = [e for e in read_journal(run_dir) if isinstance(e, CheckpointSaved)]
        assert any(e.path.endswith(".ckpt") for e in saved)  # -last was written at train end
