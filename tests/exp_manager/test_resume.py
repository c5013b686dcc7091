"""Resume: NeMo's check_resume matrix, unfinished last checkpoints, and a resumed run continuing at the next step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import exp_manager_test_models as M  # registered by conftest.py
import lightning.pytorch as pl
import pytest
import torch

from expbus.trainer_bridge.exp_manager._errors import NotFoundError
from expbus.trainer_bridge.exp_manager._resume import check_resume

pytestmark = [pytest.mark.filterwarnings(w) for w in M.QUIET]


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


# -- the matrix (NeMo's test_resume, through check_resume) -----------------------------------
def test_no_checkpoint_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="Cannot resume"):
        check_resume(_trainer(), tmp_path / "does_not_exist", resume_if_exists=True)


def test_ignoring_a_missing_checkpoint_trains_from_scratch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = _trainer()
    with caplog.at_level(logging.WARNING, logger="expbus.exp_manager"):
        check_resume(trainer, tmp_path, resume_if_exists=True, resume_ignore_no_checkpoint=True)
    assert "Training from scratch." in caplog.text
    assert trainer.ckpt_path is None


def test_an_empty_checkpoint_folder_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(NotFoundError):
        check_resume(_trainer(), tmp_path, resume_if_exists=True)


def test_an_end_checkpoint_means_the_run_is_complete(tmp_path: Path) -> None:
    end = tmp_path / "checkpoints" / "mymodel--end.ckpt"
    M.write_fake_checkpoint(end, isdir=False, unfinished=False)
    M.write_fake_checkpoint(tmp_path / "checkpoints" / "mymodel--last.ckpt", isdir=False, unfinished=False)
    with pytest.raises(ValueError, match="already completed"):
        check_resume(_trainer(), tmp_path, resume_if_exists=True)
    # With resume_past_end the end checkpoint is loaded (NeMo intends this; its code forgets to set it).
    trainer = _trainer()
    check_resume(trainer, tmp_path, resume_if_exists=True, resume_past_end=True)
    assert trainer.ckpt_path == str(end)


def test_several_last_checkpoints_are_named_in_the_error(tmp_path: Path) -> None:
    for name in ("mymodel--last.ckpt", "mymodel2--last.ckpt"):
        M.write_fake_checkpoint(tmp_path / "checkpoints" / name, isdir=False, unfinished=False)
    with pytest.raises(ValueError, match=r"mymodel--last\.ckpt.*mymodel2--last\.ckpt"):
        check_resume(_trainer(), tmp_path, resume_if_exists=True)


def test_the_one_last_checkpoint_is_chosen(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "mymodel--last.ckpt"
    M.write_fake_checkpoint(last, isdir=False, unfinished=False)
    M.write_fake_checkpoint(tmp_path / "checkpoints" / "mymodel--val_loss=0.1-epoch=3.ckpt", isdir=False,
                            unfinished=False)
    trainer = _trainer()
    check_resume(trainer, tmp_path, resume_if_exists=True)
    assert Path(str(trainer.ckpt_path)).resolve() == last.resolve()


def test_dirpath_is_searched_instead_of_log_dir(tmp_path: Path) -> None:
    elsewhere = tmp_path / "dirpath_test" / "ckpts"
    elsewhere.mkdir(parents=True)
    M.write_fake_checkpoint(tmp_path / "logs" / "checkpoints" / "mymodel--last.ckpt", isdir=False, unfinished=False)
    with pytest.raises(NotFoundError):
        check_resume(_trainer(), tmp_path / "logs", resume_if_exists=True, dirpath=str(elsewhere))
    (elsewhere / "mymodel--last.ckpt").touch()
    trainer = _trainer()
    check_resume(trainer, tmp_path / "logs", resume_if_exists=True, dirpath=str(elsewhere))
    assert Path(str(trainer.ckpt_path)).resolve() == (elsewhere / "mymodel--last.ckpt").resolve()


def test_a_last_checkpoint_folder_is_found(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    M.write_fake_checkpoint(folder / "megatron_gpt--val_loss=5.01-step=1000", isdir=True, unfinished=False)
    M.write_fake_checkpoint(folder / "megatron_gpt--val_loss=5.01-step=1000-last", isdir=True, unfinished=False)
    trainer = _trainer()
    check_resume(trainer, tmp_path, resume_if_exists=True)
    assert Path(str(trainer.ckpt_path)).name == "megatron_gpt--val_loss=5.01-step=1000-last"


# -- unfinished checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("isdir", [False, True])
def test_an_unfinished_last_is_skipped_for_the_one_finished_last(tmp_path: Path, isdir: bool) -> None:
    folder = tmp_path / "checkpoints"
    ext = "" if isdir else ".ckpt"
    M.write_fake_checkpoint(folder / f"gpt--val_loss=5.01-step=900{ext}", isdir=isdir, unfinished=False)
    M.write_fake_checkpoint(folder / f"gpt--val_loss=5.01-step=1000-last{ext}", isdir=isdir, unfinished=False)
    M.write_fake_checkpoint(folder / f"gpt--val_loss=5.01-step=1100-last{ext}", isdir=isdir, unfinished=True)
    trainer = _trainer()
    check_resume(trainer, tmp_path, resume_if_exists=True)
    assert Path(str(trainer.ckpt_path)).name == f"gpt--val_loss=5.01-step=1000-last{ext}"


@pytest.mark.parametrize("isdir", [False, True])
def test_an_unfinished_last_never_starts_over_silently(tmp_path: Path, isdir: bool) -> None:
    ext = "" if isdir else ".ckpt"
    M.write_fake_checkpoint(tmp_path / "checkpoints" / f"gpt--val_loss=5.01-step=900-last{ext}", isdir=isdir,
                            unfinished=True)
    M.write_fake_checkpoint(tmp_path / "checkpoints" / f"gpt--val_loss=5.01-step=800{ext}", isdir=isdir,
                            unfinished=False)
    with pytest.raises(ValueError, match="Last checkpoint is unfinished"):
        check_resume(_trainer(), tmp_path, resume_if_exists=True, resume_ignore_no_checkpoint=True)


def test_an_unfinished_end_checkpoint_is_an_error(tmp_path: Path) -> None:
    M.write_fake_checkpoint(tmp_path / "checkpoints" / "gpt--end.ckpt", isdir=False, unfinished=True)
    with pytest.raises(ValueError, match="End checkpoint is unfinished"):
        check_resume(_trainer(), tmp_path, resume_if_exists=True, resume_past_end=True)


def test_two_finished_lasts_beside_an_unfinished_one_are_ambiguous(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step, unfinished in ((900, False), (1000, False), (1100, True)):
        M.write_fake_checkpoint(folder / f"gpt--step={step}-last.ckpt", isdir=False, unfinished=unfinished)
    with pytest.raises(ValueError, match="Multiple checkpoints"):
        check_resume(_trainer(), tmp_path, resume_if_exists=True)


# -- resume_from_checkpoint ------------------------------------------------------------------
def test_a_found_last_wins_over_resume_from_checkpoint(tmp_path: Path) -> None:
    start = tmp_path / "pretrained.ckpt"
    start.touch()
    last = tmp_path / "checkpoints" / "default--last.ckpt"
    M.write_fake_checkpoint(last, isdir=False, unfinished=False)
    trainer = _trainer()
    check_resume(trainer, tmp_path, resume_if_exists=True, resume_from_checkpoint=str(start))
    assert trainer.ckpt_path == str(last)


def test_resume_from_checkpoint_is_used_when_nothing_is_found_and_ignored(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    start = tmp_path / "pretrained.ckpt"
    start.touch()
    trainer = _trainer()
    with caplog.at_level(logging.WARNING, logger="expbus.exp_manager"):
        check_resume(trainer, tmp_path, resume_if_exists=True, resume_ignore_no_checkpoint=True,
                     resume_from_checkpoint=str(start))
    assert trainer.ckpt_path == str(start)
    assert f"Training from {start}." in caplog.text
    with pytest.raises(NotFoundError, match="resume_ignore_no_checkpoint: true to start from resume_from_checkpoint"):
        check_resume(_trainer(), tmp_path, resume_if_exists=True, resume_from_checkpoint=str(start))


def test_resume_from_checkpoint_alone(tmp_path: Path) -> None:
    start = tmp_path / "pretrained.ckpt"
    start.touch()
    trainer = _trainer()
    check_resume(trainer, tmp_path, resume_from_checkpoint=str(start))
    assert trainer.ckpt_path == str(start)
    with pytest.raises(NotFoundError, match=r"missing\.ckpt does not exist"):
        check_resume(_trainer(), tmp_path, resume_from_checkpoint=str(tmp_path / "missing.ckpt"))
    trainer = _trainer()
    check_resume(trainer, tmp_path)  # nothing asked: nothing set
    assert trainer.ckpt_path is None


# -- real runs ---------------------------------------------------------------------------------
class _OneMoreStep(pl.Callback):
    def __init__(self, start: int) -> None:
        self.start = start
        self.steps: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert trainer.global_step == self.start

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


def test_a_run_resumed_from_last_does_exactly_the_next_step(tmp_path: Path) -> None:
    """NeMo's test_last_checkpoint_saved: 64 steps, then max_steps 65 does one more step."""
    params = {"filename": "{val_loss:.4f}-{epoch}-{step}", "save_nemo_on_train_end": False}
    folder = tmp_path / "checkpoints"
    trainer = M.make_trainer(tmp_path, max_steps=64, val_check_interval=0.33)
    M.checkpointing(trainer, tmp_path, **params)
    trainer.fit(M.ExampleModel(train_len=64, batch_size=1))
    last = folder / "val_loss=0.0300-epoch=1-step=64-last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 64
    assert len(M.names(folder, "*-last.ckpt")) == 1

    probe = _OneMoreStep(64)
    trainer = M.make_trainer(tmp_path, max_steps=65, val_check_interval=0.33, callbacks=[probe])
    check_resume(trainer, tmp_path, resume_if_exists=True)
    assert Path(str(trainer.ckpt_path)) == last
    M.checkpointing(trainer, tmp_path, resume=True, **params)
    trainer.fit(M.ExampleModel(train_len=64, batch_size=1))
    assert probe.steps == [65] and trainer.global_step == 65
    # The -last resumed from was replaced: exactly one remains, at step 65.
    lasts = M.names(folder, "*-last.ckpt")
    assert len(lasts) == 1 and next(iter(lasts)).endswith("-step=65-last.ckpt")
    assert torch.load(folder / next(iter(lasts)), weights_only=False)["global_step"] == 65
    assert M.markers(folder) == []


def test_a_resumed_run_restores_the_weights(tmp_path: Path) -> None:
    """NeMo's test_nemo_checkpoint_restore_model."""
    trainer = M.make_trainer(tmp_path, max_epochs=4)
    M.checkpointing(trainer, tmp_path, save_top_k=1, save_last=True)
    trainer.fit(M.ExampleModel())

    trainer = M.make_trainer(tmp_path, max_epochs=5)
    check_resume(trainer, tmp_path, resume_if_exists=True, resume_past_end=True)
    M.checkpointing(trainer, tmp_path, resume=True, save_top_k=1, save_last=False)
    model = M.DoNothingModel()
    model.l1.weight = torch.nn.Parameter(torch.tensor((0.0, 0.0)).unsqueeze(0))
    model.l1.bias = torch.nn.Parameter(torch.tensor(1.0))
    assert abs(model.output_on_ones() - 1.0) < 1e-5
    trainer.fit(model)
    assert abs(model.output_on_ones() - 0.03) < 1e-5
