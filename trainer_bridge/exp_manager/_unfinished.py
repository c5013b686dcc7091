"""The ``-unfinished`` marker beside a checkpoint being written or removed, and the cleanup of what a crash left."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = [
    "UNFINISHED_CHECKPOINT_SUFFIX",
    "checkpoint_exists",
    "ckpt_to_dir",
    "ema_twin",
    "format_checkpoint_unfinished_marker_path",
    "is_checkpoint_unfinished",
    "remove_checkpoint_unfinished_marker",
    "remove_path",
    "remove_unfinished_checkpoints",
    "set_checkpoint_unfinished_marker",
]

log = logging.getLogger("expbus.exp_manager")

UNFINISHED_CHECKPOINT_SUFFIX = "-unfinished"
_CKPT = ".ckpt"
_EMA = "-EMA"


def format_checkpoint_unfinished_marker_path(checkpoint_path: str | os.PathLike[str]) -> Path:
    """A checkpoint's marker (NeMo's rule): the path without ``.nemo``, ``.ckpt``, ``-EMA``, plus ``-unfinished``.

    A checkpoint and its ``-EMA.ckpt`` twin share one marker; a directory checkpoint
    (``...-last/``) has the same marker as ``...-last.ckpt``.

    Args:
        checkpoint_path: the checkpoint file or directory; it need not exist.
    """
    text = os.fspath(checkpoint_path)
    text = text.removesuffix(".nemo").removesuffix(_CKPT).removesuffix(_EMA)
    return Path(text + UNFINISHED_CHECKPOINT_SUFFIX)


def is_checkpoint_unfinished(checkpoint_path: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint's marker exists (it was being written or removed when the run stopped)."""
    return format_checkpoint_unfinished_marker_path(checkpoint_path).exists()


def set_checkpoint_unfinished_marker(checkpoint_path: str | os.PathLike[str]) -> None:
    """Create the checkpoint's marker (call before writing or removing it; on global rank 0 only)."""
    marker = format_checkpoint_unfinished_marker_path(checkpoint_path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def remove_checkpoint_unfinished_marker(checkpoint_path: str | os.PathLike[str]) -> None:
    """Remove the checkpoint's marker if it exists (call once the write or removal is complete)."""
    format_checkpoint_unfinished_marker_path(checkpoint_path).unlink(missing_ok=True)


def ckpt_to_dir(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The directory form of a checkpoint path: ``x.ckpt`` is stored as ``x/`` by distributed checkpoint IO."""
    return Path(os.fspath(checkpoint_path).removesuffix(_CKPT))


def checkpoint_exists(checkpoint_path: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint exists as a file, a link, or a directory (``x.ckpt/`` or ``x/``)."""
    return os.path.lexists(checkpoint_path) or ckpt_to_dir(checkpoint_path).is_dir()


def ema_twin(checkpoint_path: str | os.PathLike[str]) -> str:
    """The ``-EMA.ckpt`` twin of a checkpoint path (EMA weights saved beside the base checkpoint)."""
    return os.fspath(checkpoint_path).removesuffix(_CKPT) + _EMA + _CKPT


def remove_path(path: str | os.PathLike[str]) -> bool:
    """Remove a file, link or directory tree; returns whether something was removed."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
        return True
    if os.path.isdir(path):
        shutil.rmtree(path)
        return True
    return False


def remove_unfinished_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete every checkpoint that has a marker, then every marker (orphans included).

    For each ``<base>-unfinished`` marker under ``checkpoint_dir`` this removes
    ``<base>.ckpt`` (file or directory), its ``<base>-EMA.ckpt`` twin and a ``<base>/``
    directory checkpoint. Call it on global rank 0 only, before training writes anything.

    Returns:
        The checkpoint paths that were removed.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    for marker in sorted(root.rglob(f"*{UNFINISHED_CHECKPOINT_SUFFIX}")):
        if not marker.is_file():
            continue
        base = str(marker)[: -len(UNFINISHED_CHECKPOINT_SUFFIX)]
        for candidate in (base + _CKPT, base + _EMA + _CKPT):
            if remove_path(candidate):
                log.warning("Removed unfinished checkpoint %s", candidate)
                removed.append(Path(candidate))
        # A bare ``<base>`` counts only as a directory checkpoint: a file of that name is not ours.
        if os.path.isdir(base) and not os.path.islink(base):
            shutil.rmtree(base)
            log.warning("Removed unfinished directory checkpoint %s", base)
            removed.append(Path(base))
        marker.unlink(missing_ok=True)
    return removed
