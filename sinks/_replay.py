"""Replay a run's journal into sinks: push a run recorded offline to MLflow or W&B afterwards.

A replay is a bus without a journal of its own that catches its sinks up from the run's
journal (:class:`expbus.bus.Bus` with ``journal=False``): each sink's delivery cursor in
``run_dir/.expbus/cursors`` says what it already has, so a second replay adds nothing,
and a sink id that delivered during the run (or an earlier replay) gets only the rest.
Sinks keep their backend run id in ``run_dir/.expbus/sinks/<id>.json``, so a replay
continues the same MLflow / W&B run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from expbus.bus import JOURNAL_NAME, Bus, JournalReader, RunStarted, Sink, SinkHealth, SinkPolicy, journal_segments

__all__ = ["replay_journal", "ReplayProgress", "ReplayResult", "journal_run_id"]


class ReplayProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Where a replay stands, reported about twice a second."""

    sink_id: str
    done: int
    total: int
    elapsed: float

    @property
    def rate(self) -> float:
        """Events per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of replaying one journal into one sink.

    Attributes:
        sink_id: the sink.
        journal_records: records in the journal.
        already_delivered: records the sink had acknowledged before (its cursor).
        replayed: records delivered by this replay.
        health: the sink's health at close (failed, dropped and errors are in there).
    """

    sink_id: str
    journal_records: int
    already_delivered: int
    replayed: int
    health: SinkHealth

    @property
    def complete(self) -> bool:
        """True when the sink now holds the whole journal."""
        return self.already_delivered + self.replayed >= self.journal_records


def journal_run_id(run_dir: str | os.PathLike[str], journal_name: str = JOURNAL_NAME) -> str | None:
    """The run id the bridge kept in ``run_dir/.expbus/run_id``, else the journal's first ``RunStarted``."""
    path = Path(run_dir) / ".expbus" / "run_id"
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except OSError:
        stored = ""
    if stored:
        return stored
    for event in JournalReader(Path(run_dir) / journal_name):
        if isinstance(event, RunStarted):
            return event.run_id
    return None


def replay_journal(
    run_dir: str | os.PathLike[str],
    sinks: Mapping[str, tuple[Sink, SinkPolicy]],
    *,
    journal_name: str = JOURNAL_NAME,
    timeout: float = 3600.0,
    progress: Callable[[ReplayProgress], None] | None = None,
) -> list[ReplayResult]:
    """Deliver ``run_dir``'s journal to ``sinks`` (id -> (sink, policy)), from each one's cursor.

    Args:
        run_dir: the run directory holding the journal (and the cursors).
        sinks: the sinks to replay into, keyed by sink id (the id selects the cursor and
            the sink's saved backend state).
        journal_name: the journal's file name (``journal.rankN.msgpack`` for rank N).
        timeout: deadline for the whole replay, flush and close included.
        progress: called about twice a second, and once at the end, per sink.

    Raises:
        FileNotFoundError: there is no journal at ``run_dir/journal_name``.
        SinkOpenError: a sink failed to open.
    """
    run_dir = Path(run_dir)
    if not journal_segments(run_dir / journal_name):
        raise FileNotFoundError(f"no journal {journal_name!r} in {run_dir}: nothing to replay")
    bus = Bus(run_dir, run_id=journal_run_id(run_dir, journal_name), journal=False,
              journal_name=journal_name, catch_up=True)
    for sink_id, (sink, policy) in sinks.items():
        # A replay always catches up (a console sink too, if asked to replay into one).
        bus.add_sink(sink_id, sink, msgspec.structs.replace(policy, catch_up=True, rank_zero_only=False))
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    bus.open()
    plan = bus.catch_up_plan()
    end = max((stop for _, stop in plan.values()), default=0)
    firsts = {sink_id: plan.get(sink_id, (end, end))[0] for sink_id in sinks}
    try:
        while time.monotonic() < deadline:
            # A flush travels behind the catch-up, so it returns once everything is delivered
            # and flushed (which is also when a buffering sink's cursor moves).
            flushed = bus.flush(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            stats = bus.stats()
            pending = False
            for sink_id, first in firsts.items():
                health = stats[sink_id]
                position = health.position if health.position is not None else first
                if health.state == "open" and position < end:
                    pending = True
                if progress is not None:
                    progress(ReplayProgress(sink_id=sink_id, done=max(0, position - first), total=end - first,
                                            elapsed=time.monotonic() - started))
            if flushed or not pending:
                break
    finally:
        bus.close(timeout=max(1.0, deadline - time.monotonic()))
    stats = bus.stats()
    results = []
    for sink_id, first in firsts.items():
        health = stats[sink_id]
        reached = health.position if health.position is not None else first
        results.append(ReplayResult(sink_id=sink_id, journal_records=end, already_delivered=first,
                                    replayed=max(0, reached - first), health=health))
        if progress is not None:
            progress(ReplayProgress(sink_id=sink_id, done=max(0, reached - first), total=end - first,
                                    elapsed=time.monotonic() - started))
    return results
