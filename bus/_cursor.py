"""Delivery cursors: how far into the journal each sink has delivered, kept in the run directory.

A cursor is the journal *position* (index of a record over all segments) of the first
record a sink has not yet acknowledged. The sink's worker saves it after every batch the
sink accepted, so after a crash, a ``SIGKILL`` or a preemption, the next bus opened on
the same run directory knows what each sink is missing and catches it up from the journal
before new events (see :class:`~expbus.bus.Bus`); ``expbus replay`` uses the same cursors,
which is what makes a second replay add nothing.

File: ``run_dir/.expbus/cursors/<journal file stem>/<sink id>.json``::

    {"journal": "<journal identity>", "position": 1234, "updated": 1764340000.0, "check": 2882120541}

Saving is one ``pwrite`` over the start of a file kept open, padded with spaces to the
longest record it held (still JSON), not a temporary file renamed over it: every system
call a background thread makes lets the GIL go and must win it back from the training
thread, and a save per sink batch was four of them. A write that has returned is whole
whatever happens to the process afterwards (``SIGKILL``, the OOM killer); ``check`` (a
CRC-32 of the journal identity and the position) lets a reader reject a record it read
while another process was writing it, or one cut by a power loss, and read it again.

The window: a sink that accepted a batch and is killed before its cursor is saved
(microseconds later) gets that one batch again on catch-up. MLflow's SQL stores ignore
an identical point; other backends would show it twice.
"""

from __future__ import annotations

import json
import os
import time
import zlib
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
        # Open cursor files (sink id -> descriptor, and the size of the longest record written).
        self._files: dict[str, tuple[int, int]] = {}

    def path(self, sink_id: str) -> Path:
        """The cursor file of ``sink_id``."""
        # Sink ids come from YAML keys; keep the file name inside the directory.
        safe = sink_id.replace(os.sep, "_").replace("/", "_")
        if safe in ("", ".", ".."):
            safe = f"_{safe}_"
        return self.directory / f"{safe}.json"

    def load(self, sink_id: str) -> Cursor | None:
        """The saved cursor, or ``None`` when the sink never delivered here (or the file is unreadable)."""
        for _attempt in range(3):  # a record read while another process wrote it fails its check
            try:
                data = json.loads(self.path(sink_id).read_text())
                position = int(data["position"])
                journal = data.get("journal")
                check = data.get("check")
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if check is not None and check != _check(journal, position):
                continue
            if position < 0:
                return None
            return Cursor(journal if isinstance(journal, str) else None, position)
        return None

    def save(self, sink_id: str, journal: str | None, position: int) -> None:
        """Write the cursor over the file's start in one system call (readable by the user only)."""
        record = json.dumps({"journal": journal, "position": position, "updated": time.time(),
                             "check": _check(journal, position)}).encode()
        fd, width = self._files.get(sink_id) or self._open(sink_id)
        if len(record) > width:
            width = len(record)
        self._files[sink_id] = (fd, width)
        # Padded to the longest record written, so no tail of an older one is left behind.
        os.pwrite(fd, record.ljust(width), 0)

    def close(self) -> None:
        """Close the open cursor files (saving again reopens them)."""
        files, self._files = self._files, {}
        for fd, _width in files.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _open(self, sink_id: str) -> tuple[int, int]:
        path = self.path(sink_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        except FileNotFoundError:
            # .expbus/ and everything below it readable by the user only.
            expbus_dir = self.directory.parent.parent
            for directory in (expbus_dir, expbus_dir / "cursors", self.directory):
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        # A file from an earlier session (possibly longer) is overwritten, never truncated:
        # a crash between a truncate and the write would lose the cursor.
        return fd, os.fstat(fd).st_size


def _check(journal: str | None, position: int) -> int:
    return zlib.crc32(f"{journal}|{position}".encode())
