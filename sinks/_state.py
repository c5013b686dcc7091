"""Small per-sink state kept in the run directory (backend run ids), so a resumed run continues."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from expbus.bus import SinkContext

__all__ = ["PRIVATE_DIR_MODE", "ensure_private_dir", "state_path", "load_state", "save_state"]

#: Mode of ``run_dir/.expbus`` and the folders expbus makes in it: run ids, delivery cursors
#: and backend run ids are the user's business only (where the platform has modes).
PRIVATE_DIR_MODE = 0o700


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and its missing parents) with mode 0700; an existing folder keeps its mode.

    ``Path.mkdir(parents=True, mode=...)`` applies the mode to the last folder only; here
    every folder this call creates gets it (``.expbus`` as well as ``.expbus/sinks``).
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            pass  # another process (rank, sink thread) made it meanwhile
    return path


def _file_name(sink_id: str) -> str:
    # Sink ids are YAML keys: a separator or '..' must not put the file outside the folder.
    safe = sink_id.replace(os.sep, "_").replace("/", "_")
    if os.altsep:
        safe = safe.replace(os.altsep, "_")
    if safe in ("", ".", ".."):
        safe = f"_{safe}_"
    return f"{safe}.json"


def state_path(context: SinkContext) -> Path:
    """``run_dir/.expbus/sinks/<sink_id>.json`` (path separators in the id become ``_``)."""
    return context.run_dir / ".expbus" / "sinks" / _file_name(context.sink_id)


def load_state(context: SinkContext) -> dict[str, Any]:
    """The sink's saved state, or ``{}`` on a first run (or an unreadable file)."""
    path = state_path(context)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(context: SinkContext, state: dict[str, Any]) -> None:
    """Write the sink's state atomically, readable by the user only (the file 0600, its folders 0700)."""
    path = state_path(context)
    ensure_private_dir(path.parent)
    # A unique temporary name: two processes saving the same sink's state never collide.
    # mkstemp creates the file 0600, and the rename keeps that mode.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
