"""The same sweep config under ``hydra-submitit-launcher`` (``submitit_local``): every job in its own process, its own run.

``submitit_local`` runs each job as ``python -m submitit.core._submit`` in a subprocess of the
sweep, from a pickle (cloudpickle) of Hydra's launcher and the task: the script's ``main`` is
pickled by value, so the script need not be importable. ``submitit_slurm`` pickles the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expbus.bus import Metrics, RunFinished, RunStarted, from_json, read_journal

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hydra_sweep" / "train.py"
# sweep.yaml's grid is model.lr 0.01,0.001 x model.hidden 8,16,32; hidden narrowed to 2 values (4 jobs).
NAMES = [f"sweep-lr-{lr}-h-{h}" for lr in ("0.01", "0.001") for h in (8, 16)]
# What submitit needs beyond sweep.yaml (its defaults: timeout_min 60, cpus_per_task unset, the job
# folder ${hydra.sweep.dir}/.submitit/%j): a short time limit, one core per job, a known folder.
SUBMITIT_OVERRIDES = [
    "hydra/launcher=submitit_local",
    "hydra.launcher.timeout_min=5",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.submitit_folder=${hydra.sweep.dir}/submitit/%j",
]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_submitit_launcher_is_discovered_by_hydra() -> None:
    """Installed normally in site-packages, the plugin is found by Hydra's own discovery (no registration)."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    found = {plugin.__name__ for plugin in Plugins.instance().discover(Launcher)}
    assert {"LocalLauncher", "SlurmLauncher"} <= found


def _last_step(run_dir: Path) -> int:
    import torch

    (last,) = (run_dir / "checkpoints").glob("*-last.ckpt")
    return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.timeout(300)
def test_same_sweep_runs_under_submitit_local(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"  # four jobs at once on a small machine: one thread each
    sweep = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-m", "model.hidden=8,16", *SUBMITIT_OVERRIDES],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        output, _ = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    assert "Submitit 'local' sweep output dir : multirun" in output
    assert "expbus launcher:" not in output  # not ours: submitit's

    exps = tmp_path / "nemo_experiments"
    assert sorted(p.name for p in exps.iterdir()) == sorted(NAMES)
    pids, run_ids = set(), set()
    for name in NAMES:
        run_dir = exps / name  # resume_if_exists: no version folder
        # Checkpoints: top-1 + -last + the .nemo at train end; the right number of steps.
        checkpoints = run_dir / "checkpoints"
        assert len(list(checkpoints.glob("*-last.ckpt"))) == 1
        assert len(list(checkpoints.glob("*.ckpt"))) == 2
        assert (checkpoints / f"{name}.nemo").is_file()
        assert _last_step(run_dir) == 24
        # Its own bus and journal: one run, started in its own process, in this run dir only.
        journal = read_journal(run_dir)
        (started,) = [e for e in journal if isinstance(e, RunStarted)]
        assert Path(started.run_dir) == run_dir
        assert [e.status for e in journal if isinstance(e, RunFinished)] == ["completed"]
        assert max(e.step for e in journal if isinstance(e, Metrics)) == 23  # steps 0..23
        pids.add(started.pid)
        run_ids.add(started.run_id)
        # Its own jsonl sink: every event of this run and none of another's.
        events = [from_json(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert [e.run_id for e in events if isinstance(e, RunStarted)] == [started.run_id]
        assert len(events) == len(journal)
        assert (run_dir / "nemo_log_globalrank-0_localrank-0.txt").is_file()
        assert (run_dir / "nemo_error_log.txt").read_text() == ""
    assert len(pids) == len(NAMES) and sweep.pid not in pids  # one process per job, none the sweep's
    assert len(run_ids) == len(NAMES)
    # submitit's own records: one folder per job, each log ending with the job's line.
    logs = sorted((tmp_path / "multirun" / "submitit").glob("*/*_0_log.out"))
    assert len(logs) == len(NAMES)
    finished = {line.split()[1].rstrip(":") for log in logs for line in log.read_text().splitlines()
                if line.startswith("finished ")}
    assert finished == set(NAMES)


@pytest.mark.timeout(240)
def test_slurm_style_signal_stops_a_submitit_job_cleanly(tmp_path: Path) -> None:
    """SLURM's ``--signal=USR1@120`` reaching a job: expbus's handler wins over submitit's, the job ends cleanly.

    ``SUBMITIT_PREEMPT_SIGNAL=USR1`` moves submitit's own request and handler to ``USR1`` (the
    hardest case: both want the signal); ``exp_manager.preemption_signal=SIGUSR1`` is expbus's side.
    The test sends the signal to the job's process itself, as SLURM would.
    """
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"
    name = "sweep-lr-0.01-h-8"
    max_steps = 10_000_000  # far more than fits in the test: only the signal ends the job
    sweep = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-m", "model.lr=0.01", "model.hidden=8", f"trainer.max_steps={max_steps}",
         "+exp_manager.preemption_signal=SIGUSR1", *SUBMITIT_OVERRIDES],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    run_dir = tmp_path / "nemo_experiments" / name
    try:
        deadline = time.monotonic() + 150
        job_pid = None
        while job_pid is None and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.5)
            if (run_dir / "journal.msgpack").is_file():
                events = read_journal(run_dir)
                if any(isinstance(e, Metrics) for e in events):  # training runs: the handler is installed
                    job_pid = next(e.pid for e in events if isinstance(e, RunStarted))
        assert job_pid is not None and job_pid != sweep.pid, "the job did not start training"
        os.kill(job_pid, signal.SIGUSR1)
        output, _ = sweep.communicate(timeout=60)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output  # the job ended normally
    events = read_journal(run_dir)
    assert [e.status for e in events if isinstance(e, RunFinished)] == ["interrupted"]
    assert 0 < _last_step(run_dir) < max_steps  # -last saved where it stopped
    (log,) = (tmp_path / "multirun" / "submitit").glob("*/*_0_log.out")
    assert "Job completed successfully" in log.read_text()
    assert "Received SIGUSR1" in (run_dir / "nemo_log_globalrank-0_localrank-0.txt").read_text()
