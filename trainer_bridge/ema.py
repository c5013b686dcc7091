"""An exponential moving average of the weights, as NeMo's ``EMA`` callback keeps it, for any LightningModule."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["EMA", "EMA_CHECKPOINT_SUFFIX"]

log = logging.getLogger("expbus.ema")

EMA_CHECKPOINT_SUFFIX = "-EMA.ckpt"


@torch.no_grad()
def _ema_update(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * current``, fused over all tensors."""
    torch._foreach_mul_(list(ema), decay)
    torch._foreach_add_(list(ema), list(current), alpha=1.0 - decay)


def _cpu_worker(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], decay: float,
                stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        # The device-to-host copies were queued on the side stream: wait for them, not for the step.
        stream.synchronize()
    _ema_update(ema, current, decay)


class EMA(pl.Callback):
    """Keep an exponential moving average (EMA) of the trained weights, with NeMo's semantics.

    After every ``every_n_steps``-th real optimizer step (counting from the first,
    so accumulated micro-batches do not count) the average becomes
    ``ema = decay * ema + (1 - decay) * param``; it starts as the weights at train start.
    Validation and test run with the EMA weights (swapped in place, and back afterwards)
    unless ``validate_original_weights``.

    The update does not stall training: on GPU it runs on a side CUDA stream, with
    ``cpu_offload`` the average lives on the CPU and a worker thread updates it. Either
    is joined before the next optimizer step changes the weights, and before the
    average is read (swap, checkpoint).

    Checkpoints: the callback state (in every checkpoint ``trainer.save_checkpoint``
    writes) holds the average and its step, so a resumed run continues it. Under
    exp_manager's checkpoint callback every checkpoint, ``-last`` included, also gets an
    ``<name>-EMA.ckpt`` twin whose model weights are the average (removed with its
    checkpoint). Resuming from a twin trains on with the EMA weights as the model and
    starts a new average from them. Resuming from a checkpoint without EMA state (saved
    weights-only, or without this callback) reads the average from its twin; a missing
    twin is an error naming the expected path.

    Args:
        decay: the weight of the old average in each update, in ``[0, 1]``.
        validate_original_weights: validate and test with the trained weights instead.
        every_n_steps: update after every N-th optimizer step.
        cpu_offload: keep the average on the CPU (updated by a worker thread).

    Raises:
        ValueError: ``decay`` outside ``[0, 1]`` or ``every_n_steps`` below 1, naming the value.
    """

    def __init__(self, decay: float, validate_original_weights: bool = False, every_n_steps: int = 1,
                 cpu_offload: bool = False) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1 (got {decay!r})")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"EMA every_n_steps must be a positive integer (got {every_n_steps!r})")
        self.decay = float(decay)
        self.validate_original_weights = validate_original_weights
        self.every_n_steps = every_n_steps
        self.cpu_offload = cpu_offload
        self._ema: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._last_step = -1  # the global step after which the average was last considered
        self._pending: list[torch.Tensor] | None = None  # restored before the weights reach their device
        self._from_twin = False
        self._swapped = False
        self._saving_twin = False
        self._stream: torch.cuda.Stream | None = None
        self._thread: threading.Thread | None = None

    # -- the average ------------------------------------------------------------------------
    @property
    def ema_weights(self) -> list[torch.Tensor] | None:
        """The averaged tensors, in the order of the module's trainable parameters (``None`` before training)."""
        self.join()
        return self._ema

    def _trained(self, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def _materialize(self, pl_module: pl.LightningModule) -> None:
        """Build the average: from the restored state when there is one, else from the current weights."""
        self._params = self._trained(pl_module)
        device = torch.device("cpu") if self.cpu_offload else None
        source = self._pending if self._pending is not None and not self._from_twin else None
        if source is not None and len(source) != len(self._params):
            raise RuntimeError(f"EMA state holds {len(source)} tensors but the model has {len(self._params)} "
                               "trainable parameters; the checkpoint belongs to another model")
        base = source if source is not None else [p.detach() for p in self._params]
        self._ema = [t.detach().to(device or p.device, copy=True) for t, p in zip(base, self._params, strict=True)]
        self._pending = None
        self._from_twin = False
        if any(p.is_cuda for p in self._params) and torch.cuda.is_available():
            self._stream = torch.cuda.Stream()

    def join(self) -> None:
        """Wait for an update in flight (side stream or worker thread)."""
        if self._stream is not None:
            self._stream.synchronize()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @torch.no_grad()
    def _update(self) -> None:
        assert self._ema is not None
        self.join()
        stream = self._stream
        if stream is not None:
            # The side stream must see the weights the optimizer just wrote.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                pairs = zip(self._params, self._ema, strict=True)
                current = [p.detach().to(e.device, non_blocking=True) for p, e in pairs]
                if not self.cpu_offload:
                    _ema_update(self._ema, current, self.decay)
        else:
            current = [p.detach() for p in self._params]
            if not self.cpu_offload:
                _ema_update(self._ema, current, self.decay)
        if self.cpu_offload:
            # On CPU-only training ``current`` aliases the weights: the join before the next
            # optimizer step keeps the worker from reading them while they change.
            self._thread = threading.Thread(target=_cpu_worker, args=(self._ema, current, self.decay, stream),
                                            name="expbus-ema", daemon=True)
            self._thread.start()

    @torch.no_grad()
    def swap_model_weights(self) -> None:
        """Exchange the model's trainable weights with the average, in place."""
        if self._ema is None:
            return
        self.join()
        for param, average in zip(self._params, self._ema, strict=True):
            held = param.detach().clone()
            param.copy_(average)
            average.copy_(held)
        self._swapped = not self._swapped

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Run a block with the EMA weights in the model, then swap back."""
        self.swap_model_weights()
        try:
            yield
        finally:
            self.swap_model_weights()

    # -- training hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget what an earlier run restored; a new ``fit`` also starts a new average (or restores one)."""
        self.join()
        self._pending = None
        self._from_twin = False
        if stage == "fit":
            self._ema = None  # a ``test`` after ``fit`` keeps the average ``fit`` left

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the average from the weights now (or the restored state), on the device they train on."""
        if self._ema is None:  # the sanity check may have built it from the restored state already
            self._materialize(pl_module)
        self._last_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Join the update in flight: the step is about to change the weights it reads."""
        self.join()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Update after a real optimizer step (``global_step`` moved), every ``every_n_steps``-th one."""
        step = trainer.global_step
        if self._ema is None or step <= self._last_step:
            return  # an accumulation micro-batch, or no optimizer step (a skipped AMP step)
        self._last_step = step
        # Zero-based index of the step just taken: the first step updates, as in NeMo.
        if (step - 1) % self.every_n_steps == 0:
            self._update()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish the update in flight (the model keeps its trained weights, as in NeMo)."""
        self.join()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Leave the trained weights in the model if the run fails during a swapped evaluation."""
        if self._swapped:
            self.swap_model_weights()
        self.join()

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate_start(self, pl_module: pl.LightningModule) -> None:
        if self._ema is None and self._pending is not None:
            # The sanity check of a resumed fit, or ``trainer.test(ckpt_path=...)``: the restored average.
            self._materialize(pl_module)
        if not self.validate_original_weights and not self._swapped:
            self.swap_model_weights()

    def _evaluate_end(self) -> None:
        if self._swapped:
            self.swap_model_weights()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate with the EMA weights."""
        self._evaluate_start(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the trained weights back (before the checkpoint callback saves them)."""
        self._evaluate_end()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Test with the EMA weights."""
        self._evaluate_start(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the trained weights back."""
        self._evaluate_end()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The average (absent in a twin, whose model weights are the average) and its step."""
        self.join()
        state: dict[str, Any] = {"decay": self.decay, "every_n_steps": self.every_n_steps,
                                 "last_step": self._last_step, "ema_weights_as_model": self._saving_twin}
        if not self._saving_twin:
            ema = self._ema if self._ema is not None else self._pending
            state["ema"] = [t.detach().cpu().clone() for t in ema] if ema is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the restored average until training starts on the right device."""
        self._last_step = int(state_dict.get("last_step", -1))
        ema = state_dict.get("ema")
        if ema is not None:
            self._pending = list(ema)
            self._ema = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Resume from a twin with its weights as the model, or find the average a base checkpoint lacks."""
        path = os.fspath(trainer.ckpt_path or "")
        self._from_twin = False
        if path.endswith(EMA_CHECKPOINT_SUFFIX):
            log.info("Loading EMA weights from %s as the model's weights; a new EMA starts from them", path)
            self._from_twin = True
            return
        states = checkpoint.get("callbacks") or {}
        if any(key.startswith("EMA") and isinstance(value, dict) and value.get("ema") is not None
               for key, value in states.items()):
            return  # ``load_state_dict`` restores the average
        if not path:
            return
        twin = path.removesuffix(".ckpt") + EMA_CHECKPOINT_SUFFIX
        if not os.path.exists(twin):
            raise FileNotFoundError(f"EMA: the checkpoint {path} holds no EMA state and its EMA twin is missing; "
                                    f"expected the EMA weights at {twin}")
        twin_state = trainer.strategy.load_checkpoint(twin)["state_dict"]
        names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        missing = [name for name in names if name not in twin_state]
        if missing:
            raise RuntimeError(f"EMA: the twin {twin} lacks the weights {missing[:5]}")
        self._pending = [twin_state[name] for name in names]
        log.info("EMA state restored from %s", twin)

    def save_ema_checkpoint(self, trainer: pl.Trainer, path: str) -> None:
        """Write ``path`` (the ``-EMA.ckpt`` twin) with the average as the model weights.

        exp_manager's checkpoint callback calls this after each save, under the base
        checkpoint's ``-unfinished`` marker.
        """
        if self._ema is None:
            return
        callback = trainer.checkpoint_callback
        weights_only = bool(getattr(callback, "save_weights_only", False))
        self._saving_twin = True
        try:
            if self._swapped:  # saved during an evaluation: the model already holds the average
                trainer.save_checkpoint(path, weights_only=weights_only)
            else:
                with self.swapped():
                    trainer.save_checkpoint(path, weights_only=weights_only)
        finally:
            self._saving_twin = False
