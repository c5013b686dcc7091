"""Tests of the delivery-cursor files: one in-place write per save, read back whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from expbus.bus import CursorStore


def test_a_save_reads_back_and_a_shorter_one_leaves_no_tail(tmp_path: Path) -> None:
    store = CursorStore(tmp_path, "journal.msgpack")
    store.save("tb", "1764340000.123456", 1_000_000)
    store.save("tb", "1", 7)  # a shorter record over a longer one
    store.close()
    text = store.path("tb").read_text()
    assert json.loads(text)["position"] == 7  # still JSON: the rest is spaces
    cursor = CursorStore(tmp_path, "journal.msgpack").load("tb")
    assert cursor is not None and (cursor.journal, cursor.position) == ("1", 7)
    assert store.path("tb").stat().st_mode & 0o077 == 0


def test_a_longer_file_of_an_earlier_session_is_overwritten_whole(tmp_path: Path) -> None:
    store = CursorStore(tmp_path, "journal.msgpack")
    path = store.path("tb")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"journal": "x" * 500, "position": 123456789}))  # the rename-era format
    assert store.load("tb").position == 123456789  # type: ignore[union-attr]  # no check: still read
    store.save("tb", "j", 5)
    store.close()
    assert json.loads(path.read_text())["position"] == 5
    assert CursorStore(tmp_path, "journal.msgpack").load("tb").position == 5  # type: ignore[union-attr]


def test_a_record_failing_its_check_is_not_trusted(tmp_path: Path) -> None:
    store = CursorStore(tmp_path, "journal.msgpack")
    store.save("tb", "j", 40)
    store.close()
    path = store.path("tb")
    record = json.loads(path.read_text())
    record["position"] = 90  # digits of another write mixed in: the check no longer matches
    path.write_text(json.dumps(record))
    assert store.load("tb") is None
    path.write_text('{"journal": "j", "posi')  # cut short
    assert store.load("tb") is None
    assert store.load("never-saved") is None


def test_saving_after_close_reopens_the_file(tmp_path: Path) -> None:
    store = CursorStore(tmp_path, "journal.msgpack")
    store.save("a/b", "j", 1)
    store.close()
    store.close()  # idempotent
    store.save("a/b", "j", 2)
    store.close()
    assert store.path("a/b").parent == store.directory
    assert store.load("a/b").position == 2  # type: ignore[union-attr]
