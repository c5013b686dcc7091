"""``value_resolver``: one call resolves every pending value of a drain; a failing resolver changes nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from expbus.bus import Bus, Metrics, Text, Timing, read_journal, resolve_values_in_bulk
from expbus.sinks.testing import MemorySink


class Box:
    """A tensor-like value: resolved through ``item()``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def item(self) -> float:
        return self.value


def test_one_call_resolves_metrics_and_timings_and_leaves_the_rest() -> None:
    calls: list[list[Any]] = []

    def resolver(values: list[Any]) -> list[Any]:
        calls.append(list(values))
        return [v.item() if isinstance(v, Box) else v for v in values]

    plain = Metrics(time=1.0, step=0, values={"a": 1.0})
    text = Text(time=1.0, step=0, name="note", text="hello")
    items: list[Any] = [
        Metrics(time=1.0, step=1, values={"a": Box(0.5), "b": 2}),
        plain,
        text,
        Timing(time=1.0, step=1, durations={"step": Box(0.25)}),
    ]
    resolve_values_in_bulk(items, resolver)
    assert len(calls) == 1  # one call for the whole drain, plain events not included
    assert [type(v) for v in calls[0]] == [Box, int, Box]
    assert items[0] == Metrics(time=1.0, step=1, values={"a": 0.5, "b": 2})
    assert items[1] is plain and items[2] is text
    assert items[3] == Timing(time=1.0, step=1, durations={"step": 0.25})


def test_a_failing_or_short_resolver_leaves_the_events_to_item() -> None:
    event = Metrics(time=1.0, step=1, values={"a": Box(0.5)})
    for resolver in (lambda values: 1 / 0, lambda values: []):
        items: list[Any] = [event]
        resolve_values_in_bulk(items, resolver)
        assert items[0] is event


def test_the_bus_resolves_a_drain_with_its_resolver(run_dir: Path) -> None:
    seen: list[int] = []

    def resolver(values: list[Any]) -> list[Any]:
        seen.append(len(values))
        return [v.item() if isinstance(v, Box) else v for v in values]

    sink = MemorySink()
    bus = Bus(run_dir, sinks={"m": sink}, value_resolver=resolver, poll_interval=0.2)
    with bus:
        for i in range(50):
            bus.publish(Metrics(time=time.time(), step=i, values={"loss": Box(i / 2), "n": i}))
        assert bus.flush(10)
    assert [e.values for e in sink.events] == [{"loss": i / 2, "n": i} for i in range(50)]  # type: ignore[attr-defined]
    assert [e.values for e in read_journal(run_dir)] == [{"loss": i / 2, "n": i} for i in range(50)]  # type: ignore[attr-defined]
    assert sum(seen) == 100 and len(seen) < 50  # values of many events per call
