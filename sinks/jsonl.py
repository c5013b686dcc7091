"""The ``jsonl`` sink: one JSON object per event, one line each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from expbus.bus import Event, SinkContext, to_json

from ._files import naming_path

__all__ = ["JsonlSink"]


class JsonlSink:
    """Writes every event as one JSON line (``kind`` tag first), readable by ``expbus.bus.from_json``.

    Each batch reaches the OS in one unbuffered write before ``write`` returns, so the bus
    counts as delivered only lines the OS took. A write that fails (disk full, I/O error)
    raises an ``OSError`` naming the file, and the file is cut back to where the batch
    started (no torn line is left for a later batch to follow).

    Args:
        path: the file; relative paths are inside the run directory.
        append: continue an existing file (resumed runs) instead of truncating it.
    """

    #: ``write`` hands everything to the OS before it returns, so the bus may advance this
    #: sink's delivery cursor as soon as a batch is acknowledged (see ``expbus.bus.Bus``).
    durable_writes = True

    def __init__(self, path: str = "events.jsonl", append: bool = True) -> None:
        self.path_option = path
        self.append = append
        self.path: Path | None = None
        self._fd: int | None = None

    def open(self, context: SinkContext) -> None:
        """Open the file inside the run directory."""
        self.path = context.resolve(self.path_option)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if self.append else os.O_TRUNC)
        # 0600: the events hold the run's configuration and hyperparameters (readable by the user only).
        self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)

    def write(self, batch: Sequence[Event]) -> None:
        """Append one line per event, handed to the OS (one unbuffered write) before returning.

        Raises:
            OSError: the write failed (the error names the file); nothing of the batch stays in it.
        """
        fd = self._fd
        assert fd is not None, "JsonlSink.write before open"
        data = memoryview(b"".join(to_json(event) + b"\n" for event in batch))
        with naming_path(self.path):
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # not a regular file (a pipe, /dev/full): nothing to cut back
                raise

    def flush(self) -> None:
        """Nothing to do: every ``write`` has handed its lines to the OS."""

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
