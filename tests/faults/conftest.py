"""Shared pieces of the fault suite: a tiny real training run, a clock of its steps, and the journal's metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from expbus.bus import Event, Metrics, RunFinished


class FaultModel(pl.LightningModule):
    """A linear regressor that logs two metrics at every step, optionally sleeping in each step.

    The sleep stands for the step's real work, so that a step's time is dominated by it and
    a slowdown caused by logging would show as a ratio, whatever the machine's speed.
    """

    def __init__(self, step_sleep: float = 0.0) -> None:
        super().__init__()
        self.step_sleep = step_sleep
        self.net = nn.Linear(4, 1)
        self.save_hyperparameters()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.step_sleep:
            time.sleep(self.step_sleep)
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.log("weights/norm", self.net.weight.detach().norm())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fault_data() -> DataLoader[Any]:
    """1024 rows of a noisy linear function, 4 a batch, in order (256 steps an epoch)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=gen)
    y = x @ torch.tensor([[0.5], [-1.0], [2.0], [0.1]]) + 0.1 * torch.randn(1024, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=4)


class StepClock(pl.Callback):
    """Times every training step (``time.monotonic``, comparable with other threads' clocks) and the close.

    Put it after the bridge in ``callbacks``: its ``teardown`` then runs once the bridge has
    closed its bus, so ``close_seconds`` is how long the close took.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []  # (start, end) of each step
        self.close_seconds = 0.0
        self._start = 0.0
        self._fit_end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.steps.append((self._start, time.monotonic()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_end = time.monotonic()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close_seconds = time.monotonic() - self._fit_end

    def durations(self, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        """Durations of the steps that began at or after ``start`` and ended by ``end``."""
        return [b - a for a, b in self.steps if a >= start and b <= end]


def metric_points(events: list[Event]) -> list[tuple[str, int, float]]:
    """(name, step, value) of every metric value of every ``Metrics`` event, in order."""
    return [(name, e.step, float(value)) for e in events if isinstance(e, Metrics) for name, value in e.values.items()]


def check_training_logged_every_step(events: list[Event], steps: int) -> None:
    """The journal has both metrics at every step 0..steps-1, once each, and a completed RunFinished."""
    points = metric_points(events)
    for name in ("train_loss", "weights/norm"):
        assert [s for n, s, _v in points if n == name] == list(range(steps)), name
    finished = [e for e in events if isinstance(e, RunFinished)]
    assert len(finished) == 1 and finished[0].status == "completed", finished


class Faults:
    """The helpers, as a fixture (test modules cannot import conftest under importlib mode)."""

    FaultModel = FaultModel
    StepClock = StepClock
    fault_data = staticmethod(fault_data)
    metric_points = staticmethod(metric_points)
    check_training_logged_every_step = staticmethod(check_training_logged_every_step)


@pytest.fixture
def faults() -> type[Faults]:
    """The fault suite's model, data, step clock and journal checks."""
    return Faults


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """A CPU Trainer that logs every step, with no Lightning logger, checkpoints or validation."""

    def make(callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 200,
            "log_every_n_steps": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": tmp_path / "lightning",
        }
        options.update(overrides)
        return pl.Trainer(callbacks=callbacks, **options)

    return make
