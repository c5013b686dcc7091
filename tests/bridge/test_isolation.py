"""A slow sink and a raising sink slow neither training nor the other sinks, and close keeps its deadline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from expbus.bus import Event, Metrics, RunFinished, read_journal
from expbus.trainer_bridge import BridgeCallback

pytestmark = pytest.mark.slow

CLOSE_TIMEOUT = 0.5


class SlowSink:
    """Takes a second per batch."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, batch: Sequence[Event]) -> None:
        time.sleep(1.0)
        self.events.extend(batch)


class RaisingSink:
    """Fails every write."""

    def write(self, batch: Sequence[Event]) -> None:
        raise RuntimeError("backend down")


class Clock(pl.Callback):
    """Times the training loop, and the teardown that follows it (where the bridge closes its bus)."""

    def __init__(self) -> None:
        self.train = 0.0
        self.close = 0.0
        self._t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train = time.perf_counter() - self._t0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close = time.perf_counter() - self._t0


def _run(tmp_path: Path, name: str, make_trainer: Any, tiny: Any, sinks: dict[str, Any]) -> tuple[BridgeCallback,
                                                                                                   Clock]:
    config = {"run_dir": str(tmp_path / name), "bus": {"close_timeout": CLOSE_TIMEOUT},
              "sinks": {"events": {"type": "jsonl"}}}
    bridge = BridgeCallback(config, sinks=sinks)
    clock = Clock()  # after the bridge: its teardown runs once the bridge has closed the bus
    model, data = tiny()
    make_trainer([bridge, clock], max_steps=1000, limit_val_batches=0).fit(model, datamodule=data)
    return bridge, clock


def test_slow_and_raising_sinks_do_not_slow_training(tmp_path: Path, make_trainer: Any, tiny: Any,
                                                     readers: Any) -> None:
    # Best of two on both sides: a shared CI machine's noise is not the bridge's doing.
    _run(tmp_path, "warmup", make_trainer, tiny, {})
    baseline = min(_run(tmp_path, f"base{i}", make_trainer, tiny, {})[1].train for i in range(2))
    slow_runs = [_run(tmp_path, f"slow{i}", make_trainer, tiny, {"slow": SlowSink(), "bad": RaisingSink()})
                 for i in range(2)]
    assert min(clock.train for _, clock in slow_runs) < 1.5 * baseline, (slow_runs, baseline)
    bridge, clock = slow_runs[-1]
    # The bus closed within its deadline (plus the bounded join of its thread).
    assert clock.close < CLOSE_TIMEOUT + 1.0, clock.close
    # The jsonl sink beside them has every event, as the journal does.
    journal = read_journal(tmp_path / "slow1")
    lines = readers.jsonl_events(tmp_path / "slow1" / "events.jsonl")
    assert readers.as_json(lines) == readers.as_json(journal)
    assert isinstance(journal[-1], RunFinished) and journal[-1].status == "completed"
    assert len([e for e in journal if isinstance(e, Metrics)]) >= 1000
    stats = bridge.last_stats
    assert stats["events"].delivered == len(journal) and stats["events"].errors == 0
    assert stats["bad"].errors > 0 and stats["bad"].failed > 0 and stats["bad"].delivered == 0
    assert "backend down" in (stats["bad"].last_error or "")
    assert stats["slow"].delivered + stats["slow"].dropped == len(journal)
