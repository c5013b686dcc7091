"""Delivery cursors: how far into the journal each sink has delivered, kept in the run directory.

A cursor is the journal *position* (index of a record over all segments) of the first
record a sink has not yet acknowledged. The sink's worker saves it after every batch the
sink accepted, so after a crash, a ``SIGKILL`` or a preemption, the next bus opened on
the same run directory knows what each sink is missing and catches it up from the journal
before new events (see :class:`~expbus.bus.Bus`); ``expbus replay`` uses the same cursors,
which is what makes a second replay add nothing.

File: ``run_dir/.expbus/cursors/<journal file stem>/<sink id>.json``::

    {"journal": "<journal identity>", "position": 1234, "updated": 1764340000.0}

The window: a sink that accepted a batch and is killed before the cursor file is replaced
(microseconds later) gets that one batch again on catch-up. MLflow's SQL stores ignore
an identical point; other backends would show it twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["CursorStore", "Cursor"]


class Cursor:
    """A sink's saved cursor: the journal it refers to and the next position to deliver."""

    __slots__ = ("journal", "position")

    def __init__(self, journal: str | None, position: int) -> None:
        self.journal = journal
        self.position = position

    def __repr__(self) -> str:
        return f"Cursor(journal={self.journal!r}, position={self.position})"


class CursorStore:
    """Reads and writes the cursors of one journal's sinks.

    Args:
        run_dir: the run directory.
        journal_name: the journal's file name (one journal per rank: one set of cursors each).
    """

    def __init__(self, run_dir: str | os.PathLike[str], journal_name: str) -> None:
        self.directory = Path(run_dir) / ".expbus" / "cursors" / Path(journal_name).stem

    def path(self, sink_id: str) -> Path:
        """The cursor file of ``sink_id``."""
        # Sink ids come from YAML keys; keep the file name inside the directory.
        safe = sink_id.replace(os.sep, "_").replace("/", "_")
        if safe in ("", ".", ".."):
            safe = f"_{safe}_"
        return self.directory / f"{safe}.json"

    def load(self, sink_id: str) -> Cursor | None:
        """The saved cursor, or ``None`` when the sink never delivered here (or the file is unreadable)."""
        try:
            data = json.loads(self.path(sink_id).read_text())
            position = int(data["position"])
            journal = data.get("journal")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if position < 0:
            return None
        return Cursor(journal if isinstance(journal, str) else None, position)

    def save(self, sink_id: str, journal: str | None, position: int) -> None:
        """Replace the cursor file atomically (readable by the user only)."""
        path = self.path(sink_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        payload = json.dumps({"journal": journal, "position": position, "updated": time.time()})
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:
            # .expbus/ and everything below it readable by the user only.
            expbus_dir = self.directory.parent.parent
            for directory in (expbus_dir, expbus_dir / "cursors", self.directory):
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, payload.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
