"""The other callbacks exp_manager adds: step timing, early stopping, the per-run time limit, the IPL stopper."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import msgspec
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.loops import _TrainingEpochLoop

from expbus.bus import Timing, now
from expbus.sinks import ConfigError

if TYPE_CHECKING:
    from expbus.trainer_bridge import BridgeCallback

    from ._config import EarlyStoppingParams, ExpManagerConfig, IPLEpochStopperParams, StepTimingParams

__all__ = [
    "IPLEpochStopper",
    "SkipResumeTrainingValidationLoop",
    "StatelessTimer",
    "StepTimingCallback",
    "configure_no_restart_validation_training_loop",
    "early_stopping",
    "install_stateless_timer",
    "resilience_callbacks",
]

log = logging.getLogger("expbus.exp_manager")


class StepTimingCallback(pl.Callback):
    """Publishes ``train_step_timing`` (seconds) as a ``Timing`` event on the run's bus, once per training batch.

    The time of ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
    optimizer step) is read with ``time.perf_counter``; with ``delta`` it is the time from
    one batch end to the next (data loading included: NeMo's ``log_delta_step_timing``).
    The value is ``reduction`` over the last ``buffer_size`` steps, as NeMo's timer computes
    it. Nothing here synchronises the GPU unless ``sync_cuda`` (then the time is exact, at
    the cost of a device sync per step). The event has the step of the metrics Lightning
    logs for the same batch, so sinks chart it beside them.

    Args:
        bridge: the run's bridge; its bus receives the events while the run is open.
        params: ``step_timing_kwargs``.
        delta: measure batch end to batch end.
    """

    NAME = "train_step_timing"

    def __init__(self, bridge: BridgeCallback, params: StepTimingParams, *, delta: bool = False) -> None:
        super().__init__()
        self.bridge = bridge
        self.reduction = params.reduction or "mean"
        self.sync_cuda = bool(params.sync_cuda)
        size = params.buffer_size or 0
        self.window: deque[float] = deque(maxlen=size if size > 0 else 1)
        self.delta = delta
        self._start: float | None = None

    def _clock(self) -> float:
        if self.sync_cuda:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
        return time.perf_counter()

    def _value(self) -> float:
        window = self.window
        if self.reduction == "sum":
            return sum(window)
        if self.reduction == "min":
            return min(window)
        if self.reduction == "max":
            return max(window)
        if self.reduction == "none":
            return window[-1]
        return sum(window) / len(window)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the batch-end-to-batch-end clock (delta mode)."""
        if self.delta:
            self._start = self._clock()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Start the step clock."""
        if not self.delta:
            self._start = self._clock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Stop the clock and publish the reduced window."""
        start = self._start
        if start is None:
            return
        end = self._clock()
        self._start = end if self.delta else None
        self.window.append(end - start)
        bus = self.bridge.bus
        if bus is not None:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step of this batch's metrics
            bus.publish(Timing(time=now(), step=step, durations={self.NAME: self._value()}))


def early_stopping(params: EarlyStoppingParams) -> EarlyStopping:
    """Lightning's ``EarlyStopping`` from ``early_stopping_callback_params``."""
    return EarlyStopping(**msgspec.structs.asdict(params))


class IPLEpochStopper(pl.Callback):
    """Stops training every ``stop_every_n_epochs`` epochs (NeMo's iterative pseudo-labelling stopper).

    Args:
        enable_stop: request the stop; ``False`` makes the callback inert.
        stop_every_n_epochs: epochs to run before the stop.
    """

    def __init__(self, enable_stop: bool = True, stop_every_n_epochs: int = 1) -> None:
        super().__init__()
        self.enable_stop = bool(enable_stop)
        self.stop_every_n_epochs = stop_every_n_epochs

    @classmethod
    def from_params(cls, params: IPLEpochStopperParams) -> IPLEpochStopper:
        """Build from ``ipl_epoch_stopper_callback_params``."""
        return cls(params.enable_stop, params.stop_every_n_epochs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count the epoch down; ask the Trainer to stop at zero."""
        if self.stop_every_n_epochs != 0:
            self.stop_every_n_epochs -= 1
        if self.stop_every_n_epochs == 0 and self.enable_stop:
            trainer.should_stop = True


class StatelessTimer(pl.Callback):
    """Stops a run after ``duration`` of this process's training, saving the ``-last`` checkpoint first.

    For clusters where each job has a wall-clock limit: unlike Lightning's ``Timer``, the
    elapsed time is not saved in checkpoints, so every resumed job gets the full duration.
    It counts from ``SLURM_JOB_START_TIME`` when SLURM sets it (the job's own clock), else
    from the start of training. When time is up (checked after each training batch, rank 0
    deciding for all), it sets ``trainer.should_stop``: the step finishes, validation and
    checkpoint callbacks run as usual, and at train end the ``-last`` checkpoint is saved
    unless a checkpoint was already saved at that step.

    Args:
        duration: the time limit of one run.
    """

    def __init__(self, duration: _dt.timedelta) -> None:
        super().__init__()
        self.duration = duration
        self.started: float | None = None
        self.triggered = False

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the limit applies to each run afresh."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock (SLURM's job start when known)."""
        current = time.time()
        slurm = os.environ.get("SLURM_JOB_START_TIME")
        self.started = current
        if slurm:
            try:
                start = float(slurm)
            except ValueError:
                log.warning("SLURM_JOB_START_TIME=%r is not a Unix time; counting from now", slurm)
            else:
                if start <= current:
                    self.started = start
        self.triggered = False

    def elapsed(self) -> float:
        """Seconds counted so far."""
        return 0.0 if self.started is None else time.time() - self.started

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Ask the Trainer to stop once the time is up."""
        if self.triggered:
            return
        stop = self.elapsed() >= self.duration.total_seconds()
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.broadcast(stop, src=0))
        if stop:
            self.triggered = True
            trainer.should_stop = True
            log.info("max_time_per_run reached (%s elapsed of %s): stopping after this step and saving the "
                     "-last checkpoint", _dt.timedelta(seconds=round(self.elapsed())), self.duration)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``-last`` if the time limit stopped the run and nothing was saved at this step."""
        if not self.triggered:
            return
        callback = trainer.checkpoint_callback
        if callback is None or getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
            return
        save_last = getattr(callback, "_save_last_checkpoint", None)
        candidates = getattr(callback, "_monitor_candidates", None)
        if save_last is not None and candidates is not None:
            save_last(trainer, candidates(trainer))


def install_stateless_timer(trainer: pl.Trainer, duration: _dt.timedelta) -> StatelessTimer:
    """Add a :class:`StatelessTimer`, replacing a Lightning ``Timer`` (``trainer.max_time``) as NeMo does."""
    timer = StatelessTimer(duration)
    for index, callback in enumerate(trainer.callbacks):  # type: ignore[attr-defined]
        if isinstance(callback, Timer):
            log.warning("Found a PTL Timer callback, replacing with a StatelessTimer callback. This will happen if "
                        "you set trainer.max_time as well as exp_manager.max_time_per_run.")
            trainer.callbacks[index] = timer  # type: ignore[attr-defined]
            return timer
    trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    return timer


class SkipResumeTrainingValidationLoop(_TrainingEpochLoop):
    """Lightning's training epoch loop that does not re-run the validation a resumed checkpoint was saved after.

    NeMo's loop, for Lightning versions that re-run it (before 2.5).
    """

    def _should_check_val_fx(self, data_fetcher: Any) -> bool:
        if self.restarting:
            return False
        return super()._should_check_val_fx(data_fetcher)


# Lightning 2.5+ skips that validation itself (``_TrainingEpochLoop.restarted_on_last``), and
# NeMo's override would then make a run resumed from an end-of-epoch checkpoint repeat its
# last step; so the loop is swapped only where Lightning lacks it.
_LIGHTNING_SKIPS_VALIDATION_ON_RESTART = hasattr(_TrainingEpochLoop, "restarted_on_last")


def configure_no_restart_validation_training_loop(trainer: pl.Trainer) -> None:
    """Make a resumed run skip the validation its checkpoint was saved after (``disable_validation_on_resume``).

    Lightning 2.5 and later do this themselves; on earlier versions the Trainer's epoch loop
    becomes :class:`SkipResumeTrainingValidationLoop`, as NeMo does. A custom epoch loop is left
    alone, with a ``UserWarning`` (as NeMo).
    """
    if type(trainer.fit_loop.epoch_loop) is not _TrainingEpochLoop:
        warnings.warn("Detected custom epoch loop. Skipping no validation on restart support.", UserWarning,
                      stacklevel=3)
        return
    if _LIGHTNING_SKIPS_VALIDATION_ON_RESTART:
        return
    trainer.fit_loop.epoch_loop = SkipResumeTrainingValidationLoop(  # pragma: no cover - Lightning < 2.5
        trainer, trainer.min_steps, trainer.max_steps)


def resilience_callbacks(config: ExpManagerConfig, log_dir: Any) -> list[pl.Callback]:
    """NeMo's straggler detection and fault tolerance callbacks (from ``ptl_resiliency``), when asked for.

    Raises:
        ConfigError: a callback was asked for but ``ptl_resiliency`` is not installed.
    """
    from ._config import ROOT

    callbacks: list[pl.Callback] = []
    if config.create_straggler_detection_callback:
        try:
            from ptl_resiliency import StragglerDetectionCallback  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(f"{ROOT}.create_straggler_detection_callback: true, but the ptl_resiliency package "
                              "(NVIDIA's straggler detection) is not installed", value=True,
                              path=f"{ROOT}.create_straggler_detection_callback") from None
        callbacks.append(StragglerDetectionCallback(**msgspec.structs.asdict(config.straggler_detection_params)))
    if config.create_fault_tolerance_callback:
        try:
            from ptl_resiliency import FaultToleranceCallback
        except ImportError:
            raise ConfigError(f"{ROOT}.create_fault_tolerance_callback: true, but the ptl_resiliency package "
                              "(NVIDIA's fault tolerance) is not installed", value=True,
                              path=f"{ROOT}.create_fault_tolerance_callback") from None
        params = config.fault_tolerance
        from pathlib import Path

        callbacks.append(FaultToleranceCallback(exp_dir=Path(log_dir).parent,
                                                autoresume=params.max_subsequent_job_failures > 0,
                                                calculate_timeouts=params.calculate_timeouts,
                                                simulated_fault_params=params.simulated_fault))
    return callbacks
