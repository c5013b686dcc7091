"""PositionRuns: a FIFO of journal positions stored as runs behaves exactly like a deque of ints."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expbus.bus._positions import PositionRuns


def _filled(values: list[int]) -> PositionRuns:
    runs = PositionRuns()
    for value in values:
        runs.append(value)
    return runs


def test_consecutive_positions_are_one_run() -> None:
    runs = _filled(list(range(100, 100_100)))
    assert len(runs) == 100_000
    assert len(runs._runs) == 0  # everything is in the open run: no int object per position
    assert runs.popleft_many(3) == [100, 101, 102]
    assert runs.popleft_many(99_996) == list(range(103, 100_099))
    assert list(runs) == [100_099] and len(runs) == 1


def test_unjournaled_runs_gaps_and_restarts_keep_their_values() -> None:
    values = [-1, -1, 5, 6, 7, -1, 8, 9, 20, 21, 3, 3, -1, 0, 1, -2, -2]
    runs = _filled(values)
    assert list(runs) == values
    assert runs.popleft_many(4) == values[:4]  # splits the run 5, 6, 7
    assert runs.popleft_many(0) == []
    assert runs.popleft_many(len(values) - 4) == values[4:]
    assert len(runs) == 0 and list(runs) == []


def test_appending_after_the_open_run_was_emptied_starts_a_new_run() -> None:
    runs = _filled([7, 8])
    assert runs.popleft_many(2) == [7, 8]
    runs.append(9)  # what would have extended the emptied run
    runs.append(3)
    assert list(runs) == [9, 3]
    assert runs.popleft_many(2) == [9, 3]
    runs.append(-1)
    runs.append(-1)
    assert runs.popleft_many(1) == [-1]
    runs.append(-1)
    assert list(runs) == [-1, -1]


def test_popping_more_than_held_raises_and_changes_nothing() -> None:
    runs = _filled([1, 2, -1])
    with pytest.raises(IndexError):
        runs.popleft_many(4)
    assert list(runs) == [1, 2, -1] and len(runs) == 3


def test_clear() -> None:
    runs = _filled([1, 2, 9, -1, 4])
    runs.clear()
    assert len(runs) == 0 and list(runs) == []
    runs.append(2)
    assert runs.popleft_many(1) == [2]


# A program: ("append", value) or ("pop", n), with values drawn so that runs, gaps, -1 and
# repeated values all occur.
_value = st.one_of(st.integers(min_value=-3, max_value=40), st.just(-1))
_op = st.one_of(
    st.tuples(st.just("append"), _value),
    st.tuples(st.just("run"), st.tuples(st.integers(min_value=-1, max_value=30), st.integers(min_value=1, max_value=12))),
    st.tuples(st.just("pop"), st.integers(min_value=0, max_value=15)),
    st.tuples(st.just("clear"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=80))
def test_behaves_like_a_deque_of_ints(ops: list[tuple[str, object]]) -> None:
    runs = PositionRuns()
    model: deque[int] = deque()
    for kind, arg in ops:
        if kind == "append":
            assert isinstance(arg, int)
            runs.append(arg)
            model.append(arg)
        elif kind == "run":
            first, count = arg  # type: ignore[misc]
            for i in range(count):
                value = first + i if first >= 0 else first
                runs.append(value)
                model.append(value)
        elif kind == "pop":
            assert isinstance(arg, int)
            if arg > len(model):
                with pytest.raises(IndexError):
                    runs.popleft_many(arg)
            else:
                assert runs.popleft_many(arg) == [model.popleft() for _ in range(arg)]
        else:
            runs.clear()
            model.clear()
        assert len(runs) == len(model)
        assert list(runs) == list(model)
