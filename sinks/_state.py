"""Small per-sink state kept in the run directory (backend run ids), so a resumed run continues."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from expbus.bus import SinkContext

__all__ = ["state_path", "load_state", "save_state"]


def state_path(context: SinkContext) -> Path:
    """``run_dir/.expbus/sinks/<sink_id>.json``."""
    return context.run_dir / ".expbus" / "sinks" / f"{context.sink_id}.json"


def load_state(context: SinkContext) -> dict[str, Any]:
    """The sink's saved state, or ``{}`` on a first run (or an unreadable file)."""
    path = state_path(context)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(context: SinkContext, state: dict[str, Any]) -> None:
    """Write the sink's state atomically (readable by the user only)."""
    path = state_path(context)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: two processes saving the same sink's state never collide.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
