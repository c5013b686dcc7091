"""NeMo's exp_manager test model (``ExampleModel``) as a plain LightningModule, and helpers for checkpoint tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from expbus.trainer_bridge.exp_manager._checkpoint import ExpModelCheckpoint, configure_checkpointing
from expbus.trainer_bridge.exp_manager._checkpoint_params import CallbackParams
from expbus.trainer_bridge.exp_manager._unfinished import ckpt_to_dir, set_checkpoint_unfinished_marker

# Lightning's advice for tiny CPU runs; not what these tests are about.
QUIET = [
    "ignore:.*does not have many workers.*",
    "ignore:.*number of training batches.*",
    "ignore:.*exists and is not empty.*",
    "ignore:.*LeafSpec.*",
]


class MyTestOptimizer(torch.optim.Optimizer):
    """NeMo's test optimizer: weights become 0.1, then 0.0, then 0.01 (val_loss 0.3, 0.0, 0.03, ...)."""

    def __init__(self, params: Any) -> None:
        self._step = 0
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        value = 0.1 if self._step == 0 else 0.0 if self._step == 1 else 0.01
        for group in self.param_groups:
            for p in group["params"]:
                p.data = value * torch.ones(p.shape)
        self._step += 1
        return loss


class DoNothingOptimizer(torch.optim.Optimizer):
    """Leaves the weights as they are."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None


class OnesDataset(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, length: int) -> None:
        self._length = length

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.ones(2)

    def __len__(self) -> int:
        return self._length


class ExampleModel(pl.LightningModule):
    """A linear layer trained on ones; logs ``val_loss`` at the end of each validation."""

    def __init__(self, train_len: int = 2, batch_size: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(1234)
        self.l1 = torch.nn.Linear(in_features=2, out_features=1)
        self.loss: torch.Tensor | None = None

    def train_dataloader(self) -> torch.utils.data.DataLoader[torch.Tensor]:
        return torch.utils.data.DataLoader(OnesDataset(self.hparams["train_len"]),
                                           batch_size=self.hparams["batch_size"])

    def val_dataloader(self) -> torch.utils.data.DataLoader[torch.Tensor]:
        return torch.utils.data.DataLoader(OnesDataset(10), batch_size=2)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.l1(batch)
        return torch.nn.functional.l1_loss(output, torch.zeros(output.size()))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.loss = self(batch)
        return self.loss

    def on_validation_epoch_end(self) -> None:
        assert self.loss is not None
        self.log("val_loss", torch.stack([self.loss]).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return MyTestOptimizer(self.parameters())

    def output_on_ones(self) -> float:
        with torch.no_grad():
            return float(self(torch.ones(2)))


class DoNothingModel(ExampleModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return DoNothingOptimizer(self.parameters())


class NoValidationModel(ExampleModel):
    """No validation at all (many plain LightningModules)."""

    val_dataloader = None  # type: ignore[assignment]
    validation_step = None  # type: ignore[assignment]


class DirCheckpointIO(TorchCheckpointIO):
    """Stores checkpoint ``x.ckpt`` as a folder ``x/`` (like NeMo's distributed checkpoints)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        folder = ckpt_to_dir(path)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, folder / "state.pt")

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(ckpt_to_dir(path) / "state.pt", map_location=map_location, weights_only=False)

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(ckpt_to_dir(path), ignore_errors=True)


class EmaTwinCheckpointIO(TorchCheckpointIO):
    """Writes an ``-EMA.ckpt`` twin beside every checkpoint, as an EMA implementation does."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if not str(path).endswith("-last.ckpt"):
            super().save_checkpoint(checkpoint, str(path).removesuffix(".ckpt") + "-EMA.ckpt", storage_options)


def make_trainer(root: Path, callbacks: list[pl.Callback] | None = None, **options: Any) -> pl.Trainer:
    """A quiet CPU Trainer with no logger and no checkpointing of its own."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
        "log_every_n_steps": 1,
    }
    settings.update(options)
    return pl.Trainer(callbacks=callbacks or [], **settings)


def checkpointing(trainer: pl.Trainer, log_dir: Path, *, resume: bool = False, name: str = "default",
                  **params: Any) -> ExpModelCheckpoint:
    """``configure_checkpointing`` with ``checkpoint_callback_params`` given as keywords."""
    return configure_checkpointing(trainer, log_dir, name, resume, CallbackParams(**params))


def write_fake_checkpoint(path: Path, *, isdir: bool, unfinished: bool) -> None:
    """NeMo's ``_write_fake_checkpoint``: an empty file or a folder with a file, and optionally its marker."""
    if isdir:
        path.mkdir(parents=True, exist_ok=True)
        (path / "dummy.txt").touch()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    if unfinished:
        set_checkpoint_unfinished_marker(path)


def names(folder: Path, pattern: str = "*.ckpt") -> set[str]:
    """File and folder names matching ``pattern`` in ``folder``."""
    return {p.name for p in folder.glob(pattern)} if folder.is_dir() else set()


def markers(folder: Path) -> list[str]:
    return sorted(os.fspath(p) for p in folder.rglob("*-unfinished"))
