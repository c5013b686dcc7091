"""The journal: an append-only msgpack record of every event published on a bus.

File layout (one *segment*)::

    frame  := MAGIC (2 bytes) | length (u32 LE) | crc32 of payload (u32 LE) | payload
    file   := header frame | event frame*

The header payload is a msgpack map ``{"format": "expbus-journal", "schema_version": N,
"created": unix_seconds, "segment": k}``; each event payload is one msgpack-encoded event.

Durability window: the bus hands every drained batch to the OS at once (a ``SIGKILL`` of
the training process loses nothing the bus thread had drained, i.e. all but the last
``poll_interval``, 1 s by default), and ``fsync`` runs at most every ``fsync_interval`` seconds (default 1 s),
so a machine crash or power loss loses at most that window.

The reader checks every frame's length and CRC. A torn tail (a crash mid-write) or a
corrupted region is skipped by scanning for the next valid frame; the number of bytes
skipped is reported. A writer reopening a journal whose tail is not clean starts a new
segment (``journal-1.msgpack``, ...) rather than appending after garbage.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from ._codec import from_msgpack
from ._events import SCHEMA_VERSION, Event

__all__ = [
    "JournalWriter",
    "JournalReader",
    "read_journal",
    "journal_segments",
    "journal_identity",
    "count_records",
    "JournalTail",
    "JOURNAL_NAME",
]

JOURNAL_NAME = "journal.msgpack"
FORMAT_NAME = "expbus-journal"
MAGIC = b"\xebJ"
_HEAD = struct.Struct("<2sII")
_HEAD_SIZE = _HEAD.size
# A record larger than this is treated as corruption, not allocated.
_MAX_RECORD = 256 * 1024 * 1024


def _frame(payload: bytes) -> bytes:
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _segment_path(base: Path, index: int) -> Path:
    if index == 0:
        return base
    return base.with_name(f"{base.stem}-{index}{base.suffix}")


def journal_segments(path: str | os.PathLike[str]) -> list[Path]:
    """The segment files of a journal, in order. ``path`` is the journal file or its run dir."""
    base = Path(path)
    if base.is_dir():
        base = base / JOURNAL_NAME
    segments = []
    index = 0
    # Segments are numbered densely; a gap ends the list.
    while True:
        candidate = _segment_path(base, index)
        if not candidate.exists():
            if index == 0:
                index += 1
                continue
            break
        segments.append(candidate)
        index += 1
    return segments


class _Scan(msgspec.Struct):
    """What a scan of one segment found."""

    payloads: list[bytes]
    skipped_bytes: int
    clean_end: bool
    header: dict[str, Any] | None


def _scan(data: bytes) -> _Scan:
    payloads: list[bytes] = []
    skipped = 0
    pos = 0
    end = len(data)
    header: dict[str, Any] | None = None
    clean = True
    while pos < end:
        ok = False
        if end - pos >= _HEAD_SIZE:
            magic, length, crc = _HEAD.unpack_from(data, pos)
            if magic == MAGIC and length <= _MAX_RECORD and pos + _HEAD_SIZE + length <= end:
                payload = data[pos + _HEAD_SIZE : pos + _HEAD_SIZE + length]
                if zlib.crc32(payload) == crc:
                    ok = True
                    # The first intact frame may be the header even after leading garbage.
                    if header is None and not payloads:
                        try:
                            decoded = msgspec.msgpack.decode(payload)
                        except msgspec.DecodeError:
                            decoded = None
                        if isinstance(decoded, dict) and decoded.get("format") == FORMAT_NAME:
                            header = decoded
                        else:
                            payloads.append(payload)
                    else:
                        payloads.append(payload)
                    pos += _HEAD_SIZE + length
        if not ok:
            # Resynchronise on the next MAGIC that starts a valid frame.
            clean = False
            nxt = data.find(MAGIC, pos + 1)
            if nxt < 0:
                skipped += end - pos
                break
            skipped += nxt - pos
            pos = nxt
    return _Scan(payloads=payloads, skipped_bytes=skipped, clean_end=clean, header=header)


class JournalReader:
    """Iterates the events of a journal back, recovering from torn or corrupted regions.

    After iteration, ``records`` counts the events read, ``skipped_bytes`` the bytes that
    could not be read as frames, ``unknown`` the records of a kind this version does not
    know (written by a newer expbus), and ``headers`` the segment headers.

    Example:
        >>> reader = JournalReader("nemo_experiments/default/version_0")
        >>> for event in reader: ...
        >>> reader.skipped_bytes
        0
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.records = 0
        self.skipped_bytes = 0
        self.unknown = 0
        self.headers: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Event]:
        for _, event in self.positions():
            yield event

    def positions(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Event]]:
        """``(position, event)`` pairs, from position ``start`` up to (not including) ``stop``.

        A record's *position* is its index among every intact record of the journal, over
        all segments (records of an unknown kind count too). It is what a sink's delivery
        cursor refers to (see :class:`~expbus.bus.CursorStore`).
        """
        position = 0
        for segment in journal_segments(self.path):
            if stop is not None and position >= stop:
                return
            scan = _scan(segment.read_bytes())
            self.skipped_bytes += scan.skipped_bytes
            if scan.header is not None:
                self.headers.append(scan.header)
            payloads = scan.payloads
            if position + len(payloads) <= start:
                # The whole segment lies before ``start``: nothing to decode.
                position += len(payloads)
                continue
            for payload in payloads:
                if stop is not None and position >= stop:
                    return
                here = position
                position += 1
                if here < start:
                    continue
                try:
                    event = from_msgpack(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.unknown += 1
                    continue
                self.records += 1
                yield here, event


def read_journal(path: str | os.PathLike[str]) -> list[Event]:
    """Every event of a journal (a file or a run directory), in publication order."""
    return list(JournalReader(path))


def count_records(path: str | os.PathLike[str]) -> int:
    """How many intact records (positions) a journal holds, over all its segments."""
    return sum(len(_scan(segment.read_bytes()).payloads) for segment in journal_segments(path))


def journal_identity(path: str | os.PathLike[str]) -> str | None:
    """An id of a journal that survives appends and new segments: its first header's creation time.

    A delivery cursor remembers it, so a cursor never applies to a different journal that
    happens to live at the same path (a deleted and recreated run directory).
    """
    segments = journal_segments(path)
    if not segments:
        return None
    header = _scan(segments[0].read_bytes()[: 64 * 1024]).header
    if header is None:
        return None
    return repr(header.get("created"))


class JournalWriter:
    """Appends encoded events to a journal file; used by the bus thread only.

    Args:
        path: the journal file (its directory is created).
        fsync_interval: at most this many seconds between ``fsync`` calls; 0 fsyncs on
            every commit.
        file_mode: permission bits for a new file (owner read/write by default).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync_interval: float = 1.0,
        file_mode: int = 0o600,
    ) -> None:
        self.base = Path(path)
        self.fsync_interval = fsync_interval
        self.file_mode = file_mode
        self.path = self.base
        self.records = 0
        # Records the journal held before this writer opened it: the position of the first
        # record this writer appends (positions count records over all segments).
        self.first_position = 0
        # Position of the first record of the segment being appended to (``self.path``).
        self.segment_first_position = 0
        self.identity: str | None = None
        self.bytes_written = 0
        self._file: Any = None
        self._last_sync = 0.0
        self._dirty = False

    def open(self) -> None:
        """Open the journal for appending; start a new segment after an unclean tail."""
        self.base.parent.mkdir(parents=True, exist_ok=True)
        segments = journal_segments(self.base)
        index = 0
        append = False
        if segments:
            scans = [_scan(segment.read_bytes()) for segment in segments]
            self.first_position = sum(len(scan.payloads) for scan in scans)
            last = segments[-1]
            index = _segment_index(self.base, last)
            if scans[-1].clean_end and scans[-1].header is not None:
                append = True
                self.segment_first_position = self.first_position - len(scans[-1].payloads)
            else:
                index += 1
                self.segment_first_position = self.first_position
        self.path = _segment_path(self.base, index)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.file_mode)
        self._file = os.fdopen(fd, "ab", buffering=1 << 16)
        if not append:
            header = {
                "format": FORMAT_NAME,
                "schema_version": SCHEMA_VERSION,
                "created": time.time(),
                "segment": index,
            }
            self._file.write(_frame(msgspec.msgpack.encode(header)))
        self.sync()
        self.identity = journal_identity(self.base)

    @property
    def end_position(self) -> int:
        """The position the next appended record will have (records over all segments)."""
        return self.first_position + self.records

    def tail(self, start: int) -> JournalTail:
        """A reader of this writer's segment from position ``start`` on (see :class:`JournalTail`)."""
        return JournalTail(self.path, self.segment_first_position, start)

    def append(self, payloads: Iterable[bytes]) -> None:
        """Write encoded events (buffered; call :meth:`commit` to hand them to the OS)."""
        write = self._file.write
        for payload in payloads:
            frame = _frame(payload)
            write(frame)
            self.records += 1
            self.bytes_written += len(frame)
        self._dirty = True

    def commit(self) -> None:
        """Hand buffered records to the OS; fsync when the interval has passed."""
        if self._file is None:
            return
        self._file.flush()
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        """Flush and fsync now."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        """Sync and close; idempotent."""
        if self._file is None:
            return
        try:
            self.sync()
        finally:
            self._file.close()
            self._file = None


def _segment_index(base: Path, segment: Path) -> int:
    if segment == base:
        return 0
    suffix = segment.stem[len(base.stem) + 1 :]
    return int(suffix)


class JournalTail:
    """Reads the records of one segment from a position on, incrementally, as it grows.

    The bus uses it to feed a sink whose queue overflowed from the journal instead of
    keeping (or dropping) events in memory. Each :meth:`read` continues where the last one
    stopped, so the segment is scanned once however often it is called.

    Args:
        segment: the segment file (the one a writer appends to).
        segment_first_position: the position of the segment's first record.
        start: the first position to return; earlier records are skipped undecoded.
    """

    _CHUNK = 1 << 20

    def __init__(self, segment: Path, segment_first_position: int, start: int) -> None:
        self.segment = segment
        self.position = segment_first_position
        self.start = start
        self.damaged = False
        self._at_file_start = True
        self._file: Any = None
        self._buffer = b""
        self._cursor = 0  # read position inside _buffer

    def read(self, stop: int, limit: int) -> list[tuple[int, Event]]:
        """Up to ``limit`` ``(position, event)`` pairs with ``start <= position < stop``."""
        out: list[tuple[int, Event]] = []
        if self._file is None:
            self._file = open(self.segment, "rb")
        while len(out) < limit and self.position < stop and not self.damaged:
            buffer, at = self._buffer, self._cursor
            if len(buffer) - at < _HEAD_SIZE:
                if not self._fill():
                    break
                continue
            magic, length, crc = _HEAD.unpack_from(buffer, at)
            if magic != MAGIC or length > _MAX_RECORD:
                self.damaged = True
                break
            if len(buffer) - at < _HEAD_SIZE + length:
                if not self._fill():
                    break
                continue
            payload = buffer[at + _HEAD_SIZE : at + _HEAD_SIZE + length]
            self._cursor = at + _HEAD_SIZE + length
            first = self._at_file_start
            self._at_file_start = False
            if zlib.crc32(payload) != crc:
                self.damaged = True
                break
            if first and _is_header(payload):
                continue
            here = self.position
            self.position += 1
            if here < self.start:
                continue
            try:
                out.append((here, from_msgpack(payload)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a kind this version does not know: its position is still used
        return out

    def _fill(self) -> bool:
        chunk = self._file.read(self._CHUNK)
        if not chunk:
            return False
        self._buffer = self._buffer[self._cursor :] + chunk
        self._cursor = 0
        return True

    def close(self) -> None:
        """Release the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_header(payload: bytes) -> bool:
    try:
        decoded = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return False
    return isinstance(decoded, dict) and decoded.get("format") == FORMAT_NAME
