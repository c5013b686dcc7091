"""Shared pieces of the bridge tests: a tiny regression run on CPU and readers of what the sinks wrote."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from expbus.bus import Event, Metrics, from_json
from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression


class TinyData(SyntheticRegression):
    """8 training batches of 8 rows, 2 validation batches."""

    def __init__(self, num_workers: int = 0, multiprocessing_context: str | None = None) -> None:
        super().__init__(in_features=4, train_size=64, val_size=16, batch_size=8)
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context

    def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        assert self.train_set is not None
        gen = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=8, shuffle=True, generator=gen, num_workers=self.num_workers,
            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
        )


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """A CPU Trainer for a run of a few tens of steps, ``logger=False`` unless told otherwise."""

    def make(callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 24,
            "log_every_n_steps": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks),
            "default_root_dir": tmp_path / "lightning",
            "num_sanity_val_steps": 0,
        }
        options.update(overrides)
        return pl.Trainer(callbacks=callbacks, **options)

    return make


@pytest.fixture
def tiny() -> Callable[..., tuple[DemoRegressor, TinyData]]:
    """A freshly seeded model and its data (the same weights on every call)."""

    def build(model_cls: type[DemoRegressor] = DemoRegressor, **data_options: Any) -> tuple[DemoRegressor, TinyData]:
        torch.manual_seed(0)
        return model_cls(in_features=4, hidden=8, lr=0.05), TinyData(**data_options)

    return build


def jsonl_events(path: Path) -> list[Event]:
    """Every event of a jsonl sink's file."""
    return [from_json(line) for line in path.read_bytes().splitlines() if line.strip()]


def metric_rows(events: list[Event]) -> list[tuple[int, dict[str, float]]]:
    """(step, values) of every ``Metrics`` event, in order."""
    return [(e.step, dict(e.values)) for e in events if isinstance(e, Metrics)]


def csv_logger_rows(path: Path) -> list[tuple[int, int | None, dict[str, float]]]:
    """(step, epoch, values) of every row a Lightning ``CSVLogger`` wrote."""
    rows = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(row.pop("step"))
            epoch_text = row.pop("epoch", "")
            values = {k: float(v) for k, v in row.items() if v != ""}
            rows.append((step, int(float(epoch_text)) if epoch_text else None, values))
    return rows


def as_json(events: list[Event]) -> list[dict[str, Any]]:
    """Events as plain dicts (for comparing what different sinks received)."""
    from expbus.bus import to_json

    return [json.loads(to_json(e)) for e in events]


class Readers:
    """The reader helpers, as a fixture (test modules cannot import conftest under importlib mode)."""

    jsonl_events = staticmethod(jsonl_events)
    metric_rows = staticmethod(metric_rows)
    csv_logger_rows = staticmethod(csv_logger_rows)
    as_json = staticmethod(as_json)


@pytest.fixture
def readers() -> type[Readers]:
    """Readers of what sinks, loggers and journals wrote."""
    return Readers


@pytest.fixture
def tiny_data_cls() -> type[TinyData]:
    """The tiny data module class."""
    return TinyData
