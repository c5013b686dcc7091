"""The bus: non-blocking publish, ordered fan-out, batching, drops, retries, bounded flush and close."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from expbus.bus import (
    Bus,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    SinkContext,
    SinkOpenError,
    SinkPolicy,
    TransientSinkError,
    read_journal,
)
from expbus.sinks.testing import MemorySink


def metrics(i: int) -> Metrics:
    return Metrics(time=time.time(), step=i, values={"loss": float(i)})


class SlowSink:
    """Sleeps on every write (a slow backend)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.count = 0

    def write(self, batch: Sequence[Event]) -> None:
        time.sleep(self.seconds)
        self.count += len(batch)


class RaisingSink:
    """Raises on every write."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error or ValueError("backend rejected the batch")
        self.calls = 0

    def write(self, batch: Sequence[Event]) -> None:
        self.calls += 1
        raise self.error


class BlockedSink:
    """Blocks every write until released (a stalled backend)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.count = 0

    def write(self, batch: Sequence[Event]) -> None:
        self.release.wait()
        self.count += len(batch)


def test_events_reach_every_sink_in_order_and_the_journal(run_dir: Path) -> None:
    a, b = MemorySink(), MemorySink()
    with Bus(run_dir, sinks={"a": a, "b": b}) as bus:
        for i in range(1000):
            bus.publish(metrics(i))
        assert bus.flush(10)
    expected = list(range(1000))
    assert [e.step for e in a.events] == expected  # type: ignore[attr-defined]
    assert [e.step for e in b.events] == expected  # type: ignore[attr-defined]
    assert [e.step for e in read_journal(run_dir)] == expected  # type: ignore[attr-defined]
    assert a.closed and b.closed
    assert a.context == SinkContext(sink_id="a", run_dir=run_dir, run_id=bus.run_id)


def test_publish_is_a_no_op_before_open_and_after_close(run_dir: Path) -> None:
    sink = MemorySink()
    bus = Bus(run_dir, sinks={"m": sink})
    bus.publish(metrics(0))  # before open: dropped silently
    bus.open()
    bus.publish(metrics(1))
    assert bus.close(5)
    bus.publish(metrics(2))  # after close
    assert [e.step for e in sink.events] == [1]  # type: ignore[attr-defined]
    assert bus.close(5)  # idempotent
    assert bus.flush(1) is False


def test_batches_respect_batch_size(run_dir: Path) -> None:
    sink = MemorySink()
    bus = Bus(run_dir)
    bus.add_sink("m", sink, SinkPolicy(batch_size=7, batch_delay=0.01))
    with bus:
        for i in range(100):
            bus.publish(metrics(i))
    assert max(sink.batches) <= 7
    assert sum(sink.batches) == 100


def test_batch_delay_delivers_a_lone_event(run_dir: Path) -> None:
    sink = MemorySink()
    bus = Bus(run_dir)
    bus.add_sink("m", sink, SinkPolicy(batch_size=1000, batch_delay=0.05))
    with bus:
        bus.publish(metrics(0))
        deadline = time.monotonic() + 5
        while not sink.events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sink.events) == 1  # delivered without a flush, after batch_delay


def test_slow_and_failing_sinks_do_not_hold_back_publish_or_others(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fast, slow, bad = MemorySink(), SlowSink(1.0), RaisingSink()
    bus = Bus(run_dir)
    bus.add_sink("fast", fast)
    bus.add_sink("slow", slow, SinkPolicy(batch_size=10))
    bus.add_sink("bad", bad)
    bus.open()
    start = time.perf_counter()
    for i in range(5000):
        bus.publish(metrics(i))
    publish_time = time.perf_counter() - start
    # fast sink gets everything while slow is still sleeping
    deadline = time.monotonic() + 10
    while len(fast.events) < 5000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fast.events) == 5000
    assert slow.count < 5000
    with caplog.at_level(logging.ERROR, logger="expbus.bus"):
        start = time.monotonic()
        closed = bus.close(timeout=2.0)
        took = time.monotonic() - start
    assert closed is False  # the slow sink could not finish in time
    assert took < 4.0  # bounded by the deadline (plus the thread join grace)
    stats = bus.stats()
    assert stats["fast"].delivered == 5000 and stats["fast"].dropped == 0
    assert stats["bad"].errors >= 1 and stats["bad"].delivered == 0
    assert stats["bad"].failed + stats["bad"].dropped == 5000
    assert stats["slow"].delivered + stats["slow"].dropped == 5000
    # the failing sink's traceback is reported once, not once per batch
    tracebacks = [r for r in caplog.records if "failed" in r.getMessage() and "'bad'" in r.getMessage()]
    assert len(tracebacks) == 1
    assert "ValueError: backend rejected the batch" in tracebacks[0].getMessage()
    assert publish_time < 5.0  # sanity only; speed is measured in benchmarks/


def test_transient_errors_are_retried_with_backoff(run_dir: Path) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.attempts = 0
            self.events: list[Event] = []
            self.times: list[float] = []

        def write(self, batch: Sequence[Event]) -> None:
            self.attempts += 1
            self.times.append(time.monotonic())
            if self.attempts <= 2:
                raise TransientSinkError("server unavailable")
            self.events.extend(batch)

    sink = Flaky()
    bus = Bus(run_dir)
    bus.add_sink("flaky", sink, SinkPolicy(retry_backoff=0.05, batch_delay=0.01))
    with bus:
        for i in range(10):
            bus.publish(metrics(i))
        assert bus.flush(10)
        stats = bus.stats()["flaky"]
    assert [e.step for e in sink.events] == list(range(10))  # type: ignore[attr-defined]
    assert stats.retries == 2 and stats.errors == 2 and stats.failed == 0
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05  # exponential backoff (with jitter in [0.5, 1])


def test_custom_is_transient(run_dir: Path) -> None:
    class Custom(RaisingSink):
        def is_transient(self, exc: BaseException) -> bool:
            return isinstance(exc, KeyError)

    sink = Custom(KeyError("x"))
    bus = Bus(run_dir)
    bus.add_sink("c", sink, SinkPolicy(max_retries=3, retry_backoff=0.001, batch_delay=0.01))
    with bus:
        bus.publish(metrics(0))
        bus.flush(5)
        assert bus.stats()["c"].retries == 3
    assert sink.calls == 4


def test_sink_disabled_after_consecutive_failures(run_dir: Path) -> None:
    bus = Bus(run_dir)
    bus.add_sink("bad", RaisingSink(), SinkPolicy(batch_size=1, batch_delay=0, max_consecutive_failures=3))
    with bus:
        for i in range(10):
            bus.publish(metrics(i))
        bus.flush(5)
        health = bus.stats()["bad"]
    assert health.state == "disabled"
    assert health.errors == 3
    assert health.failed + health.dropped == 10


def test_hung_sink_close_returns_at_its_deadline(run_dir: Path) -> None:
    hung = BlockedSink()
    good = MemorySink()
    bus = Bus(run_dir)
    bus.add_sink("hung", hung)
    bus.add_sink("good", good)
    bus.open()
    for i in range(100):
        bus.publish(metrics(i))
    assert bus.flush(0.5) is False  # the hung sink cannot acknowledge
    start = time.monotonic()
    assert bus.close(timeout=1.0) is False
    assert time.monotonic() - start < 3.0
    assert len(good.events) == 100
    stats = bus.stats()
    assert stats["hung"].dropped == 100  # nothing delivered, all counted
    assert len(read_journal(run_dir)) == 100  # the journal holds everything
    hung.release.set()


def test_write_timeout_disables_a_hung_sink(run_dir: Path) -> None:
    hung = BlockedSink()
    bus = Bus(run_dir)
    bus.add_sink("hung", hung, SinkPolicy(write_timeout=0.2, batch_delay=0.01))
    with bus:
        for i in range(10):
            bus.publish(metrics(i))
        time.sleep(0.5)
        assert bus.stats()["hung"].state == "disabled"
    hung.release.set()


class RecordingBlockedSink(BlockedSink):
    """A stalled backend that keeps what it finally gets."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def write(self, batch: Sequence[Event]) -> None:
        super().write(batch)
        self.events.extend(batch)


def _flood_past_a_blocked_sink(run_dir: Path | None) -> tuple[Bus, RecordingBlockedSink, MemorySink]:
    blocked, good = RecordingBlockedSink(), MemorySink()
    bus = Bus(run_dir)
    bus.add_sink("blocked", blocked, SinkPolicy(queue_size=1000, batch_size=100))
    bus.add_sink("good", good, SinkPolicy(queue_size=200_000))
    bus.open()
    worst = 0.0

    def producer() -> None:
        nonlocal worst
        for i in range(100_000):
            t0 = time.perf_counter()
            bus.publish(metrics(i))
            worst = max(worst, time.perf_counter() - t0)
            if i == 50_000:
                # a lifecycle event is never dropped, even with the queue full
                bus.publish(CheckpointSaved(time=time.time(), path="x.ckpt", step=i))

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert bus.flush(0.5) is False  # blocked sink holds its flush marker
    depth = bus.stats()["blocked"].queue_depth
    assert depth <= 1000 + 1  # bounded: queue_size (+ the never-dropped checkpoint event)
    blocked.release.set()
    assert bus.close(30)
    assert worst < 1.0  # publish never waited on the sink (sanity bound, not a benchmark)
    stats = bus.stats()
    assert stats["good"].delivered == 100_001 and stats["good"].dropped == 0
    assert [type(e).__name__ for e in good.events].count("CheckpointSaved") == 1
    return bus, blocked, good


def test_a_full_queue_spills_to_the_journal_and_loses_nothing(run_dir: Path) -> None:
    bus, blocked, good = _flood_past_a_blocked_sink(run_dir)
    health = bus.stats()["blocked"]
    # The queue stayed bounded, yet nothing was dropped: the overflow was read back from the journal.
    assert health.dropped == 0 and health.delivered == 100_001
    assert health.spilled > 90_000
    journal = read_journal(run_dir)
    assert len(journal) == 100_001
    assert blocked.events == journal == good.events  # in order, once each


def test_without_a_journal_a_full_queue_drops_newest(run_dir: Path) -> None:
    bus, blocked, _ = _flood_past_a_blocked_sink(None)
    stats = bus.stats()["blocked"]
    # every event is accounted for: delivered or counted as dropped
    assert stats.delivered + stats.dropped == 100_001
    assert stats.dropped > 90_000 and stats.spilled == 0
    assert [type(e).__name__ for e in blocked.events].count("CheckpointSaved") == 1


def test_block_policy_waits_instead_of_dropping(run_dir: Path) -> None:
    blocked = BlockedSink()
    bus = Bus(run_dir)
    bus.add_sink("blocked", blocked, SinkPolicy(queue_size=100, batch_size=50, when_full="block"))
    bus.open()
    for i in range(5000):
        bus.publish(metrics(i))
    time.sleep(0.2)
    # the journal is never held back by a blocking sink
    assert bus.flush(0.2) is False
    assert len(read_journal(run_dir)) == 5000
    blocked.release.set()
    assert bus.close(20)
    stats = bus.stats()["blocked"]
    assert stats.delivered == 5000 and stats.dropped == 0


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_non_droppable_events_survive_a_full_queue(run_dir: Path, journal: bool) -> None:
    blocked = BlockedSink()
    sink_events: list[Event] = []

    class Recorder(BlockedSink):
        def write(self, batch: Sequence[Event]) -> None:
            super().write(batch)
            sink_events.extend(batch)

    recorder = Recorder()
    bus = Bus(run_dir, journal=journal)
    bus.add_sink("r", recorder, SinkPolicy(queue_size=10, batch_size=5))
    bus.open()
    for i in range(100):
        bus.publish(metrics(i))
    bus.publish(Hyperparams(time=time.time(), params={"lr": 0.1}))
    bus.publish(RunFinished(time=time.time(), status="completed"))
    time.sleep(0.1)
    recorder.release.set()
    assert bus.close(10)
    kinds = [type(e).__name__ for e in sink_events]
    assert kinds[-2:] == ["Hyperparams", "RunFinished"]
    health = bus.stats()["r"]
    if journal:
        # The overflow waited in the journal: every metric arrived, in order.
        assert health.dropped == 0 and health.spilled > 0
        assert [e.step for e in sink_events if isinstance(e, Metrics)] == list(range(100))
    else:
        assert health.dropped > 0
    blocked.release.set()


def test_async_sink_runs_in_the_loop(run_dir: Path) -> None:
    class AsyncSink:
        def __init__(self) -> None:
            self.events: list[Event] = []
            self.opened = False
            self.closed = False

        async def open(self) -> None:
            self.opened = True

        async def write(self, batch: Sequence[Event]) -> None:
            await asyncio.sleep(0)
            self.events.extend(batch)

        async def close(self) -> None:
            self.closed = True

    sink = AsyncSink()
    with Bus(run_dir, sinks={"a": sink}) as bus:
        for i in range(10):
            bus.publish(metrics(i))
    assert sink.opened and sink.closed
    assert len(sink.events) == 10


def test_sync_sink_runs_on_its_own_thread(run_dir: Path) -> None:
    threads: set[str] = set()

    class Where:
        def open(self, context: SinkContext) -> None:
            threads.add(threading.current_thread().name)

        def write(self, batch: Sequence[Event]) -> None:
            threads.add(threading.current_thread().name)

    with Bus(run_dir, sinks={"w": Where()}) as bus:
        bus.publish(metrics(0))
    assert threads == {"expbus-sink-w"}


def test_open_failure_names_the_sink_and_closes_the_others(run_dir: Path) -> None:
    class Broken:
        def open(self) -> None:
            raise PermissionError("/read-only/events.jsonl")

        def write(self, batch: Sequence[Event]) -> None:  # pragma: no cover
            pass

    good = MemorySink()
    bus = Bus(run_dir, sinks={"good": good, "broken": Broken()})
    with pytest.raises(SinkOpenError, match=r"'broken'.*PermissionError.*read-only"):
        bus.open()
    assert good.closed
    bus.publish(metrics(0))  # still a no-op, never raises
    # No sink's call thread outlives the failed open.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name.startswith("expbus-sink-") for t in threading.enumerate()):
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith("expbus-sink-")] == []


def test_tensor_like_values_are_resolved_off_the_publishing_thread(run_dir: Path) -> None:
    resolved_on: list[str] = []

    class LazyScalar:
        def item(self) -> float:
            resolved_on.append(threading.current_thread().name)
            return 0.5

    sink = MemorySink()
    with Bus(run_dir, sinks={"m": sink}) as bus:
        bus.publish(Metrics(time=time.time(), step=1, values={"loss": LazyScalar()}))  # type: ignore[dict-item]
    assert resolved_on == ["expbus-bus"]
    assert sink.events[0].values == {"loss": 0.5}  # type: ignore[attr-defined]
    assert read_journal(run_dir)[0].values == {"loss": 0.5}  # type: ignore[attr-defined]


def test_unresolvable_value_is_reported_not_raised(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def item(self) -> float:
            raise RuntimeError("device lost")

    sink = MemorySink()
    with caplog.at_level(logging.ERROR, logger="expbus.bus"), Bus(run_dir, sinks={"m": sink}) as bus:
        bus.publish(Metrics(time=time.time(), step=1, values={"x": Broken()}))  # type: ignore[dict-item]
        bus.publish(metrics(2))
    assert [e.step for e in sink.events] == [2]  # type: ignore[attr-defined]
    assert any("device lost" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_publish_is_silent_in_a_forked_child(run_dir: Path) -> None:
    sink = MemorySink()
    with Bus(run_dir, sinks={"m": sink}) as bus:
        bus.publish(metrics(0))
        bus.flush(5)
        pid = os.fork()
        if pid == 0:  # child: publish, flush and close must be harmless no-ops
            try:
                bus.publish(metrics(99))
                ok = bus.flush(1) is False
                bus.close(1)
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        bus.publish(metrics(1))
    assert [e.step for e in sink.events] == [0, 1]  # type: ignore[attr-defined]
    assert [e.step for e in read_journal(run_dir)] == [0, 1]  # type: ignore[attr-defined]


def test_buses_are_independent(tmp_path: Path) -> None:
    a, b = MemorySink(), MemorySink()
    with Bus(tmp_path / "a", sinks={"m": a}) as bus_a, Bus(tmp_path / "b", sinks={"m": b}) as bus_b:
        bus_a.publish(metrics(1))
        bus_b.publish(metrics(2))
    assert [e.step for e in a.events] == [1]  # type: ignore[attr-defined]
    assert [e.step for e in b.events] == [2]  # type: ignore[attr-defined]


def test_no_journal_without_run_dir() -> None:
    sink = MemorySink()
    with Bus(sinks={"m": sink}, journal=False) as bus:
        bus.publish(metrics(0))
        assert bus.journal_path is None
    assert len(sink.events) == 1


def test_bus_cannot_be_pickled(run_dir: Path) -> None:
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Bus(run_dir))


def test_health_reports_queue_depth_and_lag(run_dir: Path) -> None:
    blocked = BlockedSink()
    bus = Bus(run_dir, poll_interval=0.01)  # drained well within the 0.2 s the test waits
    bus.add_sink("b", blocked, SinkPolicy(batch_size=1, batch_delay=0))
    bus.open()
    for i in range(5):
        bus.publish(Metrics(time=time.time() - 10, step=i, values={"x": 1.0}))
    time.sleep(0.2)
    health = bus.stats()["b"]
    assert health.queue_depth == 4  # one batch is inside the blocked write
    assert health.lag_seconds >= 10
    blocked.release.set()
    assert bus.close(5)
    assert bus.stats()["b"].delivered == 5


def test_close_logs_a_summary_per_sink(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="expbus.bus"):
        with Bus(run_dir, sinks={"one": MemorySink(), "two": MemorySink()}) as bus:
            bus.publish(metrics(0))
    summary = "\n".join(r.getMessage() for r in caplog.records)
    assert "one: closed delivered=1 dropped=0" in summary
    assert "two: closed delivered=1 dropped=0" in summary
    assert "journal:" in summary


def test_flush_and_close_wake_a_bus_that_polls_rarely(run_dir: Path) -> None:
    # The pump sleeps poll_interval between drains; flush and close must not wait for it
    # (with a 1-hour poll, both would miss their 20 s deadlines without the wake).
    sink = MemorySink()
    bus = Bus(run_dir, sinks={"m": sink}, poll_interval=3600.0)
    bus.open()
    for i in range(10):
        bus.publish(metrics(i))
    assert bus.flush(20)
    assert [e.step for e in sink.events] == list(range(10))  # type: ignore[attr-defined]
    bus.publish(metrics(10))
    assert bus.close(20)
    assert [e.step for e in sink.events] == list(range(11))  # type: ignore[attr-defined]
    assert sink.closed
