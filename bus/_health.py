"""Health counters of one sink, readable at any time."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["SinkHealth", "JournalHealth", "format_health"]

SinkState = Literal["starting", "open", "disabled", "closed", "failed_to_open"]


class SinkHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one sink's delivery.

    Attributes:
        sink_id: the sink's id.
        state: ``starting``, ``open``, ``disabled`` (too many failures, or hung),
            ``closed`` or ``failed_to_open``.
        delivered: events written successfully.
        dropped: events dropped: queue full under ``drop_newest``, or left in the queue of a
            disabled sink or at the close deadline.
        failed: events in batches that failed for good (after retries).
        errors: failed write/flush/close calls (each retry that fails counts).
        retries: retries attempted.
        queue_depth: events waiting in the sink's queue now.
        lag_seconds: age of the oldest waiting event (0 when the queue is empty).
        last_error: the last error's text, if any.
        caught_up: events of an earlier session this sink received from the journal
            (catch-up at open, or ``expbus replay``).
        position: the sink's delivery cursor: the journal position of the first event it
            has not acknowledged (``None`` without a journal).
        spilled: events that arrived while the sink's queue was full and were read back
            from the journal when it drained, instead of being dropped (journal on).
    """

    sink_id: str
    state: SinkState
    delivered: int
    dropped: int
    failed: int
    errors: int
    retries: int
    queue_depth: int
    lag_seconds: float
    last_error: str | None = None
    caught_up: int = 0
    position: int | None = None
    spilled: int = 0


class JournalHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the journal writer."""

    path: str | None
    records: int
    bytes_written: int
    errors: int
    last_error: str | None = None


def format_health(health: SinkHealth) -> str:
    """One line for logs: ``tb: open delivered=120 dropped=0 ...``."""
    line = (
        f"{health.sink_id}: {health.state} delivered={health.delivered} dropped={health.dropped}"
        f" failed={health.failed} errors={health.errors} retries={health.retries}"
        f" queued={health.queue_depth} lag={health.lag_seconds:.2f}s"
    )
    if health.caught_up:
        line += f" caught_up={health.caught_up}"
    if health.spilled:
        line += f" spilled={health.spilled}"
    if health.last_error:
        line += f" last_error={health.last_error!r}"
    return line
