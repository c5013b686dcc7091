"""Turns checkpoint writes and removals of a Trainer into ``CheckpointSaved`` / ``CheckpointRemoved`` events.

Saves are observed at the one call every checkpoint write goes through,
``trainer.save_checkpoint(filepath, ...)`` (``ModelCheckpoint``, ``OnExceptionCheckpoint``
and the user all call it): the watcher wraps that method on the Trainer instance for the
run, so it learns the exact path once the file is written, even when a file such as
``last.ckpt`` is rewritten in place (a diff of ``ModelCheckpoint`` state alone cannot see
that). Each ``ModelCheckpoint``'s state (``best_k_models``, ``best_model_path``,
``last_model_path``) describes the file: monitor, score, ``is_best``, ``is_last``.

Removals (top-k pruning, a replaced ``last``) are found by checking, at the next callback
hook after a save, which reported files no longer exist; files ``ModelCheckpoint`` names
without a write (``save_last="link"``) are reported the same way.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from expbus.bus import CheckpointRemoved, CheckpointSaved, Event, now

__all__ = ["CheckpointWatcher"]

log = logging.getLogger("expbus.trainer_bridge")

_MISSING: Any = object()


class _Known(msgspec.Struct, frozen=True, kw_only=True):
    """What was reported about one checkpoint file when it was saved."""

    step: int
    epoch: int | None
    monitor: str | None
    monitor_value: float | None
    is_last: bool
    is_best: bool


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _on_disk(path: str) -> str:
    """Where a checkpoint really is: ``x.ckpt``, or the folder ``x/`` of a distributed layout."""
    local = _local(path)
    if not os.path.lexists(local) and local.endswith(".ckpt"):
        folder = local.removesuffix(".ckpt")
        if os.path.isdir(folder):
            return folder
    return local


def _size(path: str) -> int | None:
    """Bytes of a checkpoint file, or of every file under a checkpoint directory."""
    if not _is_local(path):
        return None
    local = _on_disk(path)
    try:
        st = os.stat(local)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(local):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _exists(path: str) -> bool:
    # ``lexists``: a dangling ``last.ckpt`` link still names a checkpoint that was not removed.
    return os.path.lexists(_on_disk(path))


def _as_float(value: Any) -> float | None:
    # Checkpoint events are rare and a checkpoint write has just copied every tensor to the
    # host, so reading one score here adds no device sync worth avoiding.
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class CheckpointWatcher:
    """Publishes checkpoint saves and removals of one Trainer (on global rank 0 only).

    Args:
        trainer: the ``lightning.pytorch.Trainer``.
        publish: called with each event (the bus's ``publish``, fetched at call time).
    """

    def __init__(self, trainer: Any, publish: Callable[[Event], None]) -> None:
        self._trainer = trainer
        self._publish = publish
        self._known: dict[str, _Known] = {}
        self._wrapper: Any = None
        self._previous: Any = _MISSING
        self._reported = False
        self.dirty = False
        """True after a save until the next :meth:`scan` (removals follow saves)."""

    # -- ModelCheckpoint state ----------------------------------------------------------
    def _model_checkpoints(self) -> list[Any]:
        from lightning.pytorch.callbacks import ModelCheckpoint

        return [cb for cb in self._trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]

    @staticmethod
    def _named_paths(mc: Any) -> Iterator[str]:
        yield from (str(p) for p in mc.best_k_models)
        for path in (mc.best_model_path, mc.last_model_path):
            if path:
                yield str(path)

    def _describe(self, path: str) -> _Known:
        trainer = self._trainer
        monitor: str | None = None
        value: Any = None
        is_last = is_best = False
        for mc in self._model_checkpoints():
            in_top_k = path in mc.best_k_models
            last = bool(mc.last_model_path) and str(mc.last_model_path) == path
            best = bool(mc.best_model_path) and str(mc.best_model_path) == path
            if not (in_top_k or last or best):
                continue
            monitor = mc.monitor
            is_last = is_last or last
            is_best = is_best or best
            if in_top_k:
                value = mc.best_k_models[path]
            elif monitor is not None and value is None:
                # ``last.ckpt``: the monitored value when it was written.
                value = trainer.callback_metrics.get(monitor)
        return _Known(
            step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
            monitor=monitor,
            monitor_value=_as_float(value),
            is_last=is_last,
            is_best=is_best,
        )

    # -- events -------------------------------------------------------------------------
    def _saved(self, path: str) -> None:
        info = self._describe(path)
        if _is_local(path):
            self._known[path] = info
        self._publish(CheckpointSaved(time=now(), path=path, size_bytes=_size(path), **msgspec.structs.asdict(info)))

    def seed(self) -> None:
        """Remember the checkpoints ``ModelCheckpoint`` already names (a resumed run) without reporting them."""
        for mc in self._model_checkpoints():
            for path in self._named_paths(mc):
                if _is_local(path) and path not in self._known and _exists(path):
                    self._known[path] = self._describe(path)

    def scan(self) -> None:
        """Report reported checkpoints that are gone, and named ones that appeared without a write."""
        self.dirty = False
        try:
            self._scan()
        except Exception as exc:  # reporting must never break the run
            self._report(exc)

    def _report(self, exc: Exception) -> None:
        if not self._reported:
            self._reported = True
            log.error("expbus: could not report a checkpoint: %s: %s", type(exc).__name__, exc)

    def _scan(self) -> None:
        for path, info in list(self._known.items()):
            if not _exists(path):
                del self._known[path]
                self._publish(CheckpointRemoved(time=now(), path=path, **msgspec.structs.asdict(info)))
        for mc in self._model_checkpoints():
            for path in self._named_paths(mc):
                if path not in self._known and _is_local(path) and _exists(path):
                    self._saved(path)

    # -- the save_checkpoint wrapper ----------------------------------------------------
    def install(self) -> None:
        """Wrap ``trainer.save_checkpoint`` on the instance (idempotent)."""
        if self._wrapper is not None:
            return
        trainer = self._trainer
        original = trainer.save_checkpoint
        self._previous = trainer.__dict__.get("save_checkpoint", _MISSING)
        watcher = self

        def save_checkpoint(filepath: Any, *args: Any, **kwargs: Any) -> Any:
            if watcher.dirty:
                watcher.scan()  # removals that followed the previous save come first
            result = original(filepath, *args, **kwargs)
            try:
                watcher._saved(str(filepath))
            except Exception as exc:  # reporting must never fail a checkpoint write
                watcher._report(exc)
            watcher.dirty = True
            return result

        trainer.save_checkpoint = save_checkpoint
        self._wrapper = save_checkpoint

    def uninstall(self) -> None:
        """Restore ``trainer.save_checkpoint`` (idempotent)."""
        wrapper, trainer = self._wrapper, self._trainer
        if wrapper is None:
            return
        self._wrapper = None
        if trainer.__dict__.get("save_checkpoint") is not wrapper:
            return  # wrapped again on top of us; leave it
        if self._previous is _MISSING:
            del trainer.save_checkpoint
        else:
            trainer.save_checkpoint = self._previous
