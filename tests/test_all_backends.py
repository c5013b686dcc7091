"""One real CPU training run with all five backend sinks plus jsonl and dllogger, read back with each backend's own reader."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from expbus.bus import CheckpointSaved, Metrics, RunFinished, from_json, read_journal
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression

pytestmark = [
    pytest.mark.slow,
    # ClearML's vendored pyhocon and MLflow's sqlalchemy models warn on import: noise, not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

Series = dict[str, list[tuple[int, float]]]


def _series(points: list[tuple[int, dict[str, Any]]]) -> Series:
    out: Series = defaultdict(list)
    for step, values in points:
        for name, value in values.items():
            out[name].append((step, float(value)))
    return {name: sorted(pts) for name, pts in out.items()}


def _same(expected: Series, got: Series, *, rel: float = 1e-9, names: set[str] | None = None) -> None:
    for name in names or set(expected):
        want = expected[name]
        have = got.get(name, [])
        assert [s for s, _ in have] == [s for s, _ in want], f"{name}: steps differ"
        for (_, a), (_, b) in zip(have, want, strict=True):
            assert a == pytest.approx(b, rel=rel), name


@pytest.fixture
def contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every client's files under tmp_path; everything offline."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    for name in ("NEPTUNE_MODE", "NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT", "CLEARML_API_HOST", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.timeout(300)
def test_every_backend_holds_every_point(contained: Path) -> None:
    tmp = contained
    run_dir = tmp / "exp" / "all_backends" / "v0"
    mlflow_db = tmp / "exp" / "mlflow.db"
    config = {
        "run_dir": str(run_dir),
        "sinks": {
            "tb": {"type": "tensorboard"},
            "mlflow": {"type": "mlflow", "tracking_uri": f"sqlite:///{mlflow_db}", "experiment_name": "all",
                       "log_model": "all"},
            "wandb": {"type": "wandb", "project": "expbus-test", "offline": True, "log_model": "all"},
            "clearml": {"type": "clearml", "project": "expbus-test", "log_model": True},
            "neptune": {"type": "neptune", "mode": "offline", "log_model_checkpoints": True},
            "jsonl": {"type": "jsonl"},
            "dllogger": {"type": "dllogger", "json_file": "dllogger.json"},
        },
    }
    bridge = BridgeCallback(config)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val_loss", save_top_k=2, save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=60, log_every_n_steps=5, val_check_interval=20, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[bridge, checkpoint],
        default_root_dir=run_dir,
    )
    trainer.fit(DemoRegressor(lr=0.02), datamodule=SyntheticRegression(batch_size=16, train_size=640, val_size=64))

    # Health: every sink delivered everything, nothing dropped, nothing failed.
    stats = bridge.last_stats
    assert set(stats) == set(config["sinks"])
    for sink_id, health in stats.items():
        assert health.dropped == 0 and health.failed == 0 and health.errors == 0, (sink_id, health)
        assert health.state == "closed", (sink_id, health)

    # The journal is the record of truth: what every backend must hold.
    events = read_journal(run_dir)
    assert isinstance(events[-1], RunFinished) and events[-1].status == "completed"
    metrics = [e for e in events if isinstance(e, Metrics)]
    expected = _series([(e.step, e.values) for e in metrics])
    logged = {"train_loss_step", "train_loss_epoch", "val_loss"}
    assert logged <= set(expected)
    assert len(expected["train_loss_step"]) == 12  # steps 4, 9, ..., 59
    checkpoints = [Path(e.path) for e in events if isinstance(e, CheckpointSaved)]
    # Uploads run in the sink workers, so a checkpoint pruned by top-k within a fraction of a
    # second may be gone before its upload: every checkpoint left at the end must be uploaded.
    surviving = {p for p in checkpoints if p.exists()}
    assert surviving

    # jsonl: every event, identical to the journal.
    lines = (run_dir / "events.jsonl").read_bytes().splitlines()
    assert [from_json(line) for line in lines] == events

    # dllogger: every metric at every step.
    dll_points = []
    for line in (run_dir / "dllogger.json").read_text().splitlines():
        record = json.loads(line.removeprefix("DLLL "))
        if record["type"] == "LOG" and isinstance(record["step"], int):
            dll_points.append((record["step"], {k: v for k, v in record["data"].items() if k != "epoch"}))
    _same(expected, _series(dll_points))

    # TensorBoard, with its own EventAccumulator (float32 storage).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tb = {name: [(s.step, s.value) for s in accumulator.Scalars(name)] for name in accumulator.Tags()["scalars"]}
    _same(expected, tb, rel=1e-6)
    assert (run_dir / "hparams.yaml").read_text().count("lr: 0.02") == 1

    # MLflow, through MlflowClient on the sqlite store.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    (run,) = client.search_runs([client.get_experiment_by_name("all").experiment_id])
    ml = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] for name in expected}
    _same(expected, ml)
    assert run.data.params["lr"] == "0.02" and run.info.status == "FINISHED"
    # log_model: all uploads each checkpoint under its own name (its file stem).
    artifact_dirs = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {p.stem for p in surviving} <= artifact_dirs

    # W&B, from its offline run files.
    from expbus.sinks.wandb import read_offline_runs as read_wandb

    (wb,) = read_wandb(run_dir)
    _same(expected, _series([(s, {k: v for k, v in vals.items() if k != "epoch"}) for s, vals in wb.points()]))
    assert wb.config["lr"] == 0.02
    assert len([a for a in wb.artifacts if a["type"] == "model"]) >= len(surviving)

    # ClearML, from its offline session.
    from expbus.sinks.clearml import read_offline_sessions

    (session,) = read_offline_sessions(run_dir)
    _same(expected, _series(session.points()))
    assert session.hyperparams()["lr"] == "0.02"
    assert any(name.startswith("models/") for name in session.files), "log_model uploads the checkpoint"

    # Neptune, from its offline data.
    from neptune.internal.operation import AssignFloat, UploadFile

    from expbus.sinks.neptune import offline_points_by_step, read_offline_runs

    (operations,) = read_offline_runs(run_dir / ".neptune").values()
    _same(expected, _series(offline_points_by_step(operations)))
    hparams = {"/".join(op.path): op.value for op in operations if isinstance(op, AssignFloat)}
    assert math.isclose(hparams["training/hyperparams/lr"], 0.02)
    assert any(isinstance(op, UploadFile) for op in operations)
