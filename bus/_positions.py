"""The journal positions of a sink's queued events, kept as runs instead of one int each.

A sink's queue holds, beside every queued event, the event's journal position (``-1`` for
an event the journal did not record). Queued events nearly always have consecutive
positions, so a run ``(first, count)`` stands for ``count`` of them: memory per discontinuity
instead of per event (a ``deque[int]`` costs an int object and a slot, about 40 bytes, per
queued event).

A run is either ascending (``first >= 0``: ``first, first + 1, ...``) or a repetition of one
negative value (``-1, -1, ...``). Any other sequence of ints is stored exactly too, as more
runs; a run of one is kept as a bare int, so the worst case costs what a ``deque[int]`` does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

__all__ = ["PositionRuns"]

# ``_next`` when there is no open run: no int equals it.
_NONE: object = object()


class PositionRuns:
    """A FIFO of ints (journal positions), stored as runs; used by the bus thread only."""

    __slots__ = ("_count", "_first", "_len", "_next", "_runs")

    def __init__(self) -> None:
        # Closed runs, oldest first: an int (a run of one) or (first, count).
        self._runs: deque[int | tuple[int, int]] = deque()
        # The open run at the end (the one ``append`` extends): first value and length.
        self._first = 0
        self._count = 0
        # The value that extends the open run (first + count, or first itself if negative).
        self._next: object = _NONE
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, position: int) -> None:
        """Add ``position`` at the end."""
        self._len += 1
        if position == self._next:
            self._count += 1
            if position >= 0:
                self._next = position + 1
            return
        if self._count:
            self._runs.append(self._first if self._count == 1 else (self._first, self._count))
        self._first = position
        self._count = 1
        self._next = position + 1 if position >= 0 else position

    def popleft_many(self, n: int) -> list[int]:
        """Remove the first ``n`` values and return them, oldest first (IndexError if fewer)."""
        if n > self._len:
            raise IndexError("pop from an empty PositionRuns")
        out: list[int] = []
        if n <= 0:
            return out
        self._len -= n
        runs = self._runs
        while n and runs:
            run = runs[0]
            if type(run) is int:
                out.append(run)
                runs.popleft()
                n -= 1
                continue
            first, count = run  # type: ignore[misc]
            take = min(n, count)
            out.extend(range(first, first + take) if first >= 0 else [first] * take)
            n -= take
            if take == count:
                runs.popleft()
            else:
                rest = count - take
                start = first + take if first >= 0 else first
                runs[0] = start if rest == 1 else (start, rest)
        if n:
            # The rest comes from the open run.
            first = self._first
            out.extend(range(first, first + n) if first >= 0 else [first] * n)
            self._count -= n
            self._first = first + n if first >= 0 else first
            if not self._count:
                self._next = _NONE
        return out

    def clear(self) -> None:
        """Remove everything."""
        self._runs.clear()
        self._count = 0
        self._next = _NONE
        self._len = 0

    def __iter__(self) -> Iterator[int]:
        for run in self._runs:
            if type(run) is int:
                yield run
            else:
                first, count = run  # type: ignore[misc]
                yield from (range(first, first + count) if first >= 0 else [first] * count)
        first = self._first
        yield from (range(first, first + self._count) if first >= 0 else [first] * self._count)

    def __repr__(self) -> str:
        return f"PositionRuns({len(self)} positions in {len(self._runs) + bool(self._count)} runs)"
