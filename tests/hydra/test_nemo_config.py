"""NeMo's own multirun config (``hydra/launcher: nemo_launcher``) runs on the expbus launcher with a stand-in model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hydra_sweep" / "nemo_standin.py"
# The copy of ../shared/nemo_configs that travels with the tests.
NEMO_CONFIG = ROOT / "tests" / "exp_manager" / "nemo_configs" / "multirun_asr_adaptation_hp.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.timeout(240)
def test_nemo_multirun_config_runs_a_reduced_grid(tmp_path: Path) -> None:
    shutil.copy(NEMO_CONFIG, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # The grid reduced to 2 jobs; the trainer block's DDP/-1 devices replaced for one CPU process each.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), f"--config-path={tmp_path}", "--config-name=multirun_asr_adaptation_hp", "-m",
         "model.optim.lr=0.001", "model.adapter.linear.dim=32,64",
         "model.adapter.linear.adapter_strategy.stochastic_depth=0.0", "trainer.devices=1",
         "trainer.accelerator=cpu", "trainer.strategy=auto", "trainer.max_steps=8", "hydra.launcher.cpu_slots=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=200, env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "expbus launcher: 2 job(s) on 2 CPU slot(s)" in output
    for dim in (32, 64):
        run_dir = tmp_path / "nemo_experiments" / f"ASR-Adapter-hp-lr-0.001-adim-{dim}-sd-0.0"
        assert len(list((run_dir / "checkpoints").glob("*val_wer=*-last.ckpt"))) == 1
        assert list(run_dir.glob("events.out.tfevents.*"))  # create_tensorboard_logger: true
        assert (run_dir / "journal.msgpack").is_file()
    # sweep.dir and subdir are "." in NeMo's config: the job records still get a folder each.
    assert (tmp_path / "expbus_sweep" / "job_1" / "job.log").is_file()
