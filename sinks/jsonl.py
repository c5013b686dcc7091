"""The ``jsonl`` sink: one JSON object per event, one line each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

from expbus.bus import Event, SinkContext, to_json

__all__ = ["JsonlSink"]


class JsonlSink:
    """Writes every event as one JSON line (``kind`` tag first), readable by ``expbus.bus.from_json``.

    Args:
        path: the file; relative paths are inside the run directory.
        append: continue an existing file (resumed runs) instead of truncating it.
    """

    def __init__(self, path: str = "events.jsonl", append: bool = True) -> None:
        self.path_option = path
        self.append = append
        self.path: Path | None = None
        self._file: IO[bytes] | None = None

    def open(self, context: SinkContext) -> None:
        """Open the file inside the run directory."""
        self.path = context.resolve(self.path_option)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab" if self.append else "wb")

    def write(self, batch: Sequence[Event]) -> None:
        """Append one line per event."""
        assert self._file is not None, "JsonlSink.write before open"
        self._file.write(b"".join(to_json(event) + b"\n" for event in batch))

    def flush(self) -> None:
        """Hand the lines to the OS."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
