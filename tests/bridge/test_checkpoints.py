"""Checkpoint events: every save names a file that was written, every removal one that is gone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from expbus.bus import CheckpointRemoved, CheckpointSaved, Metrics, RunFinished, read_journal
from expbus.sinks.testing import MemorySink
from expbus.trainer_bridge import BridgeCallback

pytestmark = pytest.mark.slow


class _ExistenceProbe(pl.Callback):
    """Records, at every hook after ModelCheckpoint ran, which checkpoint files exist."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def _look(self, trainer: pl.Trainer) -> None:
        for cb in trainer.checkpoint_callbacks:
            assert isinstance(cb, ModelCheckpoint)
            for path in [*cb.best_k_models, cb.last_model_path, cb.best_model_path]:
                if path and os.path.exists(path):
                    self.seen.add(str(path))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._look(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._look(trainer)


def test_saves_and_removals_of_model_checkpoint(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    run_dir = tmp_path / "run"
    memory = MemorySink()
    bridge = BridgeCallback(run_dir=run_dir, sinks={"mem": memory})
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val_loss", save_top_k=2, save_last=True,
                                 filename="m-{epoch}-{step}")
    probe = _ExistenceProbe()
    model, data = tiny()
    make_trainer([bridge, checkpoint, probe], max_steps=40).fit(model, datamodule=data)

    events = memory.events
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    removed = [e for e in events if isinstance(e, CheckpointRemoved)]
    on_disk = {str(p) for p in (run_dir / "checkpoints").iterdir()}

    # 5 validations: each saves a top-k candidate (while in the top 2) and last.ckpt.
    last = str(run_dir / "checkpoints" / "last.ckpt")
    last_saves = [e for e in saved if e.path == last]
    assert len(last_saves) == 5
    assert all(e.is_last and e.monitor == "val_loss" for e in last_saves)
    assert [e.step for e in last_saves] == [8, 16, 24, 32, 40]
    # Every saved file existed; every removed one is gone and had been saved before.
    assert {e.path for e in saved} <= probe.seen | on_disk
    for event in removed:
        assert not os.path.exists(event.path)
        assert event.path in {e.path for e in saved}
        assert events.index(event) > max(i for i, e in enumerate(events) if getattr(e, "path", None) == event.path
                                          and isinstance(e, CheckpointSaved))
    # What was saved and not removed is exactly what is on disk now, with the size last reported.
    remaining = {e.path for e in saved} - {e.path for e in removed}
    assert remaining == on_disk
    for path in remaining:
        assert [e for e in saved if e.path == path][-1].size_bytes == os.path.getsize(path)
    # The top-k files carry their score; the best is flagged.
    val_losses = {e.step: e.values["val_loss"] for e in events if isinstance(e, Metrics) and "val_loss" in e.values}
    for event in saved:
        if not event.is_last:
            assert event.monitor_value == pytest.approx(val_losses[event.step - 1])
    best = [e for e in saved if e.path == checkpoint.best_model_path]
    assert best and best[-1].is_best
    assert isinstance(events[-1], RunFinished)
    # The journal has the same checkpoint story.
    kinds = (CheckpointSaved, CheckpointRemoved)
    assert [e for e in read_journal(run_dir) if isinstance(e, kinds)] == [e for e in events if isinstance(e, kinds)]


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
@pytest.mark.filterwarnings("ignore:.*could not find the monitored key")
def test_a_resumed_run_does_not_report_old_checkpoints_as_new(tmp_path: Path, make_trainer: Any,
                                                                tiny: Any) -> None:
    run_dir = tmp_path / "run"

    def fit(max_steps: int, ckpt_path: str | None) -> list[Any]:
        memory = MemorySink()
        checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val_loss", save_top_k=1,
                                     save_last=True, filename="m-{step}")
        model, data = tiny()
        make_trainer([BridgeCallback(run_dir=run_dir, sinks={"mem": memory}), checkpoint],
                     max_steps=max_steps).fit(model, datamodule=data, ckpt_path=ckpt_path)
        return memory.events

    fit(16, None)
    events = fit(24, str(run_dir / "checkpoints" / "last.ckpt"))
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert {e.step for e in saved} == {24}
    for event in (e for e in events if isinstance(e, CheckpointRemoved)):
        assert not os.path.exists(event.path)


def test_a_manual_save_is_reported(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    memory = MemorySink()
    target = tmp_path / "manual.ckpt"

    class SavesOnce(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(target)

    model, data = tiny()
    make_trainer([BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory}), SavesOnce()],
                 max_steps=10).fit(model, datamodule=data)
    saved = [e for e in memory.events if isinstance(e, CheckpointSaved)]
    assert [(e.path, e.step, e.monitor, e.size_bytes) for e in saved] == [
        (str(target), 8, None, os.path.getsize(target))
    ]
