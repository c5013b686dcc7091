"""Test doubles for users' own tests: an in-memory sink and ``capture_events()``.

Example::

    from expbus.sinks.testing import capture_events

    with capture_events() as events:
        trainer.fit(model)          # with a BridgeCallback attached
    assert any(isinstance(e, Metrics) for e in events)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from expbus.bus import Event, SinkContext

__all__ = ["MemorySink", "capture_events", "active_captures"]


class MemorySink:
    """Keeps every delivered event in ``events`` (thread-safe to read).

    Attributes:
        events: the events delivered so far, in order.
        batches: the size of each ``write`` call.
        context: the :class:`SinkContext` it was opened with.
        flushes: how many times ``flush`` was called.
        closed: whether ``close`` was called.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.batches: list[int] = []
        self.context: SinkContext | None = None
        self.flushes = 0
        self.closed = False
        self._lock = threading.Lock()

    def open(self, context: SinkContext) -> None:
        """Remember the context."""
        self.context = context

    def write(self, batch: Sequence[Event]) -> None:
        """Append the batch."""
        with self._lock:
            self.events.extend(batch)
            self.batches.append(len(batch))

    def flush(self) -> None:
        """Count the flush."""
        self.flushes += 1

    def close(self) -> None:
        """Mark closed."""
        self.closed = True

    def of_type(self, kind: type[Event]) -> list[Event]:
        """The delivered events of one type."""
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


# Captures currently active in this process, joined by every bus the bridge builds. A list
# on the module is the one shared piece of state: it exists only inside a ``with`` block.
_active: list[MemorySink] = []
_active_lock = threading.Lock()


def active_captures() -> list[MemorySink]:
    """The memory sinks of the ``capture_events()`` blocks now open (used by ``build_bus``)."""
    with _active_lock:
        return list(_active)


@contextmanager
def capture_events() -> Iterator[list[Event]]:
    """Capture every event delivered by buses built (by the bridge or ``build_bus``) inside the block.

    Yields the list the events are appended to. The buses built inside the block get an
    extra in-memory sink; the list is complete once those buses are closed (the bridge
    closes its bus at the end of ``fit``).
    """
    sink = MemorySink()
    with _active_lock:
        _active.append(sink)
    try:
        yield sink.events
    finally:
        with _active_lock:
            _active.remove(sink)
