"""``clean_exp_ckpt``: delete a finished run's ``.ckpt`` and/or ``.nemo`` files (NeMo's helper, also a command)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._unfinished import remove_path

__all__ = ["clean_exp_ckpt", "main"]

log = logging.getLogger("expbus.exp_manager")


def clean_exp_ckpt(
    exp_log_dir: str | os.PathLike[str],
    remove_ckpt: bool = True,
    remove_nemo: bool = False,
    *,
    dry_run: bool = False,
) -> list[Path]:
    """Remove Lightning ``.ckpt`` and/or weights-only ``.nemo`` files from ``<exp_log_dir>/checkpoints``.

    As NeMo's ``clean_exp_ckpt``: typically called at the end of a hyperparameter-search
    job to save disk space once the metrics are in an experiment tracker. Checkpoints
    stored as directories (``x.ckpt/``) are removed as well.

    Args:
        exp_log_dir: the run's log directory (what ``exp_manager`` returned).
        remove_ckpt: remove every ``checkpoints/*.ckpt``.
        remove_nemo: remove every ``checkpoints/*.nemo``.
        dry_run: (expbus) remove nothing; return what would be removed.

    Returns:
        The removed paths (with ``dry_run``, the paths that would be removed).
    """
    checkpoints = Path(exp_log_dir) / "checkpoints"
    removed: list[Path] = []
    for wanted, pattern in ((remove_ckpt, "*.ckpt"), (remove_nemo, "*.nemo")):
        if not wanted:
            continue
        log.info("%s %s files ...", "Listing" if dry_run else "Deleting", pattern)
        for path in sorted(checkpoints.glob(pattern)):
            if dry_run:
                removed.append(path)
            elif remove_path(path):
                log.info("Deleted file : %s", path)
                removed.append(path)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m expbus.trainer_bridge.exp_manager._clean LOG_DIR [--keep-ckpt] [--remove-nemo]``.

    ``expbus clean`` is the fuller command (``--recursive``, ``--dry-run``, sizes).
    """
    parser = argparse.ArgumentParser(prog="clean_exp_ckpt", description=clean_exp_ckpt.__doc__.splitlines()[0]
                                     if clean_exp_ckpt.__doc__ else None)
    parser.add_argument("exp_log_dir", help="the run's log directory (the one holding checkpoints/)")
    parser.add_argument("--keep-ckpt", action="store_true", help="keep the .ckpt files")
    parser.add_argument("--remove-nemo", action="store_true", help="also remove the .nemo files")
    args = parser.parse_args(argv)
    if not (Path(args.exp_log_dir) / "checkpoints").is_dir():
        print(f"clean_exp_ckpt: {args.exp_log_dir}/checkpoints is not a directory", file=sys.stderr)
        return 2
    for path in clean_exp_ckpt(args.exp_log_dir, remove_ckpt=not args.keep_ckpt, remove_nemo=args.remove_nemo):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through main()
    raise SystemExit(main())
