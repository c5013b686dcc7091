"""Step timing events, early stopping, the per-run time limit, no re-validation on resume, the IPL stopper."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.loops import _TrainingEpochLoop

from expbus.bus import Timing
from expbus.sinks import ConfigError
from expbus.sinks.testing import capture_events
from expbus.trainer_bridge.exp_manager import exp_manager, load_exp_manager_config
from expbus.trainer_bridge.exp_manager._callbacks import (
    IPLEpochStopper,
    StatelessTimer,
    StepTimingCallback,
)

NO_CKPT = {"create_checkpoint_callback": False, "create_tensorboard_logger": False}


def timings(events: list[Any]) -> list[Timing]:
    return [e for e in events if isinstance(e, Timing)]


# -- step timing ------------------------------------------------------------------------------
def test_step_timings_reach_the_sinks_at_the_metrics_steps(make_trainer: Callable[..., pl.Trainer],
                                                           tiny: Callable[..., Any]) -> None:
    trainer = make_trainer(max_steps=6)
    exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT})
    assert isinstance(trainer.callbacks[0], StepTimingCallback)  # type: ignore[attr-defined]
    model, data = tiny()
    with capture_events() as events:
        trainer.fit(model, datamodule=data)
    found = timings(events)
    assert [t.step for t in found] == list(range(6))
    assert all(set(t.durations) == {"train_step_timing"} and t.durations["train_step_timing"] > 0 for t in found)


def test_no_step_timing_when_switched_off(make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any]) -> None:
    trainer = make_trainer(max_steps=3)
    exp_manager(trainer, {"explicit_log_dir": "run", "log_step_timing": False, **NO_CKPT})
    assert not any(isinstance(cb, StepTimingCallback) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    model, data = tiny()
    with capture_events() as events:
        trainer.fit(model, datamodule=data)
    assert timings(events) == []


class _Bus:
    def __init__(self) -> None:
        self.events: list[Timing] = []

    def publish(self, event: Timing) -> None:
        self.events.append(event)


def _drive(callback: StepTimingCallback, durations: list[float], monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Run the hooks over fake batches whose clock readings give ``durations``."""
    clock = iter([x for d in durations for x in (100.0, 100.0 + d)])  # start, end of each batch
    monkeypatch.setattr(callback, "_clock", lambda: next(clock))
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)))
    for step, _ in enumerate(durations):
        trainer.fit_loop.epoch_loop._batches_that_stepped = step
        callback.on_train_batch_start(trainer, None, None, step)  # type: ignore[arg-type]
        callback.on_train_batch_end(trainer, None, None, None, step)  # type: ignore[arg-type]
    bus = callback.bridge.bus
    return [e.durations["train_step_timing"] for e in bus.events]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [1.0, 3.0, 5.0, 7.0]),  # NeMo's default: buffer_size 1, the step itself
        ({"buffer_size": 2}, [1.0, 2.0, 4.0, 6.0]),  # moving mean over 2 steps
        ({"buffer_size": 3, "reduction": "max"}, [1.0, 3.0, 5.0, 7.0]),
        ({"buffer_size": 3, "reduction": "min"}, [1.0, 1.0, 1.0, 3.0]),
        ({"buffer_size": 2, "reduction": "sum"}, [1.0, 4.0, 8.0, 12.0]),
        ({"buffer_size": 0}, [1.0, 3.0, 5.0, 7.0]),
        ({"buffer_size": 4, "reduction": "none"}, [1.0, 3.0, 5.0, 7.0]),
    ],
)
def test_step_timing_window_and_reduction(kwargs: dict[str, Any], expected: list[float],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_exp_manager_config({"step_timing_kwargs": kwargs}).step_timing_kwargs
    callback = StepTimingCallback(SimpleNamespace(bus=_Bus()), params)  # type: ignore[arg-type]
    assert _drive(callback, [1.0, 3.0, 5.0, 7.0], monkeypatch) == expected


def test_delta_timing_measures_batch_end_to_batch_end(monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_exp_manager_config({}).step_timing_kwargs
    callback = StepTimingCallback(SimpleNamespace(bus=_Bus()), params, delta=True)  # type: ignore[arg-type]
    clock = iter([10.0, 11.0, 13.5])  # epoch start, end of batch 0, end of batch 1
    monkeypatch.setattr(callback, "_clock", lambda: next(clock))
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)))
    callback.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]
    for step in range(2):
        callback.on_train_batch_start(trainer, None, None, step)  # type: ignore[arg-type]
        callback.on_train_batch_end(trainer, None, None, None, step)  # type: ignore[arg-type]
    assert [e.durations["train_step_timing"] for e in callback.bridge.bus.events] == [1.0, 2.5]  # type: ignore[union-attr]


def test_no_cuda_synchronize_unless_sync_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    for sync, expected in ((False, 0), (True, 2)):
        calls.clear()
        params = load_exp_manager_config({"step_timing_kwargs": {"sync_cuda": sync}}).step_timing_kwargs
        callback = StepTimingCallback(SimpleNamespace(bus=_Bus()), params)  # type: ignore[arg-type]
        trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)))
        callback.on_train_batch_start(trainer, None, None, 0)  # type: ignore[arg-type]
        callback.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
        assert len(calls) == expected


# -- early stopping ------------------------------------------------------------------------------
def test_early_stopping_with_its_params(make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any]) -> None:
    trainer = make_trainer(max_steps=-1, max_epochs=6)
    exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT, "create_early_stopping_callback": True,
                          # The loss falls: watched with mode max, it never improves.
                          "early_stopping_callback_params": {"monitor": "val_loss", "mode": "max", "patience": 1,
                                                             "min_delta": 0.0}})
    stopper = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping))  # type: ignore[attr-defined]
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("val_loss", "max", 1)
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    assert trainer.current_epoch == 2 and stopper.stopped_epoch == 1


# -- max_time_per_run ------------------------------------------------------------------------------
def test_max_time_per_run_stops_cleanly_and_saves_last(make_trainer: Callable[..., pl.Trainer],
                                                       tiny: Callable[..., Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # SLURM started this job two minutes ago; the limit is one minute.
    monkeypatch.setenv("SLURM_JOB_START_TIME", str(int(time.time()) - 120))
    trainer = make_trainer(max_steps=20)
    exp_manager(trainer, {"explicit_log_dir": "run", "create_tensorboard_logger": False,
                          "max_time_per_run": "00:00:01:00",
                          "checkpoint_callback_params": {"monitor": None, "filename": "{step}", "save_top_k": 0}})
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, StatelessTimer))  # type: ignore[attr-defined]
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    assert timer.triggered and trainer.global_step == 1 and not trainer.interrupted
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == ["step=1-last.ckpt"]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step=1-last.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    assert timer.state_dict() == {}  # each resumed run gets the full time again


def test_max_time_counts_from_train_start_without_slurm(make_trainer: Callable[..., pl.Trainer],
                                                        tiny: Callable[..., Any]) -> None:
    trainer = make_trainer(max_steps=5)
    exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT, "max_time_per_run": 3600})
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, StatelessTimer))  # type: ignore[attr-defined]
    assert not timer.triggered and trainer.global_step == 5
    assert 0 < timer.elapsed() < 3600
    assert timer.duration == dt.timedelta(hours=1)


def test_a_lightning_timer_is_replaced(make_trainer: Callable[..., pl.Trainer],
                                       caplog: pytest.LogCaptureFixture) -> None:
    trainer = make_trainer(max_time="00:01:00:00")
    assert any(isinstance(cb, Timer) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="expbus.exp_manager"):
        exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT, "max_time_per_run": "00:00:30:00"})
    assert not any(isinstance(cb, Timer) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    assert "replacing with a StatelessTimer" in caplog.text


# -- disable_validation_on_resume (NeMo's test_resume_checkpoint_skip_validation) ------------------
class _Counter(pl.Callback):
    def __init__(self) -> None:
        self.validations = 0
        self.steps = 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validations += 1

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_does_not_run_validation_again(make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any],
                                              tmp_path: Path) -> None:
    def run(resume: Path | None) -> _Counter:
        counter = _Counter()
        trainer = make_trainer(max_steps=-1, max_epochs=1, val_check_interval=0.5, callbacks=[counter])
        exp_manager(trainer, {"explicit_log_dir": str(tmp_path / "run"), "create_tensorboard_logger": False,
                              "checkpoint_callback_params": {"filename": "{epoch}-{step}"}})
        model, data = tiny(train_batches=10)
        trainer.fit(model, datamodule=data, ckpt_path=resume)
        return counter

    first = run(None)
    assert (first.validations, first.steps) == (2, 10)
    second = run(tmp_path / "run" / "checkpoints" / "epoch=0-step=5.ckpt")
    # Validation only at the end; training continues from half-way.
    assert (second.validations, second.steps) == (1, 5)


def test_a_custom_epoch_loop_is_left_alone_with_a_warning(make_trainer: Callable[..., pl.Trainer]) -> None:
    class CustomLoop(_TrainingEpochLoop):
        pass

    trainer = make_trainer()
    trainer.fit_loop.epoch_loop = CustomLoop(trainer)
    with pytest.warns(UserWarning, match="Detected custom epoch loop"):
        exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT})
    assert type(trainer.fit_loop.epoch_loop) is CustomLoop


# -- the rest -------------------------------------------------------------------------------------
def test_ipl_epoch_stopper(make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any]) -> None:
    trainer = make_trainer(max_steps=-1, max_epochs=5)
    exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT, "create_ipl_epoch_stopper_callback": True,
                          "ipl_epoch_stopper_callback_params": {"stop_every_n_epochs": 2}})
    assert any(isinstance(cb, IPLEpochStopper) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    assert trainer.current_epoch == 2


@pytest.mark.parametrize("switch", ["create_straggler_detection_callback", "create_fault_tolerance_callback"])
def test_resilience_callbacks_need_their_package(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                                                 switch: str) -> None:
    with pytest.raises(ConfigError) as info:
        exp_manager(make_trainer(), {"explicit_log_dir": "run", switch: True})
    assert info.value.path == f"exp_manager.{switch}" and "ptl_resiliency" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_non_zero_ranks_sleep_and_leave_rank_zero_files_alone(make_trainer: Callable[..., pl.Trainer],
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from expbus.trainer_bridge.exp_manager import _manager

    slept: list[float] = []
    monkeypatch.setattr(_manager.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "1")
    trainer = make_trainer(devices=2, strategy="ddp")
    log_dir = exp_manager(trainer, {"explicit_log_dir": "run", **NO_CKPT, "seconds_to_sleep": 7})
    assert slept == [7.0]
    assert log_dir is not None and not (log_dir / "cmd-args.log").exists()
