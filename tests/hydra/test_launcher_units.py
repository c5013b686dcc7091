"""The launcher's parts without a sweep: slots, the child's command and environment, the summary, the runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")

from hydra_plugins.expbus_launcher._jobs import Job, child_command, child_env
from hydra_plugins.expbus_launcher._report import StatusLine, failure, summary_table
from hydra_plugins.expbus_launcher._slots import plan_slots


def test_gpu_slots_interleave_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [s.label for s in plan_slots(-1, 2, None)] == ["gpu3", "gpu5", "gpu3", "gpu5"]
    assert [s.label for s in plan_slots(1, 1, None)] == ["gpu3"]
    assert [s.label for s in plan_slots(0, 1, 2)] == ["cpu0", "cpu1"]


def test_cpu_slots_default_to_half_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert len(plan_slots(-1, 1, None)) == 4
    with pytest.raises(ValueError, match="cpu_slots"):
        plan_slots(-1, 1, 0)


def test_child_command_drops_the_sweep_keys_and_pins_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if started as `python train.py -m ...` (pytest itself may run as `python -m pytest`).
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model.lr=0.1,0.2"])
    overrides = ["model.lr=0.1", "hydra.run.dir=out", "hydra.sweep.dir=x", "trainer.devices=[0,1]",
                 "hydra.job.env_set.A=1"]
    cmd = child_command(3, overrides, pin_devices=True)
    assert "-m" not in cmd and "--multirun" not in cmd
    assert cmd[-1] == "hydra.job.num=3"
    assert "model.lr=0.1" in cmd and "hydra.job.env_set.A=1" in cmd and "++trainer.devices=1" in cmd
    assert not any(a.startswith(("hydra.run.", "hydra.sweep.", "trainer.devices=")) for a in cmd)


def test_child_env_honours_env_set_and_keeps_cpu_jobs_off_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEMO_EXPM_VERSION", "v1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = child_env({"FOO": 1}, gpu=None, gpus_exist=True, threads=2)
    assert env["FOO"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"
    assert "NEMO_EXPM_VERSION" not in env  # every job is its own run
    assert child_env({}, gpu="1", gpus_exist=True, threads=None)["CUDA_VISIBLE_DEVICES"] == "1"


def test_summary_and_failure_name_the_job(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: boom\n")
    ok = Job(0, ["a=1"], [], {}, tmp_path / "ok.log", tmp_path / "c.yaml", returncode=0, seconds=1.5, slot="cpu0")
    bad = Job(1, ["a=2", "hydra.x=1"], [], {}, log, tmp_path / "c.yaml", returncode=3, seconds=2.0, slot="cpu1")
    queued = Job(2, ["a=3"], [], {}, tmp_path / "q.log", tmp_path / "c.yaml")
    table = summary_table([ok, bad, queued]).splitlines()
    assert table[0].split() == ["job", "overrides", "status", "rc", "duration", "log"]
    assert table[3].split()[:4] == ["1", "a=2", "failed", "3"]
    assert table[4].split()[:3] == ["2", "a=3", "queued"]
    message = str(failure(bad, 5))
    assert "Process Return code : 3" in message and "RuntimeError: boom" in message and "line 94" not in message
    assert StatusLine().text([ok, bad, queued]).startswith("[expbus sweep] running 0 | done 1 | failed 1 | queued 1")


def test_runner_restores_the_version_variable_between_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from expbus.trainer_bridge.hydra_runner import _job_environment

    monkeypatch.delenv("NEMO_EXPM_VERSION", raising=False)
    with _job_environment():
        os.environ["NEMO_EXPM_VERSION"] = "job-1"
    assert "NEMO_EXPM_VERSION" not in os.environ
