"""Metrics logged with ``self.log`` reach every sink and the journal under ``logger=False``, as a Lightning logger sees them."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from expbus.bus import Metrics, read_journal
from expbus.sinks.testing import MemorySink
from expbus.trainer_bridge import BridgeCallback

pytestmark = pytest.mark.slow

BRIDGE_DIR = str(Path(sys.modules[BridgeCallback.__module__].__file__ or "").parent)


def _config(run_dir: Path) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "sinks": {"events": {"type": "jsonl", "batch_delay": 0.05}}}


def test_every_logged_metric_reaches_memory_jsonl_and_journal_like_a_csv_logger(
    tmp_path: Path, make_trainer: Any, tiny: Any, readers: Any
) -> None:
    run_dir = tmp_path / "run"
    memory = MemorySink()
    bridge = BridgeCallback(_config(run_dir), sinks={"mem": memory})
    model, data = tiny()
    trainer = make_trainer(
        [bridge, ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor="val_loss", save_top_k=2, save_last=True)],
        log_every_n_steps=3,
    )
    trainer.fit(model, datamodule=data)

    # The identical run, with Lightning's own CSVLogger instead of the bridge.
    model_b, data_b = tiny()
    csv_logger = CSVLogger(tmp_path / "csv", name="ref", version=0)
    make_trainer(
        [ModelCheckpoint(dirpath=tmp_path / "ref_ckpt", monitor="val_loss", save_top_k=2, save_last=True)],
        log_every_n_steps=3, logger=csv_logger,
    ).fit(model_b, datamodule=data_b)
    reference = readers.csv_logger_rows(Path(csv_logger.log_dir) / "metrics.csv")

    ours = [e for e in memory.events if isinstance(e, Metrics)]
    assert [(e.step, set(e.values)) for e in ours] == [(step, set(values)) for step, _, values in reference]
    for event, (step, epoch, values) in zip(ours, reference, strict=True):
        assert event.values == pytest.approx(values, rel=1e-6), step
        if epoch is not None:
            assert event.epoch == epoch
        assert all(type(v) is float for v in event.values.values())

    # log_every_n_steps=3: per-step values at every third optimizer step, none in between.
    step_rows = [e.step for e in ours if "train_loss_step" in e.values]
    assert step_rows == [s for s in range(24) if (s + 1) % 3 == 0]
    # Epoch-end and validation metrics: once per epoch (3 epochs of 8 batches).
    assert len([e for e in ours if "train_loss_epoch" in e.values]) == 3
    assert len([e for e in ours if "val_loss" in e.values]) == 3

    # The jsonl sink and the journal hold the same metrics, in the same order.
    expected = readers.metric_rows(memory.events)
    assert readers.metric_rows(readers.jsonl_events(run_dir / "events.jsonl")) == expected
    assert readers.metric_rows(read_journal(run_dir)) == expected
    # And the same events overall.
    assert readers.as_json(readers.jsonl_events(run_dir / "events.jsonl")) == readers.as_json(memory.events)
    assert readers.as_json(read_journal(run_dir)) == readers.as_json(memory.events)


def test_a_user_supplied_logger_still_gets_everything(tmp_path: Path, make_trainer: Any, tiny: Any,
                                                      readers: Any) -> None:
    memory = MemorySink()
    csv_logger = CSVLogger(tmp_path / "csv", name="both", version=0)
    model, data = tiny()
    trainer = make_trainer([BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})], logger=csv_logger)
    trainer.fit(model, datamodule=data)
    reference = readers.csv_logger_rows(Path(csv_logger.log_dir) / "metrics.csv")
    ours = readers.metric_rows(memory.events)
    assert [step for step, _, _ in reference] == [step for step, _ in ours]
    for (_, _, expected), (_, got) in zip(reference, ours, strict=True):
        assert got == pytest.approx(expected, rel=1e-6)
    assert "train_loss_step" in trainer.logged_metrics


def test_a_logged_step_key_wins_and_is_not_a_value(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    from expbus.trainer_bridge.demo import DemoRegressor

    class LogsStep(DemoRegressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("step", float(1000 + self.global_step), on_step=True, on_epoch=False)
            return loss

    memory = MemorySink()
    model, data = tiny(LogsStep)
    make_trainer([BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})], max_steps=4,
                 limit_val_batches=0).fit(model, datamodule=data)
    steps = [e for e in memory.of_type(Metrics) if "train_loss_step" in e.values]
    assert [e.step for e in steps] == [1000, 1001, 1002, 1003]
    assert all("step" not in e.values for e in steps)


def test_no_item_call_on_the_training_thread_for_the_bridge(tmp_path: Path, make_trainer: Any, tiny: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A tensor's value is read with item() or tolist() (the bus uses tolist: it keeps the GIL).
    calls: list[tuple[str, bool]] = []  # (thread name, a bridge frame is on the stack)

    def recording(real: Any) -> Any:
        def read(self: torch.Tensor) -> Any:
            frame = sys._getframe(1)
            from_bridge = False
            while frame is not None:
                if frame.f_code.co_filename.startswith(BRIDGE_DIR):
                    from_bridge = True
                    break
                frame = frame.f_back  # type: ignore[assignment]
            calls.append((threading.current_thread().name, from_bridge))
            return real(self)

        return read

    monkeypatch.setattr(torch.Tensor, "item", recording(torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "tolist", recording(torch.Tensor.tolist))
    memory = MemorySink()
    model, data = tiny()
    make_trainer([BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})]).fit(model, datamodule=data)
    monkeypatch.undo()

    main = threading.main_thread().name
    assert [c for c in calls if c[0] == main and c[1]] == []
    # The values were converted, by the bus thread.
    metrics = memory.of_type(Metrics)
    assert len(metrics) >= 24
    assert sum(1 for name, _ in calls if name == "expbus-bus") >= len(metrics)
    assert all(type(v) is float for e in metrics for v in e.values.values())  # type: ignore[attr-defined]


def test_the_tensor_resolver_gives_what_item_gives() -> None:
    from expbus.bus import resolve_value
    from expbus.trainer_bridge._tensor_values import resolve_tensor_values

    values: list[Any] = [
        torch.tensor(1.5), torch.tensor(2), torch.tensor(True), 3.0, 4, torch.tensor([1.0]),
        torch.tensor(0.1), torch.tensor(float("nan")), torch.tensor(0.3, dtype=torch.float64),
        torch.tensor(7, dtype=torch.int32), torch.tensor(False), torch.tensor(2.5, requires_grad=True) * 2,
    ]
    got = resolve_tensor_values(values)
    expected = [resolve_value(v) for v in values]
    assert [type(v) for v in got] == [type(v) for v in expected]
    assert str(got) == str(expected)  # nan == nan as text
