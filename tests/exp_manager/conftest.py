"""Shared pieces of the exp_manager tests: a tiny CPU model and data, a Trainer factory, a clean process state."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from expbus.trainer_bridge.exp_manager._dirs import ENV_VERSION, detach_log_files


def _register_test_models() -> None:
    """Make ``_models.py`` importable as ``exp_manager_test_models`` (test files cannot import each other here).

    The name must not start with ``expbus``: warnings from ``expbus*`` modules fail the tests.
    """
    name = "exp_manager_test_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_models.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_register_test_models()


class TinyModel(pl.LightningModule):
    """A linear regression that logs ``train_loss`` every step and ``val_loss`` per validation."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


class TinyData(pl.LightningDataModule):
    """``train_batches`` batches of 4 rows for training, 2 for validation (fixed data)."""

    def __init__(self, train_batches: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(train_batches * 4 + 8, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True)
        self.train_set = TensorDataset(x[: train_batches * 4], y[: train_batches * 4])
        self.val_set = TensorDataset(x[train_batches * 4:], y[train_batches * 4:])

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.train_set, batch_size=4)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val_set, batch_size=4)


@pytest.fixture(autouse=True)
def _clean_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh cwd (for ./nemo_experiments), no inherited version, no log files left attached."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VERSION, raising=False)
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_START_TIME"):
        monkeypatch.delenv(variable, raising=False)
    yield
    detach_log_files()
    os.environ.pop(ENV_VERSION, None)


@pytest.fixture
def make_trainer() -> Callable[..., pl.Trainer]:
    """A CPU Trainer for a few steps, ``logger=False`` and no checkpointing unless told otherwise."""

    def make(**overrides: Any) -> pl.Trainer:
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 8,
            "log_every_n_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        }
        options.update(overrides)
        return pl.Trainer(**options)

    return make


@pytest.fixture
def tiny() -> Callable[..., tuple[TinyModel, TinyData]]:
    """A freshly seeded model and its data (the same weights on every call)."""

    def build(train_batches: int = 4, model_cls: type[TinyModel] = TinyModel) -> tuple[TinyModel, TinyData]:
        torch.manual_seed(0)
        return model_cls(), TinyData(train_batches)

    return build
