"""The bus: a non-blocking ``publish`` from any thread, a journal, and fan-out to sinks.

Threads::

    training thread                 bus thread (anyio loop, daemon)          per sync sink
    publish(ev) = deque.append ---> pump: drain ingress every poll_interval  (daemon thread)
    flush(t) / close(t) --------->    resolve values, journal, then fan out   write(batch)
      (in-band markers, waited          into one bounded queue per sink  --->
       on with a deadline)           one worker task per sink: batch, retry

``publish`` is the ingress deque's own ``append`` while the bus is open (nothing else runs
on the caller's thread) and a no-op before ``open``, after ``close`` and in a forked
child. Fetch ``bus.publish`` when you call it; do not keep it beyond the bus's lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import msgspec

from ._codec import ValueResolver, resolve_event, resolve_values_in_bulk, to_msgpack
from ._cursor import CursorStore
from ._events import Event
from ._health import JournalHealth, SinkHealth, format_health
from ._journal import (
    JOURNAL_NAME,
    JournalReader,
    JournalWriter,
    count_records,
    journal_identity,
    journal_segments,
)
from ._runner import CloseRequest, FlushRequest, Marker, SinkRunner
from ._sink import Sink, SinkContext, SinkOpenError, SinkPolicy

__all__ = ["Bus"]

log = logging.getLogger("expbus.bus")

# Most items the pump takes from the ingress per cycle, so that a burst cannot starve
# the sink workers of loop time.
_MAX_DRAIN = 50_000
# Events the fan-out hands to sink queues between two yields to the loop.
_FANOUT_SLICE = 1024
# Encoded events the pump hands to the journal writer at a time.
_JOURNAL_SLICE = 1024
# Position of an event the journal did not record (no journal, or it failed).
_UNJOURNALED = -1


def _disable_in_child(ref: weakref.ref[Bus]) -> None:
    bus = ref()
    if bus is not None:
        bus._forked()


class Bus:
    """An in-process event bus with a journal and independent sink workers.

    Args:
        run_dir: directory of the run: the journal and relative sink paths live here.
            ``None`` runs without a journal (tests, benchmarks).
        run_id: stable id of the run, passed to sinks (random when not given).
        sinks: sinks keyed by id; see :meth:`add_sink` for policies.
        journal: write the journal (``run_dir/journal.msgpack``).
        journal_name: file name of the journal inside ``run_dir``.
        fsync_interval: at most this many seconds between journal fsyncs.
        poll_interval: how often the bus thread drains the ingress (seconds); ``flush`` and
            ``close`` wake it at once.
        open_timeout: deadline for every sink's ``open``.
        global_rank: this process's rank (sinks with ``rank_zero_only`` are skipped
            on other ranks).
        world_size: number of processes in the run.
        catch_up: at open, deliver to each sink the journal records it has not
            acknowledged yet (its cursor in ``run_dir/.expbus/cursors``), before any new
            event. With ``journal=False`` this replays an existing journal (``expbus replay``).
        value_resolver: resolves every tensor value of one drain of the ingress in one
            call, in the bus thread (see :func:`expbus.bus.resolve_values_in_bulk`); the
            bridge passes one that stacks torch tensors. ``None``: one ``item()`` per value.

    Delivery cursors: with a journal, every sink's worker saves, after each batch the sink
    accepted, the journal position it has delivered up to. A bus opened again on the same
    run directory (a resumed run after a crash, ``SIGKILL`` or preemption) first catches
    each lagging sink up from the journal, then delivers new events. A sink never seen in
    this run directory gets the whole journal (it starts at position 0). Events dropped by
    ``drop_newest`` do not hold a cursor back; a batch that failed for good, or a disabled
    sink, does (catch-up re-sends from there).

    Use it as a context manager, or call :meth:`open` and :meth:`close`::

        with Bus(run_dir="runs/a", sinks={"events": JsonlSink()}) as bus:
            bus.publish(Metrics(time=now(), step=1, values={"loss": 0.5}))
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        run_id: str | None = None,
        sinks: Mapping[str, Sink] | None = None,
        journal: bool = True,
        journal_name: str = JOURNAL_NAME,
        fsync_interval: float = 1.0,
        poll_interval: float = 0.2,
        open_timeout: float = 120.0,
        global_rank: int = 0,
        world_size: int = 1,
        catch_up: bool = True,
        value_resolver: ValueResolver | None = None,
    ) -> None:
        self.value_resolver = value_resolver
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.catch_up = catch_up
        self._journal_file = self.run_dir / journal_name if self.run_dir is not None else None
        self._cursors: CursorStore | None = None
        if self.run_dir is not None and (journal or catch_up):
            self._cursors = CursorStore(self.run_dir, journal_name)
        # Each sink's cursor at open, and the lagging ones' catch-up starts (set at open).
        self._starts: dict[str, int] = {}
        self._catch_up: dict[str, int] = {}
        self._catch_up_end = 0
        self.run_id = run_id or uuid.uuid4().hex
        self.global_rank = global_rank
        self.world_size = world_size
        self.poll_interval = poll_interval
        self.open_timeout = open_timeout
        self._runners: dict[str, SinkRunner] = {}
        self._journal: JournalWriter | None = None
        if journal and self.run_dir is not None:
            self._journal = JournalWriter(self.run_dir / journal_name, fsync_interval=fsync_interval)
        self._journal_errors = 0
        self._journal_last_error: str | None = None
        self._ingress: deque[Any] = deque()
        self._pending: deque[Any] = deque()
        self._pending_wake: anyio.Event | None = None
        self._thread: threading.Thread | None = None
        self._state = "new"  # new -> open -> closing -> closed
        self._pid = os.getpid()
        self._stop_requested = threading.Event()
        self._stop_loop: Any = None
        # The bus thread's event loop, and the event its pump sleeps on between polls: flush,
        # close and shutdown (never publish) wake it at once from another thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_wake: anyio.Event | None = None
        self._unresolvable_reported = False
        for sink_id, sink in (sinks or {}).items():
            self.add_sink(sink_id, sink)

    # -- configuration ----------------------------------------------------------------
    def add_sink(self, sink_id: str, sink: Sink, policy: SinkPolicy | None = None) -> None:
        """Attach a sink before :meth:`open`, with its delivery policy."""
        if self._state != "new":
            raise RuntimeError("sinks are added before the bus opens")
        if sink_id in self._runners:
            raise ValueError(f"duplicate sink id {sink_id!r}")
        if not callable(getattr(sink, "write", None)):
            raise TypeError(f"sink {sink_id!r} ({type(sink).__name__}) has no write(batch) method")
        policy = policy or _declared_policy(sink)
        if policy.rank_zero_only and self.global_rank != 0:
            return
        self._runners[sink_id] = SinkRunner(sink_id, sink, policy)

    @property
    def sink_ids(self) -> list[str]:
        """Ids of the sinks this bus delivers to (in this process)."""
        return list(self._runners)

    @property
    def journal_path(self) -> Path | None:
        """The journal file being written, if any."""
        return self._journal.path if self._journal is not None else None

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._state == "open"

    # -- the hot path -----------------------------------------------------------------
    def publish(self, event: Event) -> None:
        """Hand an event to the bus from any thread.

        One append to a thread-safe buffer: it never waits for a sink, never calls into
        the event loop and never raises because of a sink. A no-op when the bus is not
        open (before ``open``, after ``close``, in a forked child).
        """
        # While open, the instance attribute ``publish`` (the ingress deque's append)
        # shadows this method; reaching this body means the bus is not open.
        return None

    # -- lifetime ---------------------------------------------------------------------
    def open(self) -> Bus:
        """Start the bus thread, open the journal and every sink.

        Raises:
            SinkOpenError: a sink's ``open`` failed (naming the sink); the bus is closed.
            OSError: the journal could not be created.
        """
        if self._state != "new":
            return self
        if self._journal is not None:
            self._journal.open()
            for runner in self._runners.values():
                # A full queue spills to the journal instead of dropping (see SinkRunner).
                runner.journal_end = self._journal_end
                runner.journal_tail = self._journal.tail
        self._plan_catch_up()
        started: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name="expbus-bus", daemon=True
        )
        self._state = "open"
        self._thread.start()
        try:
            started.result(timeout=self.open_timeout)
        except BaseException as exc:
            self._state = "closing"
            self._shutdown_thread(5.0)
            self._state = "closed"
            if self._journal is not None:
                self._journal.close()
            if isinstance(exc, TimeoutError):
                raise SinkOpenError("?", f"sinks did not open within {self.open_timeout}s") from None
            raise
        self.publish = self._ingress.append  # type: ignore[method-assign,assignment]
        os.register_at_fork(after_in_child=lambda ref=weakref.ref(self): _disable_in_child(ref))
        return self

    def __enter__(self) -> Bus:
        return self.open()

    def _journal_end(self) -> int:
        journal = self._journal
        assert journal is not None
        return journal.end_position

    def _plan_catch_up(self) -> None:
        """Give every sink its cursor and decide which journal range each one is missing."""
        if self._cursors is None or self._journal_file is None:
            return
        if self._journal is not None:
            end, identity = self._journal.first_position, self._journal.identity
        elif journal_segments(self._journal_file):
            end, identity = count_records(self._journal_file), journal_identity(self._journal_file)
        else:
            return
        for runner in self._runners.values():
            # Without a journal of its own the bus is replaying one: the cursor is what
            # makes a second replay add nothing.
            runner.cursor_store = self._cursors
            runner.journal_identity = identity
            cursor = self._cursors.load(runner.sink_id)
            start = 0
            if cursor is not None:
                if cursor.journal != identity or cursor.position > end:
                    log.warning("expbus sink %r: its delivery cursor (%s) does not match the journal %s "
                                "(%d records); not catching it up", runner.sink_id, cursor,
                                self._journal_file, end)
                    start = end
                else:
                    start = cursor.position
            runner.position = start
            self._starts[runner.sink_id] = start
            wanted = runner.policy.catch_up
            if wanted is None:
                wanted = bool(getattr(runner.sink, "catch_up", True))
            if self.catch_up and wanted and start < end:
                self._catch_up[runner.sink_id] = start
                runner.catch_up_end = end
        self._catch_up_end = end

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _forked(self) -> None:
        # In a forked child the bus thread does not exist: stay silent.
        self.__dict__.pop("publish", None)
        self._ingress = deque()
        self._loop = None
        self._state = "closed"
        self._journal = None
        self._runners = {}

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver and flush everything published so far, waiting at most ``timeout`` s.

        Returns True when every sink acknowledged in time. Never raises.
        """
        if self._state != "open" or os.getpid() != self._pid:
            return False
        request = FlushRequest(len(self._runners) + 1)  # +1: the journal's sync
        self._ingress.append(request)
        self._wake_pump()
        finished = request.done.wait(max(0.0, timeout))
        return finished and request.ok

    def close(self, timeout: float = 10.0) -> bool:
        """Deliver, flush and close every sink, within ``timeout`` seconds. Idempotent.

        Whatever a sink has not delivered by the deadline is counted as dropped (the
        journal still holds it). Logs one summary line per sink. Returns True when every
        sink closed cleanly in time. Never raises.
        """
        if self._state != "open" or os.getpid() != self._pid:
            return self._state == "closed"
        self._state = "closing"
        deadline = time.monotonic() + max(0.0, timeout)
        request = CloseRequest(len(self._runners) + 1)
        self._ingress.append(request)
        self._wake_pump()
        # From here on, publish is a no-op again.
        self.__dict__.pop("publish", None)
        finished = request.done.wait(max(0.0, deadline - time.monotonic()))
        self._shutdown_thread(max(0.05, deadline - time.monotonic()))
        for runner in self._runners.values():
            runner.abandon()
        self._state = "closed"
        self._log_summary()
        return finished and request.ok

    def _shutdown_thread(self, timeout: float) -> None:
        # The pump polls this flag; the wake only shortens its sleep.
        self._stop_requested.set()
        self._wake_pump()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)

    def _wake_pump(self) -> None:
        """From any thread but the bus's: end the pump's sleep now (for flush, close, shutdown; never publish)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._set_pump_wake)
        except RuntimeError:
            pass  # the loop has ended

    def _set_pump_wake(self) -> None:
        wake = self._pump_wake
        if wake is not None:
            wake.set()

    def catch_up_plan(self) -> dict[str, tuple[int, int]]:
        """After :meth:`open`: ``sink id -> (cursor, journal end)`` at open, for every sink with a cursor.

        A sink whose cursor is below the end is being caught up with that range (unless
        its policy says ``catch_up: false``); empty without a journal.
        """
        return {sink_id: (start, self._catch_up_end) for sink_id, start in self._starts.items()}

    # -- health -----------------------------------------------------------------------
    def stats(self) -> dict[str, SinkHealth]:
        """Health of every sink, keyed by sink id (a consistent-enough snapshot)."""
        return {sink_id: runner.health() for sink_id, runner in list(self._runners.items())}

    def journal_stats(self) -> JournalHealth:
        """Health of the journal writer."""
        j = self._journal
        return JournalHealth(
            path=str(j.path) if j is not None else None,
            records=j.records if j is not None else 0,
            bytes_written=j.bytes_written if j is not None else 0,
            errors=self._journal_errors,
            last_error=self._journal_last_error,
        )

    def _log_summary(self) -> None:
        stats = self.stats()
        journal = self.journal_stats()
        bad = any(h.dropped or h.failed or h.errors or h.state != "closed" for h in stats.values())
        level = logging.WARNING if bad or journal.errors else logging.INFO
        lines = [f"expbus bus closed (run {self.run_id}):"]
        lines += ["  " + format_health(h) for h in stats.values()]
        if journal.path is not None:
            lines.append(
                f"  journal: {journal.path} records={journal.records} errors={journal.errors}"
            )
        log.log(level, "\n".join(lines))

    # -- the bus thread ---------------------------------------------------------------
    def _thread_main(self, started: Future[None]) -> None:
        try:
            anyio.run(self._main, started, backend="asyncio")
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("expbus bus thread crashed")

    async def _main(self, started: Future[None]) -> None:
        stop_loop = anyio.Event()
        self._stop_loop = stop_loop
        self._loop = asyncio.get_running_loop()
        await self._open_sinks(started)
        if started.done():
            return
        async with anyio.create_task_group() as tg:
            for runner in self._runners.values():
                tg.start_soon(runner.run)
            tg.start_soon(self._pump)
            tg.start_soon(self._fanout)
            started.set_result(None)
            await stop_loop.wait()
            tg.cancel_scope.cancel()
        if self._cursors is not None:
            self._cursors.close()  # the runners are done: no cursor is saved after this
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError as exc:
                self._journal_error(exc)

    async def _open_sinks(self, started: Future[None]) -> None:
        errors: list[SinkOpenError] = []

        async def open_one(runner: SinkRunner) -> None:
            context = SinkContext(
                sink_id=runner.sink_id,
                run_dir=self.run_dir if self.run_dir is not None else Path.cwd(),
                run_id=self.run_id,
                global_rank=self.global_rank,
                world_size=self.world_size,
            )
            try:
                await runner.open(context)
            except Exception as exc:
                runner.state = "failed_to_open"
                errors.append(SinkOpenError(runner.sink_id, exc))
                errors[-1].__cause__ = exc

        with anyio.move_on_after(self.open_timeout):
            async with anyio.create_task_group() as tg:
                for runner in self._runners.values():
                    tg.start_soon(open_one, runner)
        if errors:
            # Close the sinks that did open, then report the first failure. Every runner
            # stops its call thread too: a failed open must not leave one parked for good
            # (Hydra multirun opens many buses in one process).
            for runner in self._runners.values():
                await runner._close_sink()
            started.set_exception(errors[0])

    async def _pump(self) -> None:
        ingress = self._ingress
        pending = self._pending
        while True:
            if not ingress:
                if self._stop_requested.is_set():
                    self._stop_loop.set()
                    return
                # Every wake-up of this thread is a round trip of the GIL that a busy training
                # thread pays for (a forced switch, two thread wake-ups), so it polls rarely;
                # a flush, close or shutdown request wakes it at once (_wake_pump).
                wake = self._pump_wake = anyio.Event()
                with anyio.move_on_after(self.poll_interval):
                    await wake.wait()
                self._pump_wake = None
                continue
            # The drain's lists live in _drain's frame only: nothing of it stays referenced
            # here while the pump sleeps.
            pending.extend(self._drain())
            if self._pending_wake is not None:
                self._pending_wake.set()
            await anyio.sleep(0)

    def _drain(self) -> list[tuple[int, list[Any]]]:
        """Take up to ``_MAX_DRAIN`` items from the ingress: resolve, journal, acknowledge markers.

        Returns the drain as *runs* ``(first, items)`` in publication order: the events of a
        run have consecutive journal positions from ``first`` on (a marker holds none and
        takes none), or none at all when ``first`` is ``_UNJOURNALED``. One run per drain,
        nearly always: no tuple or int object per event.
        """
        journal = self._journal
        pop = self._ingress.popleft
        items: list[Any] = []
        append = items.append
        try:
            for _ in range(_MAX_DRAIN):
                append(pop())
        except IndexError:
            pass
        if self.value_resolver is not None:
            resolve_values_in_bulk(items, self.value_resolver)
        runs: list[tuple[int, list[Any]]] = []
        markers: list[Marker] = []
        # Encoded events not yet handed to the journal: written every _JOURNAL_SLICE, so that
        # a drain's payloads are never all in memory at once.
        payloads: list[bytes] = []
        wrote = False
        failure: OSError | None = None
        # Positions are only trusted while the journal has never failed.
        position = (journal.first_position + journal.records
                    if journal is not None and not self._journal_errors else None)
        first = _UNJOURNALED if position is None else position
        run: list[Any] = []
        add = run.append
        for item in items:
            if isinstance(item, Marker):
                markers.append(item)
                add(item)
                continue
            try:
                event = resolve_event(item)
            except Exception as exc:
                self._report_unresolvable(item, exc)
                continue
            if journal is not None and failure is None:
                try:
                    payloads.append(to_msgpack(event))
                except Exception as exc:
                    self._report_unresolvable(event, exc)
                    if position is None:
                        add(event)
                    else:
                        # Not journaled: a run of its own, and it takes no position.
                        runs.append((first, run))
                        runs.append((_UNJOURNALED, [event]))
                        run = []
                        add = run.append
                        first = position
                    continue
                if len(payloads) >= _JOURNAL_SLICE:
                    try:
                        journal.append(payloads)
                    except OSError as exc:
                        failure = exc
                    wrote = True
                    payloads = []
            add(event)
            if position is not None:
                position += 1
        runs.append((first, run))
        del items, run, add
        if journal is not None and failure is None and (payloads or wrote or markers):
            try:
                journal.append(payloads)
                if markers:
                    journal.sync()
                else:
                    journal.commit()
            except OSError as exc:
                failure = exc
        del payloads
        if failure is not None:
            self._journal_error(failure)
            # Not (reliably) written: these events hold no journal position.
            runs = [(_UNJOURNALED, events) for _, events in runs]
        for marker in markers:
            marker.ack(self._journal_errors == 0)  # the journal's acknowledgement
        return runs

    async def _deliver_catch_up(self) -> None:
        """Feed each lagging sink the journal records it has not acknowledged, in order."""
        lagging = [(runner, self._catch_up[runner.sink_id]) for runner in self._runners.values()
                   if runner.sink_id in self._catch_up]
        if not lagging or self._journal_file is None:
            return
        start = min(first for _, first in lagging)
        log.info("expbus: catching up %s from the journal %s (positions %d..%d)",
                 ", ".join(f"{r.sink_id!r} from {first}" for r, first in lagging),
                 self._journal_file, start, self._catch_up_end)
        reader = JournalReader(self._journal_file)
        since_yield = 0
        try:
            for position, event in reader.positions(start, self._catch_up_end):
                for runner, first in lagging:
                    if position >= first:
                        await runner.offer_blocking(event, position)
                since_yield += 1
                if since_yield >= _FANOUT_SLICE:
                    since_yield = 0
                    await anyio.sleep(0)
        except OSError as exc:
            log.error("expbus: catch-up from the journal %s stopped: %s", self._journal_file, exc)
        if reader.skipped_bytes:
            log.warning("expbus: the journal %s has %d unreadable bytes; catch-up skipped them",
                        self._journal_file, reader.skipped_bytes)

    async def _fanout(self) -> None:
        await self._deliver_catch_up()
        pending = self._pending
        runners = list(self._runners.values())
        since_yield = 0
        while True:
            while not pending:
                self._pending_wake = anyio.Event()
                await self._pending_wake.wait()
            position, run = pending.popleft()
            for index, item in enumerate(run):
                # Let go of each item as it is handed on (a run can be a whole drain).
                run[index] = None
                since_yield += 1
                if since_yield >= _FANOUT_SLICE:
                    # Let the sink workers hand full batches to their threads during a burst,
                    # rather than filling every queue first (which would drop under drop_newest).
                    since_yield = 0
                    await anyio.sleep(0)
                if isinstance(item, Marker):
                    for runner in runners:
                        runner.offer_marker(item)
                    continue
                for runner in runners:
                    if not runner.offer(item, position):
                        await runner.wait_for_space()
                        runner.offer(item, position)
                if position >= 0:
                    position += 1

    def _journal_error(self, exc: OSError) -> None:
        self._journal_errors += 1
        self._journal_last_error = f"{type(exc).__name__}: {exc}"
        if self._journal_errors == 1:
            log.error("expbus journal %s: write failed: %s (sinks still receive events)",
                      self.journal_path, exc)

    def _report_unresolvable(self, event: Any, exc: Exception) -> None:
        if not self._unresolvable_reported:
            self._unresolvable_reported = True
            log.error("expbus: could not resolve/encode %r: %s: %s", event, type(exc).__name__, exc)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a Bus cannot be pickled; create it in the process that uses it")

    def __repr__(self) -> str:
        return f"Bus(run_dir={str(self.run_dir)!r}, sinks={self.sink_ids}, state={self._state})"


def _declared_policy(sink: Any) -> SinkPolicy:
    """The policy a sink class declares in ``default_policy`` (a mapping of policy keys), else the bus's default."""
    declared = getattr(sink, "default_policy", None)
    if isinstance(declared, Mapping):
        return msgspec.convert(dict(declared), SinkPolicy)
    return SinkPolicy()


def describe_host() -> tuple[str, int]:
    """(hostname, pid) of this process, for ``RunStarted``."""
    return socket.gethostname(), os.getpid()
