"""Where a run lives and what it is called: the run directory, its stable run id, per-rank journals."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import msgspec

from expbus.sinks import ExpbusConfig
from expbus.sinks._state import ensure_private_dir

__all__ = ["RUN_ID_FILE", "read_or_create_run_id", "config_for_rank"]

RUN_ID_FILE = Path(".expbus") / "run_id"


def read_or_create_run_id(run_dir: Path) -> str:
    """The run id stored in ``run_dir/.expbus/run_id``, created on the first run.

    A resumed run (same run directory) keeps its id, so every sink sees one run.
    """
    path = run_dir / RUN_ID_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    run_id = uuid.uuid4().hex
    # The first thing a bridged run writes into .expbus: the folder is the user's only (0700).
    ensure_private_dir(path.parent)
    # Write then rename: a crash never leaves an empty id file behind.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def config_for_rank(config: ExpbusConfig, global_rank: int) -> ExpbusConfig:
    """The configuration one rank builds its bus from.

    Every rank journals what it published, but only rank 0 owns ``journal.msgpack``:
    rank N writes ``journal.rankN.msgpack`` beside it, so no two processes append to one file.
    """
    if global_rank == 0:
        return config
    name = Path(config.journal.name)
    journal = msgspec.structs.replace(config.journal, name=f"{name.stem}.rank{global_rank}{name.suffix}")
    return msgspec.structs.replace(config, journal=journal)
