"""NeMo's ``PreemptionCallback`` on CPU or GPU, one process or many: on a signal, save ``-last`` and stop cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["PreemptionCallback"]

log = logging.getLogger("expbus.preemption")

_Handler = Any  # what ``signal.getsignal`` returns: a callable, SIG_DFL, SIG_IGN or None


class PreemptionCallback(pl.Callback):
    """Stop a run cleanly when the scheduler's preemption signal arrives.

    From train start to train end the signal (``SIGTERM`` by default; ``SIGUSR1`` for
    SLURM's ``--signal=USR1@<seconds>``) only sets a flag. At the end of the optimizer
    step in progress (an accumulation micro-batch is not a stopping point), the callback:

    1. saves ``-last.ckpt`` through the checkpoint callback (exp_manager's also writes
       its ``-EMA.ckpt`` twin), so a resumed run starts at exactly the next step;
    2. sets ``trainer.should_stop`` (and skips the validation Lightning would run before
       stopping), so ``fit`` returns normally and every ``teardown`` runs;
    3. at ``fit`` end, publishes ``RunFinished(status="interrupted")`` on the bridge's
       bus and flushes every sink within ``flush_timeout`` seconds.

    Under DDP the ranks' flags are combined at every optimizer step (a logical OR, one
    all-reduce of a scalar), so a signal that reaches any rank, or several ranks at
    slightly different times, stops every rank at the same step. Every process then exits
    as the script does after ``fit`` (status 0 for a script that just returns, as NeMo's
    ``sys.exit(0)``); :attr:`preempted` tells the script, on every rank.

    Args:
        checkpoint_callback: the callback that saves ``-last``; the trainer's
            ``checkpoint_callback`` when ``None``.
        sig: the signal to handle.
        flush_timeout: seconds to wait for the sinks at the end.
    """

    def __init__(self, checkpoint_callback: ModelCheckpoint | None = None, sig: int = signal.SIGTERM,
                 flush_timeout: float = 10.0) -> None:
        self.checkpoint_callback = checkpoint_callback
        self.sig = signal.Signals(sig)
        self.flush_timeout = flush_timeout
        self.preempted = False
        self._received = False
        self._previous: _Handler = None
        self._installed = False
        self._step_at_batch_start = -1
        self._saved_limit_val: Any = None

    # -- the handler ---------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: a signal handler must not save or publish (it may interrupt either).
        self._received = True

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: fit runs outside the main thread; %s cannot be handled there", self.sig.name)
            return
        self._previous = signal.getsignal(self.sig)
        signal.signal(self.sig, self._on_signal)
        self._installed = True

    def _release(self) -> None:
        if self._installed:
            signal.signal(self.sig, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    # -- hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Handle the signal from here on (in place of Lightning's SIGTERM handling, which raises)."""
        self.preempted = False
        self._received = False
        self._install()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Remember the step, to tell a real optimizer step from an accumulation micro-batch."""
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After an optimizer step: if the signal came (on any rank), save ``-last`` and stop."""
        if self.preempted or trainer.global_step == self._step_at_batch_start:
            return
        received = self._received
        if trainer.world_size > 1:
            # Any rank's signal, not only rank 0's: a launcher or scheduler may signal some ranks
            # only (or rank 0 last), and a signal this handler swallowed must not be lost.
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        self.preempted = True
        log.info("Received %s: saving the last checkpoint at step %d and stopping", self.sig.name,
                 trainer.global_step)
        checkpoint = self.checkpoint_callback or trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint):
            # NeMo's way: the callback's own -last logic (its name, its EMA twin, pruning the previous one).
            checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        else:
            log.warning("Preemption: no ModelCheckpoint on the trainer; stopping without saving")
        trainer.should_stop = True
        # Stop now even if min_epochs/min_steps are not reached, and without the validation
        # Lightning runs before an early stop: the scheduler's grace period is short.
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = 0
        self._saved_limit_val = trainer.limit_val_batches
        trainer.limit_val_batches = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the previous handler and the validation limit."""
        self._release()
        if self._saved_limit_val is not None:
            trainer.limit_val_batches = self._saved_limit_val
            self._saved_limit_val = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Restore the previous handler."""
        self.on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a preemption: publish ``RunFinished(interrupted)`` and flush every sink within the deadline."""
        if not self.preempted:
            return
        from .callback import BridgeCallback

        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, BridgeCallback) and callback.bus is not None:
                # Before the bridge's teardown, which would report the stop as completed.
                callback._finish(trainer, "interrupted")
                if not callback.flush(self.flush_timeout):
                    log.warning("Preemption: the sinks did not flush within %.1f s", self.flush_timeout)
