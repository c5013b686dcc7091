"""Delivery cursors and catch-up: a bus reopened on a run directory delivers what each sink missed."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from expbus.bus import Bus, CursorStore, Event, JournalReader, JournalWriter, Metrics, SinkPolicy, read_journal
from expbus.bus._journal import count_records
from expbus.sinks.jsonl import JsonlSink
from expbus.sinks.testing import MemorySink


def metrics(i: int) -> Metrics:
    return Metrics(time=1_700_000_000.0 + i, step=i, values={"loss": float(i)})


def steps(events: Sequence[Event]) -> list[int]:
    return [e.step for e in events if isinstance(e, Metrics)]


def run_session(run_dir: Path, sinks: dict[str, object], first: int, count: int,
                policies: dict[str, SinkPolicy] | None = None) -> Bus:
    bus = Bus(run_dir)
    for sink_id, sink in sinks.items():
        bus.add_sink(sink_id, sink, (policies or {}).get(sink_id))  # type: ignore[arg-type]
    with bus:
        for i in range(first, first + count):
            bus.publish(metrics(i))
    return bus


class FailOnceSink(MemorySink):
    """Rejects (for good) the batch holding ``bad_step``; accepts everything else."""

    durable_writes = True

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step = bad_step

    def write(self, batch: Sequence[Event]) -> None:
        if self.bad_step in steps(batch):
            raise ValueError("backend rejected this batch")
        super().write(batch)


class HangingSink:
    """Never returns from write (a hung backend)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def write(self, batch: Sequence[Event]) -> None:
        self.release.wait(30)


def test_cursor_follows_every_acknowledged_batch(tmp_path: Path) -> None:
    run_session(tmp_path, {"events": JsonlSink(), "memory": MemorySink()}, 0, 100)
    store = CursorStore(tmp_path, "journal.msgpack")
    for sink_id in ("events", "memory"):
        cursor = store.load(sink_id)
        assert cursor is not None and cursor.position == 100
    saved = json.loads(store.path("events").read_text())
    assert saved["position"] == 100 and saved["journal"]
    assert store.path("events").stat().st_mode & 0o077 == 0


def test_an_up_to_date_sink_gets_no_catch_up(tmp_path: Path) -> None:
    run_session(tmp_path, {"memory": MemorySink()}, 0, 50)
    second = MemorySink()
    bus = run_session(tmp_path, {"memory": second}, 50, 50)
    assert steps(second.events) == list(range(50, 100))
    assert bus.stats()["memory"].caught_up == 0
    assert bus.catch_up_plan() == {"memory": (50, 50)}


def test_a_sink_new_to_the_run_gets_the_whole_history_first(tmp_path: Path) -> None:
    run_session(tmp_path, {"events": JsonlSink()}, 0, 40)
    late = MemorySink()
    bus = run_session(tmp_path, {"events": JsonlSink(), "late": late}, 40, 10)
    assert steps(late.events) == list(range(50))
    assert bus.stats()["late"].caught_up == 40
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 50, "the jsonl sink was current: no line twice"


def test_a_hung_sink_is_caught_up_when_the_run_resumes(tmp_path: Path) -> None:
    hung = HangingSink()
    policy = SinkPolicy(write_timeout=0.3, batch_delay=0.01)
    bus = run_session(tmp_path, {"backend": hung}, 0, 30, {"backend": policy})
    health = bus.stats()["backend"]
    assert health.state == "disabled" and health.delivered == 0
    assert health.failed + health.dropped == 30
    hung.release.set()
    # The journal holds everything the hung sink never got.
    assert steps(read_journal(tmp_path)) == list(range(30))

    healthy = MemorySink()
    bus = run_session(tmp_path, {"backend": healthy}, 30, 20)
    assert steps(healthy.events) == list(range(50)), "caught up first, in order, then new events"
    assert bus.stats()["backend"].caught_up == 30


def test_a_batch_that_failed_for_good_holds_the_cursor(tmp_path: Path) -> None:
    policy = SinkPolicy(batch_size=10, batch_delay=0.0, max_consecutive_failures=100)
    flaky = FailOnceSink(bad_step=25)
    bus = Bus(tmp_path)
    bus.add_sink("backend", flaky, policy)
    with bus:
        for i in range(60):
            bus.publish(metrics(i))
            if i % 10 == 9:
                bus.flush()  # one batch of ten at a time
    assert bus.stats()["backend"].failed == 10
    assert CursorStore(tmp_path, "journal.msgpack").load("backend").position == 20  # type: ignore[union-attr]

    again = MemorySink()
    run_session(tmp_path, {"backend": again}, 60, 0)
    # At least once: the lost batch arrives, and so does what followed it.
    assert steps(again.events) == list(range(20, 60))
    assert sorted(set(steps(flaky.events) + steps(again.events))) == list(range(60))


def test_catch_up_never_drops_even_with_a_small_queue(tmp_path: Path) -> None:
    run_session(tmp_path, {"events": JsonlSink()}, 0, 2000)
    small = MemorySink()
    policy = SinkPolicy(queue_size=16, batch_size=8, when_full="drop_newest")
    bus = run_session(tmp_path, {"small": small}, 2000, 0, {"small": policy})
    assert steps(small.events) == list(range(2000))
    assert bus.stats()["small"].dropped == 0


def test_catch_up_can_be_turned_off(tmp_path: Path) -> None:
    run_session(tmp_path, {"events": JsonlSink()}, 0, 20)
    quiet = MemorySink()
    run_session(tmp_path, {"quiet": quiet}, 20, 5, {"quiet": SinkPolicy(catch_up=False)})
    assert steps(quiet.events) == list(range(20, 25))


def test_a_cursor_of_another_journal_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_session(tmp_path, {"memory": MemorySink()}, 0, 10)
    (tmp_path / "journal.msgpack").unlink()
    run_session(tmp_path, {"events": JsonlSink()}, 0, 3)  # a new journal at the same path
    time.sleep(0.01)
    fresh = MemorySink()
    with caplog.at_level(logging.WARNING, logger="expbus.bus"):
        run_session(tmp_path, {"memory": fresh}, 3, 2)
    assert steps(fresh.events) == [3, 4]
    assert "does not match the journal" in caplog.text


def test_positions_span_segments_and_survive_a_torn_tail(tmp_path: Path) -> None:
    journal = tmp_path / "journal.msgpack"
    run_session(tmp_path, {}, 0, 10)
    with open(journal, "ab") as handle:
        handle.write(b"\xebJ\x10\x00")  # a torn frame: the next writer starts a new segment
    writer = JournalWriter(journal)
    writer.open()
    assert writer.first_position == 10
    writer.close()
    run_session(tmp_path, {}, 10, 5)
    assert count_records(tmp_path / "journal.msgpack") == 15
    reader = JournalReader(tmp_path)
    pairs = list(reader.positions(8, 12))
    assert [(p, e.step) for p, e in pairs] == [(8, 8), (9, 9), (10, 10), (11, 11)]  # type: ignore[attr-defined]
    assert reader.skipped_bytes == 4


class SlowMemorySink(MemorySink):
    """A memory sink whose every write takes a little while (a slow backend)."""

    def write(self, batch: Sequence[Event]) -> None:
        time.sleep(0.005)
        super().write(batch)


def test_a_flush_while_spilling_waits_for_the_spilled_events(tmp_path: Path) -> None:
    slow = SlowMemorySink()
    bus = Bus(tmp_path)
    bus.add_sink("slow", slow, SinkPolicy(queue_size=50, batch_size=10, batch_delay=0.0))
    with bus:
        for i in range(3000):
            bus.publish(metrics(i))
        assert bus.flush(60)
        assert steps(slow.events) == list(range(3000))
        health = bus.stats()["slow"]
        assert health.spilled > 0 and health.dropped == 0 and health.queue_depth == 0
        for i in range(3000, 3010):  # live again after the spill
            bus.publish(metrics(i))
    assert steps(slow.events) == list(range(3010))


def test_a_close_deadline_while_spilling_counts_the_rest_and_the_next_session_catches_up(tmp_path: Path) -> None:
    hung = HangingSink()
    bus = Bus(tmp_path)
    bus.add_sink("backend", hung, SinkPolicy(queue_size=100, batch_size=10, write_timeout=30))
    bus.open()
    for i in range(5000):
        bus.publish(metrics(i))
    assert bus.close(1.0) is False
    health = bus.stats()["backend"]
    assert health.delivered == 0 and health.dropped == 5000, health
    hung.release.set()

    healthy = MemorySink()
    bus = run_session(tmp_path, {"backend": healthy}, 5000, 0)
    assert steps(healthy.events) == list(range(5000))
    assert bus.stats()["backend"].caught_up == 5000
