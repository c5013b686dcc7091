"""The ``expbus`` command line: ``demo`` (in a subprocess), ``sinks`` and ``journal``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from expbus._cli import main
from expbus.bus import CheckpointSaved, Hyperparams, Metrics, RunFinished, RunStarted, read_journal

REPO_ROOT = Path(__file__).resolve().parents[2]


def _expbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "expbus", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=100)


def _one_run_dir(out: Path) -> Path:
    runs = list((out / "expbus_demo").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_demo_with_the_default_sinks(tmp_path: Path) -> None:
    proc = _expbus("demo", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = _one_run_dir(tmp_path / "out")
    assert run_dir.name[:4].isdigit()  # a datetime version
    for name in ("journal.msgpack", "events.jsonl", "dllogger.json", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert str(run_dir) in proc.stdout and "journal.msgpack" in proc.stdout
    for sink_id in ("jsonl", "dllogger", "csv", "tensorboard", "mlflow"):
        assert f"{sink_id}: closed delivered=" in proc.stdout and f"{sink_id}: closed delivered=0 " not in proc.stdout
    events = read_journal(run_dir)
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    assert events[-1].status == "completed" and events[-1].step == 200
    train_steps = [e.step for e in events if isinstance(e, Metrics) and "train_loss_step" in e.values]
    assert train_steps and train_steps == sorted(train_steps)
    # TensorBoard (read back with its own reader) and MLflow (sqlite in exp_dir) hold every point.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("train_loss_step")] == train_steps
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("expbus_demo")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")] == train_steps


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_demo_with_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "expbus.yaml"
    config.write_text("name: mine\nsinks:\n  lines:\n    type: jsonl\n    path: out/lines.jsonl\n")
    proc = _expbus("demo", "--config", str(config), "--out", str(tmp_path / "exps"), "--steps", "40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "exps" / "mine").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    assert (run_dir / "out" / "lines.jsonl").is_file()
    assert not (run_dir / "dllogger.json").exists()  # the file's sinks replace the defaults
    kinds = {type(e) for e in read_journal(run_dir)}
    assert {RunStarted, Hyperparams, Metrics, CheckpointSaved, RunFinished} <= kinds
    assert "lines: closed" in proc.stdout


def test_demo_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("sinks:\n  lines:\n    type: jsonl\n    pth: x\n")
    assert main(["demo", "--config", str(config), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sinks.lines.pth" in err and "path" in err
    assert main(["demo", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_sinks_lists_the_registered_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sinks"]) == 0
    out = capsys.readouterr().out
    assert "jsonl" in out and "expbus.sinks.jsonl:JsonlSink" in out
    assert "memory" in out


def test_journal_summarises_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from expbus.bus import Bus, now

    with Bus(tmp_path / "run", run_id="r1") as bus:
        bus.publish(RunStarted(time=now(), run_id="r1", host="h", pid=1))
        for step in range(3):
            bus.publish(Metrics(time=now(), step=step, values={"loss": 1.0 / (step + 1)}))
        bus.publish(RunFinished(time=now(), status="failed", error="ValueError: boom"))
    with (tmp_path / "run" / "journal.msgpack").open("ab") as fh:
        fh.write(b"torn tail")
    assert main(["journal", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "records: 5" in out
    assert "skipped bytes: 9" in out
    assert "metrics" in out and " 3" in out
    assert "run r1: failed (ValueError: boom)" in out
    assert main(["journal", str(tmp_path / "nothing")]) == 2


def test_python_dash_m_expbus_help(tmp_path: Path) -> None:
    proc = _expbus("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "journal" in proc.stdout and "sinks" in proc.stdout


@pytest.mark.slow
def test_run_demo_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from expbus.trainer_bridge import run_demo

    config = tmp_path / "c.yaml"
    config.write_text("expbus:\n  version: v0\n  sinks:\n    events:\n      type: jsonl\n")
    run_dir = run_demo(config, tmp_path / "exps", max_steps=64)
    assert run_dir == (tmp_path / "exps" / "expbus_demo" / "v0").absolute()
    assert (run_dir / "events.jsonl").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    out = capsys.readouterr().out
    assert "events: closed" in out and "checkpoints/last.ckpt" in out
