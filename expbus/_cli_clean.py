"""``expbus clean EXP_DIR``: ``clean_exp_ckpt`` from the command line (free a finished run's checkpoint space)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_clean_parser", "find_runs"]


def add_clean_parser(commands: Any) -> None:
    """Register the ``clean`` subcommand on ``expbus``'s subparsers."""
    clean = commands.add_parser(
        "clean",
        help="delete a finished run's .ckpt (and optionally .nemo) files, as clean_exp_ckpt does",
        description=(
            "Delete the Lightning .ckpt files (checkpoint folders too) and, with --remove-nemo, the "
            "weights-only .nemo files in EXP_DIR/checkpoints, as clean_exp_ckpt(EXP_DIR, remove_ckpt, "
            "remove_nemo) does at the end of a job. EXP_DIR is a run's log directory (what exp_manager "
            "returned); with --recursive, every run under EXP_DIR (each folder holding a checkpoints/ "
            "folder), e.g. all the jobs of a sweep. Other files are kept. Removing the -last checkpoint "
            "means a rerun with resume_if_exists starts from scratch."
        ),
    )
    clean.add_argument("exp_dir", metavar="EXP_DIR", help="a run's log directory (holds checkpoints/)")
    clean.add_argument("--remove-ckpt", action=argparse.BooleanOptionalAction, default=True,
                       help="remove checkpoints/*.ckpt (default: yes)")
    clean.add_argument("--keep-ckpt", dest="remove_ckpt", action="store_false",
                       help="the same as --no-remove-ckpt")
    clean.add_argument("--remove-nemo", action=argparse.BooleanOptionalAction, default=False,
                       help="remove checkpoints/*.nemo (default: no)")
    clean.add_argument("-r", "--recursive", action="store_true",
                       help="clean every run directory under EXP_DIR")
    clean.add_argument("-n", "--dry-run", action="store_true",
                       help="remove nothing; list what would be removed")
    clean.set_defaults(func=_clean)


def find_runs(root: str | os.PathLike[str], recursive: bool) -> list[Path]:
    """The run directories to clean: ``root``, or with ``recursive`` every folder below it holding ``checkpoints/``.

    Args:
        root: a run's log directory, or (with ``recursive``) a folder of runs.
        recursive: search below ``root``; symbolic links to folders are not followed.

    Returns:
        The run directories, sorted; empty when none holds a ``checkpoints/`` folder.
    """
    root = Path(root)
    if not recursive:
        return [root] if (root / "checkpoints").is_dir() else []
    runs: list[Path] = []
    for folder, subfolders, _files in os.walk(root):
        if "checkpoints" in subfolders and (Path(folder) / "checkpoints").is_dir():
            runs.append(Path(folder))
            subfolders.remove("checkpoints")  # a run's checkpoints are not runs
    return sorted(runs)


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a checkpoint folder (links not followed)."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_symlink() or p.is_file())


def _clean(args: argparse.Namespace) -> int:
    from expbus.trainer_bridge.exp_manager._clean import clean_exp_ckpt

    if not (args.remove_ckpt or args.remove_nemo):
        print("expbus clean: nothing to do (--no-remove-ckpt without --remove-nemo)", file=sys.stderr)
        return 2
    root = Path(args.exp_dir)
    runs = find_runs(root, args.recursive)
    if not runs:
        hint = ""
        if not args.recursive and root.is_dir() and find_runs(root, recursive=True):
            hint = "; it holds runs below it: add --recursive to clean them all"
        print(f"expbus clean: {root / 'checkpoints'} is not a directory{hint}", file=sys.stderr)
        return 2
    files = size = 0
    status = 0
    for run in runs:
        try:
            listed = clean_exp_ckpt(run, remove_ckpt=args.remove_ckpt, remove_nemo=args.remove_nemo, dry_run=True)
            sizes = {path: _size(path) for path in listed}
            removed = listed if args.dry_run else clean_exp_ckpt(
                run, remove_ckpt=args.remove_ckpt, remove_nemo=args.remove_nemo)
        except OSError as exc:
            print(f"expbus clean: {run}: {exc}", file=sys.stderr)
            status = 1
            continue
        for path in removed:
            print(path)
        files += len(removed)
        size += sum(sizes.get(path, 0) for path in removed)
    verb = "would remove" if args.dry_run else "removed"
    print(f"expbus clean: {verb} {files} file(s), {size / 1e6:.1f} MB, in {len(runs)} run(s)", file=sys.stderr)
    return status
