"""exp_manager's ``ModelCheckpoint``: NeMo's names, unfinished markers, top-k rebuilt on resume, weights export."""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from expbus.bus import CheckpointSaved, now

from ._checkpoint_params import CallbackParams
from ._errors import CheckpointMisconfigurationError
from ._export import export_weights
from ._unfinished import (
    UNFINISHED_CHECKPOINT_SUFFIX,
    checkpoint_exists,
    ckpt_to_dir,
    ema_twin,
    format_checkpoint_unfinished_marker_path,
    is_checkpoint_unfinished,
    remove_checkpoint_unfinished_marker,
    remove_unfinished_checkpoints,
    set_checkpoint_unfinished_marker,
)

__all__ = ["ExpModelCheckpoint", "configure_checkpointing", "parse_time_interval"]

log = logging.getLogger("expbus.exp_manager")

_NUMBER = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)"
_LAST_STEM = re.compile(r"(?:^|-)last(?:-v\d+)?$")
_AUTO_KEYS = ("epoch", "step")


def _is_last_name(path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint file or directory name is a ``-last`` checkpoint (``x-last.ckpt``, ``x-last/``)."""
    return bool(_LAST_STEM.search(Path(os.fspath(path)).name.removesuffix(".ckpt")))


def _is_ema_name(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith("-EMA.ckpt")


class ExpModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with NeMo's ``NeMoModelCheckpoint`` behaviour, for any ``LightningModule``.

    On top of Lightning's top-k / last logic (reused, not copied) it:

    * puts an ``-unfinished`` marker beside every checkpoint while it is written or removed,
      and at ``setup`` (global rank 0) deletes checkpoints a crash left unfinished and
      orphan markers;
    * on resume, rebuilds the top-k from the checkpoint files (monitor values parsed from
      their names), then keeps only entries that exist and are finished, also when the
      top-k comes from the resumed checkpoint's state;
    * removes the ``-last`` checkpoint a run resumed from once a new ``-last`` is written,
      so exactly one remains, and writes ``-last`` at train end if the last step is not saved;
    * writes the weights-only export (``<prefix><postfix>``, NeMo's ``.nemo``) at train end,
      at every save (``always_save_nemo``), from the best checkpoint (``save_best_model``);
    * lets a callback with a ``save_ema_checkpoint(trainer, path)`` method write a checkpoint's
      ``-EMA.ckpt`` twin under the checkpoint's marker, and removes the twin with it;
    * treats a checkpoint stored as a directory (``x.ckpt/`` or ``x/``) like a file;
    * fails with one clear error when the monitored metric is never logged.

    Saves still go through ``trainer.save_checkpoint``, so the bridge reports them; exports
    are reported to the bridge's bus as ``CheckpointSaved``.

    Args:
        always_save_nemo: write the export after every checkpoint save.
        save_nemo_on_train_end: write the export at train end.
        save_best_model: export the best checkpoint's weights (and, at train end, leave them
            in the module, as NeMo does).
        prefix: export file name before ``postfix``.
        postfix: export file extension.
        n_resume: the run resumes: rebuild the top-k from the files on disk.
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    UNFINISHED_CHECKPOINT_SUFFIX = UNFINISHED_CHECKPOINT_SUFFIX
    format_checkpoint_unfinished_marker_path = staticmethod(format_checkpoint_unfinished_marker_path)
    is_checkpoint_unfinished = staticmethod(is_checkpoint_unfinished)

    def __init__(
        self,
        *,
        always_save_nemo: bool = False,
        save_nemo_on_train_end: bool = True,
        save_best_model: bool = False,
        prefix: str = "",
        postfix: str = ".nemo",
        n_resume: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.always_save_nemo = always_save_nemo
        self.save_nemo_on_train_end = save_nemo_on_train_end
        self.save_best_model = save_best_model
        self.prefix = prefix
        self.postfix = postfix
        self.n_resume = n_resume
        # An instance attribute (NeMo sets the class attribute, which leaks between runs).
        self.CHECKPOINT_NAME_LAST = (self.filename or "{epoch}-{step}") + "-last"
        self.previous_best_path = ""
        self._last_export_step: int | None = None
        self._warned_missing_monitor = False
        if save_best_model and not save_nemo_on_train_end:
            log.warning("Found save_best_model is True and save_nemo_on_train_end is False. "
                        "Set save_nemo_on_train_end to True to automatically save the best model.")

    # -- markers (NeMo's static API, with barriers) -------------------------------------
    @staticmethod
    def set_checkpoint_unfinished_marker(checkpoint_path: str | os.PathLike[str], barrier_after: bool = False,
                                         trainer: pl.Trainer | None = None) -> None:
        """Mark a checkpoint unfinished (global rank 0 writes the marker; other ranks may wait after)."""
        if trainer is None or trainer.is_global_zero:
            set_checkpoint_unfinished_marker(checkpoint_path)
        if barrier_after and trainer is not None:
            trainer.strategy.barrier()

    @staticmethod
    def remove_checkpoint_unfinished_marker(checkpoint_path: str | os.PathLike[str], barrier_before: bool = False,
                                            trainer: pl.Trainer | None = None) -> None:
        """Clear a checkpoint's marker (every rank waits first, then global rank 0 removes it)."""
        if barrier_before and trainer is not None:
            trainer.strategy.barrier()
        if trainer is None or trainer.is_global_zero:
            remove_checkpoint_unfinished_marker(checkpoint_path)

    # -- setup and resume ---------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the folder, remove unfinished checkpoints (rank 0), rebuild the top-k when resuming."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.dirpath is None:
            return
        if trainer.is_global_zero:
            remove_unfinished_checkpoints(self.dirpath)
        trainer.strategy.barrier()
        if not self.last_model_path and trainer.ckpt_path and _is_last_name(trainer.ckpt_path):
            # So that the -last checkpoint this run resumes from is replaced, not kept beside the new one.
            self.last_model_path = str(trainer.ckpt_path)
        if self.n_resume:
            self._topk_from_files(trainer)

    def _saved_checkpoint_paths(self) -> list[str]:
        """Finished checkpoints in the folder as ``ModelCheckpoint`` names them (``x.ckpt`` also for ``x/``)."""
        assert self.dirpath is not None
        root = Path(self.dirpath)
        if not root.is_dir():
            return []
        paths: list[str] = []
        for entry in root.iterdir():
            name = entry.name
            if name.startswith(".") or name.endswith(UNFINISHED_CHECKPOINT_SUFFIX):
                continue  # staging folders of exports, markers
            if name.endswith(".ckpt"):
                paths.append(str(entry))  # a file, or a directory checkpoint named like one
            elif entry.is_dir():
                paths.append(str(entry) + ".ckpt")  # a distributed checkpoint stored as ``x/``
        return sorted(p for p in paths if not is_checkpoint_unfinished(p))

    def _monitor_value(self, path: str) -> float | None:
        assert self.monitor is not None
        name = Path(path).name.removesuffix(".ckpt")
        for key in dict.fromkeys((self.monitor, self.monitor.replace("/", "_"))):
            match = re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}={_NUMBER}", name)
            if match:
                return float(match.group(0)[len(key) + 1:])
        return None

    def _topk_from_files(self, trainer: pl.Trainer) -> None:
        """NeMo's ``nemo_topk_check_previous_run``: the top-k from the checkpoint names on disk."""
        if self.monitor is None or self.save_top_k == 0:
            return
        scores: dict[str, float] = {}
        for path in self._saved_checkpoint_paths():
            if _is_last_name(path) or _is_ema_name(path):
                continue
            value = self._monitor_value(path)
            if value is not None:
                scores[path] = value
        if not scores:
            return
        ranked = sorted(scores, key=scores.__getitem__, reverse=self.mode == "max")
        if self.save_top_k > 0:
            for path in ranked[self.save_top_k:]:
                log.info("Removing checkpoint %s: beyond save_top_k=%d", path, self.save_top_k)
                self._remove_checkpoint(trainer, path)
            ranked = ranked[: self.save_top_k]
        self.best_k_models = {path: torch.tensor(scores[path]) for path in ranked}
        self._refresh_best()

    def _refresh_best(self) -> None:
        """Recompute best/kth from ``best_k_models`` (after entries were dropped or rebuilt)."""
        if not self.best_k_models:
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            self.best_model_path = ""
            self.best_model_score = None
            return
        ranked = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=self.mode == "max")
        self.kth_best_model_path = ranked[-1]
        self.kth_value = self.best_k_models[ranked[-1]]
        self.best_model_path = ranked[0]
        self.best_model_score = self.best_k_models[ranked[0]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore Lightning's state, then drop top-k entries that are missing or unfinished."""
        super().load_state_dict(state_dict)
        kept = {path: score for path, score in self.best_k_models.items()
                if checkpoint_exists(path) and not is_checkpoint_unfinished(path)}
        if len(kept) != len(self.best_k_models):
            dropped = sorted(set(self.best_k_models) - set(kept))
            log.info("Top-k entries dropped on resume (missing or unfinished): %s", dropped)
        self.best_k_models = kept
        # Also when Lightning kept only ``best_model_path`` (the folder moved): it must name a kept file.
        if kept or not self.best_model_path or not checkpoint_exists(self.best_model_path):
            self._refresh_best()

    # -- saving and removing --------------------------------------------------------------
    def _should_save_on_train_epoch_end(self, trainer: pl.Trainer) -> bool:
        # NeMo's default ``save_on_train_epoch_end: False`` saves only after validation; a run
        # without validation would then never save until the end. Save at epoch end instead.
        if self._save_on_train_epoch_end is False and not trainer.enable_validation:
            return True
        return super()._should_save_on_train_epoch_end(trainer)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.save_top_k != 0 and self.monitor is not None and self.monitor not in monitor_candidates:
            message = _missing_metric_message(self.monitor, monitor_candidates)
            # Before the first validation a validation metric may legitimately be missing.
            if trainer.fit_loop.epoch_loop.val_loop._has_run or not trainer.enable_validation:
                raise CheckpointMisconfigurationError(message)
            if not self._warned_missing_monitor:
                self._warned_missing_monitor = True
                log.warning("%s (no top-k checkpoint until it is logged)", message)
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.set_checkpoint_unfinished_marker(filepath, barrier_after=True, trainer=trainer)
        super()._save_checkpoint(trainer, filepath)
        # An EMA callback writes its ``-EMA.ckpt`` twin here, under the same marker (as NeMo's EMA does).
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            save_twin = getattr(callback, "save_ema_checkpoint", None)
            if callable(save_twin):
                save_twin(trainer, ema_twin(filepath))
        self.remove_checkpoint_unfinished_marker(filepath, barrier_before=True, trainer=trainer)
        if self.always_save_nemo:
            self._export_on_save(trainer)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.set_checkpoint_unfinished_marker(filepath, barrier_after=True, trainer=trainer)
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            # Directory form of a distributed checkpoint (``x/`` for ``x.ckpt``) and the EMA twin.
            directory = ckpt_to_dir(filepath)
            if not os.path.lexists(filepath) and directory.is_dir():
                super()._remove_checkpoint(trainer, str(directory))
            twin = ema_twin(filepath)
            if checkpoint_exists(twin):
                super()._remove_checkpoint(trainer, twin)
        self.remove_checkpoint_unfinished_marker(filepath, barrier_before=True, trainer=trainer)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Lightning keeps the checkpoint a run resumed from; NeMo removes a resumed ``-last``
        # once a new ``-last`` is written, so that exactly one ``-last`` remains.
        resumed = trainer.ckpt_path
        if (resumed is not None and previous != current and _is_last_name(previous) and _is_last_name(current)
                and Path(previous).absolute() == Path(resumed).absolute() and self.dirpath is not None
                and Path(self.dirpath).absolute() in Path(previous).absolute().parents):
            return True
        return super()._should_remove_checkpoint(trainer, previous, current)

    def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
        """Whether the checkpoint exists as a file or in directory form (``x/`` for ``x.ckpt``), on rank 0."""
        if super().file_exists(filepath, trainer):
            return True
        return super().file_exists(str(ckpt_to_dir(filepath)), trainer)

    # -- train end ------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write ``-last`` if the last step is not saved under its name, restore the best weights, export."""
        if getattr(trainer, "fast_dev_run", False):
            return
        if self.save_last and trainer.global_step > 0:
            candidates = self._monitor_candidates(trainer)
            expected = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            already = (self._last_global_step_saved == trainer.global_step
                       and os.path.abspath(self.last_model_path or "") == os.path.abspath(expected))
            if not already:
                self._save_last_checkpoint(trainer, candidates)
            super().on_train_end(trainer, pl_module)
        if self.save_best_model:
            trainer.strategy.barrier()
            if not self.best_model_path or not checkpoint_exists(self.best_model_path):
                log.warning("%s was told to save the best checkpoint at the end of training, but no saved "
                            "checkpoints were found. Saving latest model instead.", type(self).__name__)
            else:
                self._load_weights(trainer, self.best_model_path)
        if self.save_nemo_on_train_end:
            self._export(trainer, pl_module, is_best=self.save_best_model and bool(self.best_model_path))

    # -- weights export -----------------------------------------------------------------
    def _export_path(self) -> Path:
        assert self.dirpath is not None
        return Path(os.path.abspath(os.path.expanduser(os.path.join(self.dirpath, self.prefix + self.postfix))))

    def _load_weights(self, trainer: pl.Trainer, path: str) -> None:
        checkpoint = trainer.strategy.load_checkpoint(path)
        trainer.strategy.load_model_state_dict(checkpoint, strict=True)

    def _export_on_save(self, trainer: pl.Trainer) -> None:
        pl_module = trainer.lightning_module
        if self.save_best_model:
            if not self.best_model_path or not checkpoint_exists(self.best_model_path):
                return
            if self.best_model_path == self.previous_best_path:
                return  # the best did not change: the export on disk is current
            self.previous_best_path = self.best_model_path
            current = copy.deepcopy(pl_module.state_dict())
            try:
                self._load_weights(trainer, self.best_model_path)
                self._export(trainer, pl_module, is_best=True)
            finally:
                pl_module.load_state_dict(current, strict=True)
        else:
            if self._last_export_step == trainer.global_step:
                return  # a top-k save and the -last save of one step export the same weights
            self._export(trainer, pl_module, is_best=False)
        self._last_export_step = trainer.global_step

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, is_best: bool) -> None:
        if trainer.is_global_zero:
            path = export_weights(pl_module, self._export_path())
            log.info("Weights export saved to %s", path)
            self._report_export(trainer, path, is_best)
        trainer.strategy.barrier()

    def _report_export(self, trainer: pl.Trainer, path: Path, is_best: bool) -> None:
        """Publish the export as ``CheckpointSaved`` on the bridge's bus (the bridge sees only ``save_checkpoint``)."""
        from ..callback import BridgeCallback

        value: Any = self.best_model_score if is_best else (
            trainer.callback_metrics.get(self.monitor) if self.monitor else None)
        try:
            score = float(value) if value is not None else None
            size = os.path.getsize(path) if path.is_file() else None
        except (TypeError, ValueError, OSError):
            score, size = None, None
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            bus = callback.bus if isinstance(callback, BridgeCallback) else None
            if bus is not None:
                bus.publish(CheckpointSaved(
                    time=now(), path=str(path), step=int(trainer.global_step), epoch=int(trainer.current_epoch),
                    monitor=self.monitor, monitor_value=score, is_last=False, is_best=is_best, size_bytes=size,
                ))


def _missing_metric_message(monitor: str, candidates: Mapping[str, Any]) -> str:
    logged = sorted(k for k in candidates if k not in _AUTO_KEYS)
    close = difflib.get_close_matches(monitor, logged, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"checkpoint_callback_params.monitor: the monitored metric {monitor!r} was not logged{hint} "
            f"Logged metrics: {logged or 'none'}. Log it with self.log({monitor!r}, value) in the "
            "LightningModule, monitor a logged metric, or set monitor: null to save without ranking.")


def parse_time_interval(value: Any) -> timedelta | None:
    """``train_time_interval`` as a ``timedelta``: seconds, ``"[DD:]HH:MM:SS"``, a ``timedelta`` or its kwargs.

    NeMo passes the value through (Hydra's ``_target_: datetime.timedelta`` builds it);
    a mapping with or without that ``_target_`` is accepted here too.

    Raises:
        CheckpointMisconfigurationError: the value is none of these.
    """
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        return timedelta(seconds=value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        if 3 <= len(parts) <= 4 and all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            numbers = [float(p) for p in parts]
            days = numbers[0] if len(numbers) == 4 else 0.0
            hours, minutes, seconds = numbers[-3:]
            return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(value, Mapping):
        kwargs = {str(k): v for k, v in value.items() if k != "_target_"}
        target = value.get("_target_", "datetime.timedelta")
        if target in ("datetime.timedelta", "timedelta"):
            try:
                return timedelta(**kwargs)
            except TypeError as exc:
                raise CheckpointMisconfigurationError(
                    f"checkpoint_callback_params.train_time_interval: {exc} (got {dict(value)!r})") from None
    raise CheckpointMisconfigurationError(
        f"checkpoint_callback_params.train_time_interval: expected seconds, 'HH:MM:SS', 'DD:HH:MM:SS' or "
        f"timedelta keyword arguments such as {{minutes: 30}} (got {value!r})")


def configure_checkpointing(
    trainer: pl.Trainer,
    log_dir: Path,
    name: str,
    resume: bool,
    params: CallbackParams,
) -> ExpModelCheckpoint:
    """Add exp_manager's ``ModelCheckpoint`` to the trainer, configured as NeMo's ``configure_checkpointing``.

    Defaults (NeMo's): ``dirpath`` = ``log_dir/checkpoints``; ``filename`` =
    ``<name>--{<monitor>:.4f}-{epoch}`` (``<name>--{epoch}-{step}`` without a monitor); the
    last checkpoint is ``<filename>-last.ckpt``; the export is ``<prefix or name><postfix>``.
    The deprecated ``filepath`` gives ``dirpath`` (its parent) and ``filename`` (its name)
    where those are unset. Better than NeMo: ``monitor: null`` saves every N steps/epochs
    keeping the newest ``save_top_k`` checkpoints (all with ``-1``).

    Args:
        trainer: the Trainer (created with ``enable_checkpointing=False``).
        log_dir: the run's log directory.
        name: the experiment name (checkpoint and export names start with it).
        resume: the run resumes (``resume_if_exists``): the top-k is rebuilt from the files.
        params: ``checkpoint_callback_params``.

    Returns:
        The callback, appended to ``trainer.callbacks``.

    Raises:
        CheckpointMisconfigurationError: the trainer already has a ``ModelCheckpoint``, or the
            parameters cannot work together (the message names the key).
    """
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, ModelCheckpoint):
            raise CheckpointMisconfigurationError(
                "The Lightning trainer passed to exp_manager already has a ModelCheckpoint and "
                "create_checkpoint_callback is true. Create the Trainer with enable_checkpointing=False "
                "(and no ModelCheckpoint in callbacks), or set create_checkpoint_callback: false.")
    dirpath, filename = params.dirpath, params.filename
    if params.filepath is not None:
        if dirpath is None:
            dirpath = str(Path(params.filepath).parent)
        if filename is None:
            filename = Path(params.filepath).name
        log.warning("filepath is deprecated. Please switch to dirpath and filename instead "
                    "(checkpoint_callback_params.filepath=%r is used as dirpath=%r, filename=%r)",
                    params.filepath, dirpath, filename)
    if dirpath is None:
        dirpath = str(Path(log_dir) / "checkpoints")
    monitor, mode, save_top_k = params.monitor, params.mode or "min", params.save_top_k
    if save_top_k is None:
        save_top_k = 3
    auto_insert_metric_name = params.auto_insert_metric_name
    if filename is None:
        if monitor is None:
            filename = f"{name}--{{epoch}}-{{step}}"
        elif "/" in monitor:
            # ``{val/loss}`` would put a folder in the file name; spell the name out with '_'.
            filename = f"{name}--{monitor.replace('/', '_')}={{{monitor}:.4f}}-epoch={{epoch}}"
            auto_insert_metric_name = False
        else:
            filename = f"{name}--{{{monitor}:.4f}}-{{epoch}}"
    if monitor is None and save_top_k > 1:
        # Lightning cannot keep k > 1 checkpoints without a metric: rank them by step (newest kept).
        log.info("checkpoint_callback_params.monitor is null: keeping the %d newest checkpoints", save_top_k)
        monitor, mode = "step", "max"
    _log_ignored(params)
    every_n_epochs, every_n_steps = params.every_n_epochs, params.every_n_train_steps
    interval = parse_time_interval(params.train_time_interval)
    triggers = [key for key, on in (("every_n_epochs", bool(every_n_epochs)),
                                    ("every_n_train_steps", bool(every_n_steps)),
                                    ("train_time_interval", interval is not None)) if on]
    if len(triggers) > 1:
        raise CheckpointMisconfigurationError(
            f"checkpoint_callback_params: {' and '.join(triggers)} are both set but are mutually exclusive; "
            "set the others to 0 or null (NeMo's default every_n_epochs is 1, so step- or time-based "
            "checkpointing needs every_n_epochs: 0)")
    if save_top_k < -1:
        raise CheckpointMisconfigurationError(
            f"checkpoint_callback_params.save_top_k: must be -1 (all), 0 (none) or a count (got {save_top_k})")
    _warn_validation_schedule(trainer, monitor if params.monitor is not None else None)
    callback = ExpModelCheckpoint(
        always_save_nemo=params.always_save_nemo,
        save_nemo_on_train_end=bool(params.save_nemo_on_train_end),
        save_best_model=params.save_best_model,
        prefix=name if params.prefix is None else params.prefix,
        postfix=params.postfix,
        n_resume=resume,
        dirpath=dirpath,
        filename=filename,
        monitor=monitor,
        verbose=bool(params.verbose),
        save_last=bool(params.save_last),
        save_top_k=save_top_k,
        save_weights_only=bool(params.save_weights_only),
        mode=mode,
        auto_insert_metric_name=auto_insert_metric_name,
        every_n_epochs=every_n_epochs,
        every_n_train_steps=every_n_steps,
        train_time_interval=interval,
        save_on_train_epoch_end=params.save_on_train_epoch_end,
    )
    # NeMo: the -last this run resumes from is the current -last (replaced by the next one).
    if trainer.ckpt_path and _is_last_name(trainer.ckpt_path):
        callback.last_model_path = str(trainer.ckpt_path)
    trainer.callbacks.append(callback)  # type: ignore[attr-defined]
    return callback


def _log_ignored(params: CallbackParams) -> None:
    if params.model_parallel_size is not None:
        log.info("checkpoint_callback_params.model_parallel_size=%s is accepted and ignored (no NeMo model "
                 "parallelism here)", params.model_parallel_size)
    if params.async_save:
        log.warning("checkpoint_callback_params.async_save=true is accepted and ignored: checkpoints are saved "
                    "synchronously")
    if params.save_last_n_optim_states is not None and params.save_last_n_optim_states >= 0:
        log.warning("checkpoint_callback_params.save_last_n_optim_states=%s is accepted and ignored (NeMo "
                    "distributed checkpoints only): optimizer states are kept", params.save_last_n_optim_states)


def _warn_validation_schedule(trainer: pl.Trainer, monitor: str | None) -> None:
    """NeMo's warnings about monitoring a validation metric that validation may never produce."""
    if monitor is None or "val" not in monitor:
        return
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    check_every = trainer.check_val_every_n_epoch
    if max_epochs is not None and max_epochs != -1 and check_every is not None and max_epochs < check_every:
        log.error(
            "The checkpoint callback was told to monitor a validation value but trainer.max_epochs(%s) was less "
            "than trainer.check_val_every_n_epoch(%s). It is very likely this run will fail with "
            "ModelCheckpoint(monitor='%s') not found in the returned metrics. Please ensure that validation is run "
            "within trainer.max_epochs.", max_epochs, check_every, monitor)
    elif max_steps is not None and max_steps != -1:
        log.warning(
            "The checkpoint callback was told to monitor a validation value and trainer's max_steps was set to %s. "
            "Please ensure that max_steps will run for at least %s epochs to ensure that checkpointing will not "
            "error out.", max_steps, check_every)
