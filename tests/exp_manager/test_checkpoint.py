"""exp_manager's ModelCheckpoint: NeMo's defaults and names, top-k, unfinished markers, monitor null, clear errors."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import exp_manager_test_models as M  # registered by conftest.py
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from expbus.bus import CheckpointRemoved, CheckpointSaved
from expbus.sinks.testing import MemorySink
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.exp_manager._checkpoint import ExpModelCheckpoint, parse_time_interval
from expbus.trainer_bridge.exp_manager._checkpoint_params import CallbackParams
from expbus.trainer_bridge.exp_manager._errors import CheckpointMisconfigurationError
from expbus.trainer_bridge.exp_manager._unfinished import (
    format_checkpoint_unfinished_marker_path,
    is_checkpoint_unfinished,
    set_checkpoint_unfinished_marker,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in M.QUIET]


# -- configuration ---------------------------------------------------------------------------
def test_callback_params_has_nemo_fields_and_defaults() -> None:
    params = CallbackParams()
    assert (params.filepath, params.dirpath, params.filename) == (None, None, None)
    assert (params.monitor, params.verbose, params.save_last, params.save_top_k) == ("val_loss", True, True, 3)
    assert (params.save_weights_only, params.mode, params.auto_insert_metric_name) == (False, "min", True)
    assert (params.every_n_epochs, params.every_n_train_steps, params.train_time_interval) == (1, None, None)
    assert (params.prefix, params.postfix, params.save_best_model, params.always_save_nemo) == (None, ".nemo", False,
                                                                                                  False)
    assert (params.save_nemo_on_train_end, params.model_parallel_size, params.save_on_train_epoch_end) == (True, None,
                                                                                                         False)
    assert (params.async_save, params.save_last_n_optim_states) == (False, -1)
    assert len(CallbackParams.__struct_fields__) == 22


def test_defaults_follow_nemo(tmp_path: Path) -> None:
    trainer = M.make_trainer(tmp_path)
    callback = M.checkpointing(trainer, tmp_path / "log", name="myexp")
    assert callback in trainer.callbacks
    assert Path(callback.dirpath) == (tmp_path / "log" / "checkpoints").resolve()
    assert callback.filename == "myexp--{val_loss:.4f}-{epoch}"
    assert callback.CHECKPOINT_NAME_LAST == "myexp--{val_loss:.4f}-{epoch}-last"
    assert (callback.monitor, callback.mode, callback.save_top_k, callback.save_last) == ("val_loss", "min", 3, True)
    assert callback.every_n_epochs == 1 and callback.prefix == "myexp" and callback.postfix == ".nemo"
    last = callback.format_checkpoint_name({"val_loss": torch.tensor(0.25), "epoch": torch.tensor(3)},
                                           callback.CHECKPOINT_NAME_LAST)
    assert Path(last).name == "myexp--val_loss=0.2500-epoch=3-last.ckpt"


def test_a_trainer_with_its_own_model_checkpoint_is_an_error(tmp_path: Path) -> None:
    trainer = M.make_trainer(tmp_path, enable_checkpointing=True)
    with pytest.raises(CheckpointMisconfigurationError, match="enable_checkpointing=False"):
        M.checkpointing(trainer, tmp_path)
    M.checkpointing(M.make_trainer(tmp_path), tmp_path)  # without one it works


def test_deprecated_filepath_fills_dirpath_and_filename(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="expbus.exp_manager"):
        callback = M.checkpointing(M.make_trainer(tmp_path), tmp_path, filepath=str(tmp_path / "ck" / "model"))
    assert "filepath is deprecated" in caplog.text
    assert Path(callback.dirpath) == (tmp_path / "ck").resolve() and callback.filename == "model"
    # Explicit dirpath/filename win over the deprecated key (NeMo's rule).
    callback = M.checkpointing(M.make_trainer(tmp_path), tmp_path, filepath=str(tmp_path / "ck" / "model"),
                               dirpath=str(tmp_path / "mine"), filename="{epoch}")
    assert Path(callback.dirpath) == (tmp_path / "mine").resolve() and callback.filename == "{epoch}"


def test_nemo_only_keys_are_accepted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="expbus.exp_manager"):
        M.checkpointing(M.make_trainer(tmp_path), tmp_path, model_parallel_size=8, async_save=True,
                        save_last_n_optim_states=2)
    for key in ("model_parallel_size", "async_save", "save_last_n_optim_states"):
        assert key in caplog.text


def test_step_and_epoch_triggers_together_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointMisconfigurationError, match="every_n_epochs: 0"):
        M.checkpointing(M.make_trainer(tmp_path), tmp_path, every_n_train_steps=10)
    callback = M.checkpointing(M.make_trainer(tmp_path), tmp_path, every_n_train_steps=10, every_n_epochs=0)
    assert callback._every_n_train_steps == 10


@pytest.mark.parametrize(("value", "expected"), [
    (90, timedelta(seconds=90)),
    ("00:30:00", timedelta(minutes=30)),
    ("01:02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ({"_target_": "datetime.timedelta", "minutes": 5}, timedelta(minutes=5)),
    ({"hours": 1}, timedelta(hours=1)),
    (timedelta(seconds=3), timedelta(seconds=3)),
    (None, None),
])
def test_train_time_interval_forms(value: Any, expected: timedelta | None) -> None:
    assert parse_time_interval(value) == expected


def test_bad_train_time_interval_names_the_key() -> None:
    with pytest.raises(CheckpointMisconfigurationError, match="train_time_interval"):
        parse_time_interval("soon")


def test_a_monitor_with_a_slash_does_not_create_folders(tmp_path: Path) -> None:
    callback = M.checkpointing(M.make_trainer(tmp_path), tmp_path, monitor="val/loss_ctc")
    name = callback.format_checkpoint_name({"val/loss_ctc": torch.tensor(0.5), "epoch": torch.tensor(1)})
    assert Path(name).name == "default--val_loss_ctc=0.5000-epoch=1.ckpt"


# -- markers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "marker"), [
    ("a=1_b=1.c.d.e", "a=1_b=1.c.d.e-unfinished"),
    ("a=1_b=1.c.d.e-last", "a=1_b=1.c.d.e-last-unfinished"),
    (".ckpt/a=1_b=1.c.d.e.ckpt", ".ckpt/a=1_b=1.c.d.e-unfinished"),
    (".ckpt/a=1_b=1.c.d.e-EMA.ckpt", ".ckpt/a=1_b=1.c.d.e-unfinished"),
    (".ckpt/a=1_b=1.c.d.e-last.ckpt", ".ckpt/a=1_b=1.c.d.e-last-unfinished"),
    ("nemo/a=1_b=1.c.d.e.nemo", "nemo/a=1_b=1.c.d.e-unfinished"),
    ("nemo/a=1_b=1.c.d.e-last.nemo", "nemo/a=1_b=1.c.d.e-last-unfinished"),
])
def test_marker_paths_follow_nemo(path: str, marker: str) -> None:
    assert str(format_checkpoint_unfinished_marker_path(path)) == marker
    assert str(ExpModelCheckpoint.format_checkpoint_unfinished_marker_path(path)) == marker


class _MarkerProbe(TorchCheckpointIO):
    """Records whether the checkpoint's marker existed while it was written and removed."""

    def __init__(self) -> None:
        super().__init__()
        self.during_save: list[bool] = []
        self.during_remove: list[bool] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.during_save.append(is_checkpoint_unfinished(path))
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.during_remove.append(is_checkpoint_unfinished(path))
        super().remove_checkpoint(path)


def test_every_save_and_removal_is_inside_a_marker(tmp_path: Path) -> None:
    probe = _MarkerProbe()
    trainer = M.make_trainer(tmp_path, max_epochs=5, plugins=[probe])
    M.checkpointing(trainer, tmp_path, save_top_k=2)
    trainer.fit(M.ExampleModel())
    assert probe.during_save and all(probe.during_save)
    assert probe.during_remove and all(probe.during_remove)
    assert M.markers(tmp_path / "checkpoints") == []


def test_unfinished_checkpoints_and_orphan_markers_are_removed_at_setup(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    complete = {folder / "step=1-epoch=0.ckpt", folder / "step=2-epoch=0-last.ckpt"}
    incomplete = {folder / "step=11-epoch=1.ckpt", folder / "step=12-epoch=1-last.ckpt"}
    for path in complete:
        M.write_fake_checkpoint(path, isdir=False, unfinished=False)
    for path in incomplete:
        M.write_fake_checkpoint(path, isdir=False, unfinished=True)
    (folder / "orphan-marker001--unfinished").touch()
    # An unfinished checkpoint with its EMA twin: both go. Only an EMA twin, with the shared marker: it goes.
    M.write_fake_checkpoint(folder / "incomplete01-EMA.ckpt", isdir=False, unfinished=False)
    M.write_fake_checkpoint(folder / "incomplete01.ckpt", isdir=False, unfinished=True)
    M.write_fake_checkpoint(folder / "incomplete02-EMA.ckpt", isdir=False, unfinished=False)
    (folder / "incomplete02-unfinished").touch()
    # Directory checkpoints, NeMo's form (x/) and Lightning's (x.ckpt/).
    complete_dirs = {folder / "step=5-epoch=0", folder / "step=6-epoch=0-last.ckpt"}
    for path in complete_dirs:
        M.write_fake_checkpoint(path, isdir=True, unfinished=False)
    for path in (folder / "step=15-epoch=1", folder / "step=16-epoch=1-last", folder / "step=17-epoch=1.ckpt"):
        M.write_fake_checkpoint(path, isdir=True, unfinished=True)

    trainer = M.make_trainer(tmp_path, max_epochs=1)
    M.checkpointing(trainer, tmp_path, save_top_k=0, save_last=False, save_nemo_on_train_end=False)
    trainer.fit(M.ExampleModel())

    assert {p for p in folder.rglob("*.ckpt") if p.is_file()} == complete
    assert {p for p in folder.iterdir() if p.is_dir()} == complete_dirs
    assert M.markers(folder) == []


def test_topk_with_a_deleted_and_an_unfinished_entry(tmp_path: Path) -> None:
    """NeMo's test_invalid_checkpoints_removed_from_topk."""
    folder = tmp_path / "checkpoints"
    params = {"save_top_k": 3, "save_last": True, "mode": "max", "monitor": "epoch", "filename": "{epoch}"}
    trainer = M.make_trainer(tmp_path, max_epochs=7)
    M.checkpointing(trainer, tmp_path, **params)
    trainer.fit(M.ExampleModel())
    assert M.names(folder) == {"epoch=7-last.ckpt", "epoch=6.ckpt", "epoch=5.ckpt", "epoch=4.ckpt"}

    # Epoch 6 unfinished, epoch 5 deleted: the only valid earlier top-k entry is epoch 4.
    set_checkpoint_unfinished_marker(folder / "epoch=6.ckpt")
    (folder / "epoch=5.ckpt").unlink()
    trainer = M.make_trainer(tmp_path, max_epochs=9)
    trainer.ckpt_path = str(folder / "epoch=7-last.ckpt")
    callback = M.checkpointing(trainer, tmp_path, resume=True, **params)
    trainer.fit(M.ExampleModel())
    assert M.names(folder) == {"epoch=9-last.ckpt", "epoch=8.ckpt", "epoch=7.ckpt", "epoch=4.ckpt"}
    assert sorted(Path(p).name for p in callback.best_k_models) == ["epoch=4.ckpt", "epoch=7.ckpt", "epoch=8.ckpt"]
    assert Path(callback.best_model_path).name == "epoch=8.ckpt"


def test_topk_is_rebuilt_from_file_names_on_resume(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for value in ("0.5000", "0.2000", "0.9000", "0.1000"):
        M.write_fake_checkpoint(folder / f"default--val_loss={value}-epoch=1.ckpt", isdir=False, unfinished=False)
    M.write_fake_checkpoint(folder / "default--val_loss=0.0100-epoch=1.ckpt", isdir=False, unfinished=True)
    M.write_fake_checkpoint(folder / "default--val_loss=0.0500-epoch=1-last.ckpt", isdir=False, unfinished=False)
    M.write_fake_checkpoint(folder / "default--val_loss=0.0200-epoch=1-EMA.ckpt", isdir=False, unfinished=False)
    trainer = M.make_trainer(tmp_path, max_epochs=1)
    callback = M.checkpointing(trainer, tmp_path, resume=True, save_top_k=3)
    callback.setup(trainer, M.ExampleModel(), "fit")
    kept = {Path(p).name: round(float(v), 4) for p, v in callback.best_k_models.items()}
    assert kept == {"default--val_loss=0.1000-epoch=1.ckpt": 0.1, "default--val_loss=0.2000-epoch=1.ckpt": 0.2,
                    "default--val_loss=0.5000-epoch=1.ckpt": 0.5}
    assert Path(callback.best_model_path).name == "default--val_loss=0.1000-epoch=1.ckpt"
    assert Path(callback.kth_best_model_path).name == "default--val_loss=0.5000-epoch=1.ckpt"
    # Beyond save_top_k (0.9) and unfinished (0.01) are gone; -last and -EMA are untouched.
    assert M.names(folder) == {*kept, "default--val_loss=0.0500-epoch=1-last.ckpt",
                               "default--val_loss=0.0200-epoch=1-EMA.ckpt"}


def test_save_top_k_one_keeps_the_best_and_last(tmp_path: Path) -> None:
    """NeMo's test_nemo_checkpoint_restore_model, first half."""
    trainer = M.make_trainer(tmp_path, max_epochs=4)
    M.checkpointing(trainer, tmp_path, save_top_k=1, save_last=True)
    model = M.ExampleModel()
    trainer.fit(model)
    assert M.names(tmp_path / "checkpoints") == {"default--val_loss=0.0000-epoch=1.ckpt",
                                                 "default--val_loss=0.0300-epoch=4-last.ckpt"}
    assert abs(model.output_on_ones() - 0.03) < 1e-5


# -- monitor ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("save_top_k", "expected"), [
    (-1, {"default--epoch=0-step=2.ckpt", "default--epoch=0-step=4.ckpt", "default--epoch=0-step=6.ckpt",
          "default--epoch=0-step=8.ckpt"}),
    (1, {"default--epoch=0-step=8.ckpt"}),
    (3, {"default--epoch=0-step=4.ckpt", "default--epoch=0-step=6.ckpt", "default--epoch=0-step=8.ckpt"}),
])
def test_monitor_null_saves_every_n_steps(tmp_path: Path, save_top_k: int, expected: set[str]) -> None:
    trainer = M.make_trainer(tmp_path, max_steps=8, limit_val_batches=0)
    M.checkpointing(trainer, tmp_path, monitor=None, every_n_train_steps=2, every_n_epochs=0, save_top_k=save_top_k,
                    save_nemo_on_train_end=False)
    trainer.fit(M.ExampleModel(train_len=16, batch_size=1))
    # At train end the epoch counter has moved on: -last is rewritten under its final name (as NeMo does).
    assert M.names(tmp_path / "checkpoints") == expected | {"default--epoch=1-step=8-last.ckpt"}


def test_monitor_null_saves_every_epoch_without_validation(tmp_path: Path) -> None:
    trainer = M.make_trainer(tmp_path, max_epochs=3)
    M.checkpointing(trainer, tmp_path, monitor=None, save_top_k=-1, save_nemo_on_train_end=False)
    trainer.fit(M.NoValidationModel())
    assert M.names(tmp_path / "checkpoints") == {"default--epoch=0-step=1.ckpt", "default--epoch=1-step=2.ckpt",
                                                 "default--epoch=2-step=3.ckpt", "default--epoch=3-step=3-last.ckpt"}


def test_a_training_metric_is_ranked_without_validation(tmp_path: Path) -> None:
    trainer = M.make_trainer(tmp_path, max_epochs=3)
    M.checkpointing(trainer, tmp_path, monitor="train_loss", save_top_k=1, save_nemo_on_train_end=False)
    trainer.fit(M.NoValidationModel())
    assert M.names(tmp_path / "checkpoints") == {"default--train_loss=0.0000-epoch=2.ckpt",
                                                 "default--train_loss=0.0000-epoch=3-last.ckpt"}


def test_a_missing_monitored_metric_is_one_clear_error(tmp_path: Path) -> None:
    trainer = M.make_trainer(tmp_path, max_epochs=2)
    M.checkpointing(trainer, tmp_path, monitor="val_los")
    with pytest.raises(CheckpointMisconfigurationError) as info:
        trainer.fit(M.ExampleModel())
    message = str(info.value)
    assert "'val_los' was not logged" in message
    assert "did you mean 'val_loss'?" in message
    assert "['train_loss', 'val_loss']" in message
    assert "monitor: null" in message


def test_a_missing_metric_without_validation_fails_at_the_first_epoch(tmp_path: Path) -> None:
    trainer = M.make_trainer(tmp_path, max_epochs=2)
    M.checkpointing(trainer, tmp_path)  # NeMo's default monitor val_loss
    with pytest.raises(CheckpointMisconfigurationError, match=r"'val_loss' was not logged.*\['train_loss'\]"):
        trainer.fit(M.NoValidationModel())
    assert trainer.global_step == 1


# -- directories, EMA twins, events ------------------------------------------------------------
def test_directory_checkpoints_are_pruned_resumed_and_replaced(tmp_path: Path) -> None:
    from expbus.trainer_bridge.exp_manager._resume import check_resume

    folder = tmp_path / "checkpoints"
    trainer = M.make_trainer(tmp_path, max_epochs=4, plugins=[M.DirCheckpointIO()])
    M.checkpointing(trainer, tmp_path, save_top_k=2, save_nemo_on_train_end=False)
    trainer.fit(M.ExampleModel())
    assert {p.name for p in folder.iterdir()} == {"default--val_loss=0.0000-epoch=1", "default--val_loss=0.0300-epoch=2",
                                                  "default--val_loss=0.0300-epoch=4-last"}
    assert all((folder / name).is_dir() for name in M.names(folder, "*"))

    trainer = M.make_trainer(tmp_path, max_epochs=5, plugins=[M.DirCheckpointIO()])
    check_resume(trainer, tmp_path, resume_if_exists=True)
    assert Path(str(trainer.ckpt_path)).name == "default--val_loss=0.0300-epoch=4-last"
    callback = M.checkpointing(trainer, tmp_path, resume=True, save_top_k=2, save_nemo_on_train_end=False)
    trainer.fit(M.DoNothingModel())
    assert trainer.global_step == 5
    assert {p.name for p in folder.iterdir()} == {"default--val_loss=0.0000-epoch=1", "default--val_loss=0.0300-epoch=2",
                                                  "default--val_loss=0.0300-epoch=5-last"}
    assert Path(callback.best_model_path).name == "default--val_loss=0.0000-epoch=1.ckpt"


def test_ema_twins_are_removed_with_their_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    trainer = M.make_trainer(tmp_path, max_epochs=4, plugins=[M.EmaTwinCheckpointIO()])
    M.checkpointing(trainer, tmp_path, save_top_k=1, save_nemo_on_train_end=False)
    trainer.fit(M.ExampleModel())
    assert M.names(folder) == {"default--val_loss=0.0000-epoch=1.ckpt", "default--val_loss=0.0000-epoch=1-EMA.ckpt",
                               "default--val_loss=0.0300-epoch=4-last.ckpt"}


class _EmaWriter(pl.Callback):
    """The EMA hook: writes the twin through trainer.save_checkpoint, noting whether the shared marker is up."""

    def __init__(self) -> None:
        self.marked: list[bool] = []

    def save_ema_checkpoint(self, trainer: pl.Trainer, path: str) -> None:
        self.marked.append(is_checkpoint_unfinished(path))
        trainer.save_checkpoint(path)


def test_an_ema_callback_writes_twins_under_the_shared_marker(tmp_path: Path) -> None:
    ema = _EmaWriter()
    trainer = M.make_trainer(tmp_path, max_epochs=4, callbacks=[ema])
    M.checkpointing(trainer, tmp_path, save_top_k=1, save_nemo_on_train_end=False)
    trainer.fit(M.ExampleModel())
    assert ema.marked and all(ema.marked)
    assert M.names(tmp_path / "checkpoints") == {
        "default--val_loss=0.0000-epoch=1.ckpt", "default--val_loss=0.0000-epoch=1-EMA.ckpt",
        "default--val_loss=0.0300-epoch=4-last.ckpt", "default--val_loss=0.0300-epoch=4-last-EMA.ckpt"}
    assert M.markers(tmp_path / "checkpoints") == []


def test_saves_removals_and_the_export_reach_the_bus(tmp_path: Path) -> None:
    memory = MemorySink()
    bridge = BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})
    trainer = M.make_trainer(tmp_path, max_epochs=4, callbacks=[bridge])
    M.checkpointing(trainer, tmp_path, save_top_k=1)
    trainer.fit(M.ExampleModel())
    saved = [e for e in memory.events if isinstance(e, CheckpointSaved)]
    removed = {e.path for e in memory.events if isinstance(e, CheckpointRemoved)}
    on_disk = {str(p) for p in (tmp_path / "checkpoints").iterdir()}
    assert {e.path for e in saved} - removed == on_disk
    export = [e for e in saved if e.path.endswith("default.nemo")]
    assert len(export) == 1 and export[0].step == 4 and export[0].size_bytes == (tmp_path / "checkpoints" /
                                                                                 "default.nemo").stat().st_size


def test_model_checkpoint_subclass_is_a_model_checkpoint(tmp_path: Path) -> None:
    callback = M.checkpointing(M.make_trainer(tmp_path), tmp_path)
    assert isinstance(callback, ModelCheckpoint) and isinstance(callback, pl.Callback)
