"""The journal: header with schema version, exact read-back, torn tails, corruption, segments."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec

from expbus.bus import (
    JOURNAL_NAME,
    SCHEMA_VERSION,
    JournalReader,
    JournalWriter,
    Metrics,
    journal_segments,
    read_journal,
    to_msgpack,
)


def _metrics(n: int) -> list[Metrics]:
    return [Metrics(time=float(i), step=i, values={"loss": i / 10}) for i in range(n)]


def _write(path: Path, events: list[Metrics]) -> None:
    writer = JournalWriter(path, fsync_interval=0)
    writer.open()
    writer.append(to_msgpack(e) for e in events)
    writer.commit()
    writer.close()


def test_round_trip_with_header(run_dir: Path) -> None:
    events = _metrics(100)
    _write(run_dir / JOURNAL_NAME, events)
    reader = JournalReader(run_dir)
    assert list(reader) == events
    assert reader.records == 100
    assert reader.skipped_bytes == 0
    assert reader.headers[0]["format"] == "expbus-journal"
    assert reader.headers[0]["schema_version"] == SCHEMA_VERSION


def test_file_is_private_to_the_user(run_dir: Path) -> None:
    _write(run_dir / JOURNAL_NAME, _metrics(1))
    mode = stat.S_IMODE(os.stat(run_dir / JOURNAL_NAME).st_mode)
    assert mode & 0o077 == 0


def test_torn_tail_keeps_every_complete_record(run_dir: Path) -> None:
    path = run_dir / JOURNAL_NAME
    events = _metrics(50)
    _write(path, events)
    data = path.read_bytes()
    for cut in (1, 3, 7, 12):  # inside the last record's header or payload
        path.write_bytes(data[:-cut])
        reader = JournalReader(path)
        assert list(reader) == events[:-1]
        assert reader.skipped_bytes > 0


def test_bit_flip_loses_only_the_damaged_record(run_dir: Path) -> None:
    path = run_dir / JOURNAL_NAME
    events = _metrics(50)
    _write(path, events)
    data = bytearray(path.read_bytes())
    # Flip a bit in the middle of the file: one record fails its CRC, the reader resyncs.
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    reader = JournalReader(path)
    recovered = list(reader)
    assert len(recovered) == 49
    assert all(e in events for e in recovered)
    assert reader.skipped_bytes > 0


def test_unknown_kinds_are_counted_not_fatal(run_dir: Path) -> None:
    path = run_dir / JOURNAL_NAME
    writer = JournalWriter(path)
    writer.open()
    writer.append([to_msgpack(_metrics(1)[0]), msgspec.msgpack.encode({"kind": "future", "time": 1.0})])
    writer.close()
    reader = JournalReader(path)
    assert len(list(reader)) == 1
    assert reader.unknown == 1


def test_reopen_appends_to_a_clean_journal(run_dir: Path) -> None:
    path = run_dir / JOURNAL_NAME
    events = _metrics(20)
    _write(path, events[:10])
    _write(path, events[10:])
    assert journal_segments(run_dir) == [path]
    assert read_journal(run_dir) == events


def test_reopen_after_torn_tail_starts_a_new_segment(run_dir: Path) -> None:
    path = run_dir / JOURNAL_NAME
    events = _metrics(20)
    _write(path, events[:10])
    path.write_bytes(path.read_bytes()[:-5])  # crash mid-record
    _write(path, events[10:])
    segments = journal_segments(run_dir)
    assert [s.name for s in segments] == ["journal.msgpack", "journal-1.msgpack"]
    reader = JournalReader(run_dir)
    assert list(reader) == events[:9] + events[10:]
    assert len(reader.headers) == 2


def test_empty_and_garbage_files(run_dir: Path) -> None:
    path = run_dir / JOURNAL_NAME
    path.write_bytes(b"")
    assert read_journal(path) == []
    path.write_bytes(os.urandom(4096))
    reader = JournalReader(path)
    assert list(reader) == []
    assert reader.skipped_bytes == 4096


def test_a_header_after_leading_garbage_is_still_the_header(tmp_path: Path) -> None:
    from expbus.bus import count_records, journal_identity

    path = tmp_path / JOURNAL_NAME
    _write(path, _metrics(3))
    identity = journal_identity(path)
    path.write_bytes(b"x" + path.read_bytes())
    reader = JournalReader(path)
    assert [e.step for e in reader] == [0, 1, 2]  # type: ignore[attr-defined]
    assert reader.unknown == 0 and reader.skipped_bytes == 1 and len(reader.headers) == 1
    assert count_records(path) == 3
    assert journal_identity(path) == identity  # cursors still match: catch-up is not skipped
