"""One sink's worker: its bounded queue, batching, retries, failure isolation and health.

Everything here runs in the bus's event loop, except a sync sink's calls, which run on a
daemon thread owned by that sink alone (so a hung sink can never keep the process alive
or block another sink).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ._cursor import CursorStore
from ._events import Event
from ._health import SinkHealth, SinkState
from ._journal import JournalTail
from ._positions import PositionRuns
from ._sink import SinkContext, SinkPolicy, TransientSinkError, open_args

__all__ = ["SinkRunner", "Marker", "FlushRequest", "CloseRequest"]

log = logging.getLogger("expbus.bus")

# A sink whose writes are not durable on return advances its cursor when its ``flush``
# succeeds; the worker flushes it at least this often (seconds) while it delivers.
CURSOR_FLUSH_INTERVAL = 1.0


class Marker:
    """An in-band request that travels behind the events already queued."""

    def __init__(self, expected_acks: int) -> None:
        self.remaining = expected_acks
        self.ok = True
        self.done = threading.Event()
        if expected_acks == 0:
            self.done.set()

    def ack(self, ok: bool) -> None:
        """Called once per sink (in the loop thread) when the sink has reached the marker."""
        self.ok = self.ok and ok
        self.remaining -= 1
        if self.remaining <= 0:
            self.done.set()


class FlushRequest(Marker):
    """Deliver and flush everything queued before this marker."""


class CloseRequest(Marker):
    """Deliver, flush and close; the sink takes nothing after this."""


class _SinkThread:
    """A daemon thread that runs one sync sink's calls, in order."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args, loop, future = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop is gone (close deadline passed); nobody is waiting

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((fn, args, loop, future))
        return await future

    def stop(self) -> None:
        self._calls.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _default_is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientSinkError, ConnectionError, TimeoutError))


class _Hung(Exception):
    """A sink call outlived its ``write_timeout``."""


class SinkRunner:
    """Owns one sink on a bus: queue, batching, delivery with retries, and counters."""

    def __init__(self, sink_id: str, sink: Any, policy: SinkPolicy) -> None:
        self.sink_id = sink_id
        self.sink = sink
        self.policy = policy
        self.queue: deque[Event | Marker] = deque()
        # Journal positions of the queued events, in queue order (markers have none);
        # -1 for an event the journal did not record. Kept as runs of consecutive
        # positions: no int object per queued event.
        self._positions = PositionRuns()
        self.events_queued = 0
        self.markers_queued = 0
        self.state: SinkState = "starting"
        self.delivered = 0
        self.dropped = 0
        self.failed = 0
        self.errors = 0
        self.retries = 0
        self.last_error: str | None = None
        self.caught_up = 0
        # Delivery cursor: the journal position of the first event not yet acknowledged.
        self.cursor_store: CursorStore | None = None
        self.journal_identity: str | None = None
        self.position: int | None = None
        self.catch_up_end = 0
        self._cursor_frozen = False
        # Highest journal position written to the sink, and whether the sink's ``write``
        # is durable on return (else the cursor follows its ``flush``).
        self._written_through = -1
        self._durable = bool(getattr(sink, "durable_writes", False)) or not callable(getattr(sink, "flush", None))
        self._last_cursor_flush = time.monotonic()
        # Spilling: when the queue is full under drop_newest and the journal is on, new events
        # stay in the journal (nothing in memory, nothing dropped) and are read back from it
        # as the queue drains. Set by the bus when it writes a journal.
        self.spilled = 0
        self.journal_end: Callable[[], int] | None = None
        self.journal_tail: Callable[[int], JournalTail] | None = None
        self._tail: JournalTail | None = None
        self._spilling = False
        # Live events below this position are (or were) read from the journal instead.
        self._live_from = 0
        self._held_markers: list[Marker] = []
        self._reported = False
        self._consecutive_failures = 0
        self._in_flight = 0
        self._first_arrival = 0.0
        self._wake: anyio.Event | None = None
        self._space: anyio.Event | None = None
        self._thread: _SinkThread | None = None
        custom = getattr(sink, "is_transient", None)
        self._is_transient: Callable[[BaseException], bool] = (
            custom if callable(custom) else _default_is_transient
        )

    # -- health -----------------------------------------------------------------------
    def health(self) -> SinkHealth:
        """A snapshot of this sink's counters (safe to call from any thread)."""
        lag = 0.0
        try:
            head = self.queue[0]
        except IndexError:
            head = None
        if isinstance(head, Event):
            lag = max(0.0, time.time() - head.time)
        return SinkHealth(
            sink_id=self.sink_id,
            state=self.state,
            delivered=self.delivered,
            dropped=self.dropped,
            failed=self.failed,
            errors=self.errors,
            retries=self.retries,
            queue_depth=self.events_queued,
            lag_seconds=lag,
            last_error=self.last_error,
            caught_up=self.caught_up,
            position=self.position,
            spilled=self.spilled,
        )

    # -- calling the sink -------------------------------------------------------------
    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        if self._thread is None:
            self._thread = _SinkThread(f"expbus-sink-{self.sink_id}")
        return await self._thread.call(fn, *args)

    async def _call_bounded(self, fn: Callable[..., Any], *args: Any) -> Any:
        with anyio.move_on_after(self.policy.write_timeout) as scope:
            return await self._call(fn, *args)
        if scope.cancelled_caught:
            raise _Hung(f"{getattr(fn, '__name__', 'call')} did not return within "
                        f"write_timeout={self.policy.write_timeout}s")
        return None  # pragma: no cover - unreachable

    def _report(self, what: str, exc: BaseException, detail: str = "") -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not self._reported:
            self._reported = True
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            log.error(
                "expbus sink %r: %s failed%s: %s: %s (further errors are counted, summary at close)\n%s",
                self.sink_id, what, detail, type(exc).__name__, exc, tb,
            )

    async def open(self, context: SinkContext) -> None:
        """Open the sink (raises what the sink's ``open`` raises)."""
        opener = getattr(self.sink, "open", None)
        if opener is not None:
            await self._call(opener, *open_args(opener, context))
        self.state = "open"

    # -- the queue --------------------------------------------------------------------
    def offer(self, event: Event, position: int = -1, *, block: bool = False) -> bool:
        """Queue an event; False means "full, and the policy is to wait" (``block``).

        ``position`` is the event's journal position (-1: not journaled). ``block``
        makes a full queue answer False whatever the policy (catch-up never drops).
        """
        if self.state != "open":
            self.dropped += 1
            return True
        if position < self._live_from and position >= 0:
            # Spilling (or just stopped): this one is read back from the journal.
            if self._spilling:
                self.spilled += 1
            return True
        if self.events_queued >= self.policy.queue_size and (event.droppable or block):
            if self.policy.when_full == "drop_newest" and not block:
                if position >= 0 and self.journal_tail is not None and self.journal_end is not None:
                    self._start_spilling(position)
                    return True
                self.dropped += 1
                return True
            return False
        if not self.queue:
            self._first_arrival = time.monotonic()
            self._notify()
        self.queue.append(event)
        self._positions.append(position)
        self.events_queued += 1
        if self.events_queued == self.policy.batch_size:
            # Only the crossing wakes the worker: it re-checks the size before it waits.
            self._notify()
        return True

    def _start_spilling(self, position: int) -> None:
        assert self.journal_tail is not None
        self._spilling = True
        self._live_from = 1 << 62
        self._tail = self.journal_tail(position)
        self.spilled += 1
        log.info("expbus sink %r: queue full (%d events); reading further events back from the journal "
                 "as it drains, from position %d", self.sink_id, self.policy.queue_size, position)
        self._notify()

    def _refill(self) -> None:
        """Move spilled events from the journal into the queue, up to the queue bound."""
        assert self._tail is not None and self.journal_end is not None
        end = self.journal_end()
        room = self.policy.queue_size - self.events_queued
        try:
            items = self._tail.read(end, max(room, 0))
        except OSError as exc:
            items = []
            self._tail.damaged = True
            self._report("journal read-back", exc)
        if items and not self.queue:
            self._first_arrival = time.monotonic()
        for position, event in items:
            self.queue.append(event)
            self._positions.append(position)
        self.events_queued += len(items)
        if self._tail.damaged:
            lost = max(0, end - self._tail.position)
            self.dropped += lost
            log.error("expbus sink %r: the journal could not be read back past position %d; %d events "
                      "counted as dropped (a replay can deliver them)", self.sink_id, self._tail.position, lost)
            self._stop_spilling(end)
        elif self._tail.position >= end:
            self._stop_spilling(end)

    def _stop_spilling(self, end: int) -> None:
        self._spilling = False
        self._live_from = end
        if self._tail is not None:
            self._tail.close()
            self._tail = None
        # Markers that arrived while spilling follow everything published before them.
        for marker in self._held_markers:
            self.queue.append(marker)
            self.markers_queued += 1
        self._held_markers.clear()
        self._notify()

    def offer_marker(self, marker: Marker) -> None:
        """Queue a flush/close marker behind everything already queued."""
        if self.state in ("closed", "failed_to_open"):
            marker.ack(self.state == "closed")
            return
        if self._spilling:
            # Events published before it are still in the journal: it waits for them.
            self._held_markers.append(marker)
            self._notify()
            return
        self.queue.append(marker)
        self.markers_queued += 1
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake.is_set():
            wake.set()

    async def offer_blocking(self, event: Event, position: int) -> None:
        """Queue a catch-up event, waiting for room whatever the policy (never dropped)."""
        while not self.offer(event, position, block=True):
            await self.wait_for_space()

    async def wait_for_space(self) -> None:
        """Wait until the queue has room again (``block`` policy)."""
        while self.state == "open" and self.events_queued >= self.policy.queue_size:
            self._space = anyio.Event()
            await self._space.wait()

    def _batch_ready(self) -> bool:
        return (self.markers_queued > 0 or self.events_queued >= self.policy.batch_size
                or (self._spilling and bool(self._held_markers)))

    async def _wait(self) -> None:
        while not self.queue:
            if self._spilling and self.state == "open":
                self._refill()
                if self.queue:
                    break
            self._wake = anyio.Event()
            await self._wake.wait()
        if self._batch_ready():
            return
        remaining = self._first_arrival + self.policy.batch_delay - time.monotonic()
        with anyio.move_on_after(max(0.0, remaining)):
            while not self._batch_ready():
                self._wake = anyio.Event()
                await self._wake.wait()

    def _take_batch(self) -> tuple[list[Event], list[int]]:
        batch: list[Event] = []
        limit = self.policy.batch_size
        q = self.queue
        while q and len(batch) < limit:
            head = q[0]
            if isinstance(head, Marker):
                break
            batch.append(q.popleft())  # type: ignore[arg-type]
        positions = self._positions.popleft_many(len(batch))
        self.events_queued -= len(batch)
        if q:
            self._first_arrival = time.monotonic()
        if self._space is not None and self.events_queued < self.policy.queue_size:
            self._space.set()
        return batch, positions

    # -- delivery ---------------------------------------------------------------------
    async def _deliver(self, batch: list[Event], positions: list[int]) -> None:
        attempt = 0
        while True:
            try:
                await self._call_bounded(self.sink.write, batch)
            except _Hung as exc:
                self._report("write", exc)
                self.failed += len(batch)
                self._cursor_frozen = True
                self._disable(f"hung: {exc}")
                return
            except Exception as exc:
                self._report("write", exc, f" on a batch of {len(batch)} (first: {batch[0]!r:.200})")
                if self._is_transient(exc) and attempt < self.policy.max_retries:
                    delay = min(self.policy.retry_backoff * (2**attempt), self.policy.retry_backoff_max)
                    delay *= random.uniform(0.5, 1.0)
                    attempt += 1
                    self.retries += 1
                    await anyio.sleep(delay)
                    continue
                self.failed += len(batch)
                if attempt:
                    log.warning("expbus sink %r: a batch of %d events failed for good after %d attempts (%s: %s); "
                                "the journal keeps them (a resumed run or expbus replay delivers them)",
                                self.sink_id, len(batch), attempt + 1, type(exc).__name__, exc)
                # The cursor stays before this batch: a later catch-up or replay re-sends it.
                self._cursor_frozen = True
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.policy.max_consecutive_failures:
                    self._disable(f"{self._consecutive_failures} failed batches in a row")
                return
            else:
                self.delivered += len(batch)
                self._consecutive_failures = 0
                self._advance_cursor(positions)
                return

    def _advance_cursor(self, positions: list[int]) -> None:
        """After an acknowledged batch: count catch-up events; save the cursor if the write is durable."""
        end = self.catch_up_end
        if end and positions and positions[0] < end:
            self.caught_up += sum(1 for p in positions if 0 <= p < end)
        last = max(positions, default=-1)
        if last > self._written_through:
            self._written_through = last
        if self._durable:
            self._save_cursor(last)

    def _save_cursor(self, last: int) -> None:
        """Record that the sink holds everything up to journal position ``last``."""
        if last < 0 or self._cursor_frozen or self.cursor_store is None:
            return
        if self.position is not None and last + 1 <= self.position:
            return
        self.position = last + 1
        try:
            self.cursor_store.save(self.sink_id, self.journal_identity, self.position)
        except OSError as exc:
            self._cursor_frozen = True
            log.error("expbus sink %r: cannot save its delivery cursor (%s); a resumed run will not "
                      "catch it up past position %d", self.sink_id, exc, self.position)

    def _disable(self, why: str) -> None:
        if self.state != "open":
            return
        self.state = "disabled"
        log.error("expbus sink %r disabled (%s); its queued events are counted as dropped", self.sink_id, why)
        self._drop_queued()

    def _drop_queued(self) -> None:
        kept: deque[Event | Marker] = deque()
        for item in self.queue:
            if isinstance(item, Marker):
                kept.append(item)
            else:
                self.dropped += 1
        self.queue = kept
        self._positions.clear()
        self.events_queued = 0
        if self._spilling:
            end = self.journal_end() if self.journal_end is not None else 0
            position = self._tail.position if self._tail is not None else end
            self.dropped += max(0, end - max(position, self._tail.start if self._tail else 0))
            self._stop_spilling(end)
        if self._space is not None:
            self._space.set()

    async def _flush_sink(self) -> bool:
        flusher = getattr(self.sink, "flush", None)
        if flusher is None or self.state != "open":
            return self.state == "open"
        written = self._written_through
        self._last_cursor_flush = time.monotonic()
        try:
            await self._call_bounded(flusher)
        except _Hung as exc:
            self._report("flush", exc)
            self._disable(f"hung in flush: {exc}")
            return False
        except Exception as exc:
            self._report("flush", exc)
            return False
        self._save_cursor(written)
        return True

    async def _close_sink(self) -> bool:
        ok = True
        if self.state == "open":
            ok = await self._flush_sink()
        closer = getattr(self.sink, "close", None)
        if closer is not None and self.state in ("open", "disabled"):
            try:
                await self._call_bounded(closer)
            except Exception as exc:
                self._report("close", exc)
                ok = False
        if self.state == "open":
            self.state = "closed"
        if self._thread is not None:
            self._thread.stop()
        return ok

    async def run(self) -> None:
        """The worker loop: wait for a batch, deliver it, honour markers."""
        while True:
            await self._wait()
            if self._spilling and self.state == "open" and self.events_queued <= self.policy.queue_size // 2:
                self._refill()
            batch, positions = self._take_batch()
            if batch:
                if self.state == "open":
                    self._in_flight = len(batch)
                    await self._deliver(batch, positions)
                    self._in_flight = 0
                    if (not self._durable and self.cursor_store is not None
                            and time.monotonic() - self._last_cursor_flush >= CURSOR_FLUSH_INTERVAL):
                        await self._flush_sink()
                else:
                    self.dropped += len(batch)
            if self.queue and isinstance(self.queue[0], Marker):
                marker = self.queue.popleft()
                self.markers_queued -= 1
                assert isinstance(marker, Marker)
                if isinstance(marker, CloseRequest):
                    ok = await self._close_sink()
                    marker.ack(ok)
                    # Whatever arrives after the close is not ours to deliver.
                    self._drop_queued()
                    return
                marker.ack(await self._flush_sink())

    def abandon(self) -> None:
        """At the close deadline: count what is still queued as dropped."""
        for item in self.queue:
            if isinstance(item, Event):
                self.dropped += 1
        # A batch still inside a hung write was not delivered either.
        self.dropped += self._in_flight
        self._in_flight = 0
        if self._spilling:
            end = self.journal_end() if self.journal_end is not None else 0
            start = self._tail.position if self._tail is not None else end
            self.dropped += max(0, end - max(start, self._tail.start if self._tail else 0))
            self._spilling = False
            if self._tail is not None:
                self._tail.close()
                self._tail = None
        for marker in self._held_markers:
            marker.ack(False)
        self._held_markers.clear()
        self.queue.clear()
        self._positions.clear()
        self.events_queued = 0
        if self.state == "open":
            self.state = "closed"
        if self._thread is not None:
            self._thread.stop()
