"""Which checkpoint a run resumes from (NeMo's ``check_resume`` matrix), set as ``trainer.ckpt_path``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ._errors import NotFoundError
from ._unfinished import is_checkpoint_unfinished

__all__ = ["check_resume", "find_resume_checkpoint"]

log = logging.getLogger("expbus.exp_manager")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _candidates(checkpoint_dir: Path, suffix: str) -> list[Path]:
    """``*<suffix>.ckpt`` files or folders anywhere below, and ``*<suffix>`` folders directly inside."""
    found = set(checkpoint_dir.rglob(f"*{suffix}.ckpt"))
    found.update(d for d in checkpoint_dir.glob(f"*{suffix}") if d.is_dir())
    return sorted(p for p in found if not p.name.startswith("."))


def _finished(paths: list[Path], kind: str) -> list[Path]:
    """Drop unfinished checkpoints; if every one of them is unfinished, refuse to go on (never start over silently)."""
    finished = [p for p in paths if not is_checkpoint_unfinished(p)]
    skipped = [p for p in paths if p not in finished]
    for path in skipped:
        log.warning("Checkpoint %s has the unfinished marker set - skipped while looking for the %s one.", path, kind)
    if paths and not finished:
        raise ValueError(
            f"{kind.capitalize()} checkpoint is unfinished and cannot be used to resume the training: "
            f"{[str(p) for p in paths]}. Please remove the checkpoint manually to avoid unexpected consequences, "
            "such as restarting from scratch. Hint: add the step to the checkpoint name pattern "
            "(filename: '...-{step}') so that an earlier finished last checkpoint remains to resume from.")
    return finished


def find_resume_checkpoint(
    checkpoint_dir: Path,
    *,
    resume_past_end: bool = False,
) -> Path | None:
    """The checkpoint ``resume_if_exists`` resumes from in ``checkpoint_dir``, or ``None`` when there is none.

    ``*end.ckpt`` (a finished run) comes before ``*last.ckpt``; each may also be a folder
    (``...-last/`` or ``...-last.ckpt/``). Unfinished ones are skipped, but only when a
    finished one remains: one finished ``-last`` beside unfinished ones is unambiguous (the
    previous save that a crash interrupted the replacement of).

    Raises:
        ValueError: an end checkpoint without ``resume_past_end``; several finished end or
            last checkpoints; only unfinished ones.
    """
    if not checkpoint_dir.is_dir():
        return None
    end = _finished(_candidates(checkpoint_dir, "end"), "end")
    last = _finished(_candidates(checkpoint_dir, "last"), "last")
    if end:
        if not resume_past_end:
            raise ValueError(f"Found {end[0]} indicating that the last training run has already completed. "
                             "Set resume_past_end: true to resume from it anyway.")
        if len(end) > 1:
            raise ValueError(f"Multiple checkpoints {[str(p) for p in end]} that match *end.ckpt; keep one.")
        return end[0]
    if len(last) > 1:
        raise ValueError(f"Multiple checkpoints {[str(p) for p in last]} that match *last.ckpt; exp_manager cannot "
                         "tell which one to resume from. Remove all but one (usually the one with the highest step).")
    return last[0] if last else None


def check_resume(
    trainer: Any,
    log_dir: str | os.PathLike[str],
    *,
    resume_if_exists: bool = False,
    resume_past_end: bool = False,
    resume_ignore_no_checkpoint: bool = False,
    dirpath: str | os.PathLike[str] | None = None,
    resume_from_checkpoint: str | os.PathLike[str] | None = None,
) -> None:
    """Choose the checkpoint to resume from and set ``trainer.ckpt_path`` (NeMo's ``check_resume``).

    With ``resume_if_exists``, the checkpoint folder (``dirpath``, else ``log_dir/checkpoints``)
    is searched: no folder or no checkpoint is a :class:`NotFoundError` unless
    ``resume_ignore_no_checkpoint`` (then a warning, and training starts from scratch or from
    ``resume_from_checkpoint``); an ``*end.ckpt`` needs ``resume_past_end``; several
    ``*last.ckpt`` are an error naming them; a ``-last`` that is unfinished is skipped only when
    exactly one finished ``-last`` remains, otherwise it is an error (never a silent fresh start).

    A ``-last`` found by ``resume_if_exists`` wins over ``resume_from_checkpoint`` (NeMo's
    code does this, although its docstring says the opposite): it is this run's own newer
    state, while ``resume_from_checkpoint`` is where the run first started. So a job that is
    preempted and requeued with the same config continues from its own ``-last``.
    ``resume_from_checkpoint`` is used when ``resume_if_exists`` is false, or when nothing is
    found and ``resume_ignore_no_checkpoint`` is true.

    Moving earlier log files into ``run_N/`` is not done here (the directories step does it).

    Args:
        trainer: the Trainer; its ``ckpt_path`` is set when a checkpoint is chosen.
        log_dir: the run's log directory.
        resume_if_exists: look for this run's checkpoint to resume from.
        resume_past_end: allow resuming from an ``*end.ckpt``.
        resume_ignore_no_checkpoint: a missing checkpoint is a warning, not an error.
        dirpath: ``checkpoint_callback_params.dirpath`` (where checkpoints are).
        resume_from_checkpoint: an explicit checkpoint path.

    Raises:
        NotFoundError: no checkpoint to resume from, or ``resume_from_checkpoint`` (when used)
            does not exist.
        ValueError: see :func:`find_resume_checkpoint`.
    """
    if not log_dir:
        raise ValueError(f"Resuming requires the log_dir {log_dir} to be passed to exp_manager")
    checkpoint: str | None = os.fspath(resume_from_checkpoint) if resume_from_checkpoint else None
    if resume_if_exists:
        checkpoint_dir = Path(dirpath) if dirpath else Path(log_dir) / "checkpoints"
        found = find_resume_checkpoint(checkpoint_dir, resume_past_end=resume_past_end)
        if found is not None:
            if checkpoint is not None:
                log.info("resume_if_exists found %s; it is used instead of resume_from_checkpoint %s",
                         found, checkpoint)
            checkpoint = str(found)
        else:
            where = (f"There were no checkpoints found in checkpoint_dir or no checkpoint folder at "
                     f"checkpoint_dir :{checkpoint_dir}. ")
            if not resume_ignore_no_checkpoint:
                hint = (" Set resume_ignore_no_checkpoint: true to start from resume_from_checkpoint."
                        if checkpoint else " Set resume_ignore_no_checkpoint: true to train from scratch instead.")
                raise NotFoundError(where + "Cannot resume." + hint)
            log.warning(where + ("Training from scratch." if checkpoint is None else f"Training from {checkpoint}."))
    if checkpoint is None:
        return
    if not _is_remote(checkpoint) and not Path(checkpoint.removeprefix("file://")).exists():
        raise NotFoundError(f"resume_from_checkpoint: {checkpoint} does not exist")
    trainer.ckpt_path = checkpoint
    log.info("Resuming training from checkpoint: %s", checkpoint)
