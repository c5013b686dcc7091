"""The sink contract suite: pytest tests every sink must pass, runnable on a user's own sink.

Subclass :class:`SinkContract` in a test module, say how to build your sink and how to read
back what reached its backend, and pytest collects the contract's tests::

    from expbus.sinks.contract import SinkContract

    class TestMySink(SinkContract):
        def make_sink(self, run_dir):
            return MySink(url=...)

        def read_back(self, run_dir):
            # every Metrics point the backend holds, as (step, {name: value}) in order
            return [(row.step, row.values) for row in my_backend_rows(run_dir)]

The contract: events are delivered in order; batches of any size are accepted; a flush is
acknowledged; close is bounded and idempotent; an exception is isolated and counted (the
other events still arrive); and lifecycle events do not break it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expbus.bus import Bus, Event, Hyperparams, Metrics, RunFinished, RunStarted, Sink, SinkPolicy

__all__ = ["SinkContract", "FailingOnce", "metric_points"]


def metric_points(events: Sequence[Event]) -> list[tuple[int, dict[str, float]]]:
    """``(step, values)`` of every ``Metrics`` event, in order (a helper for ``read_back``)."""
    return [(e.step, dict(e.values)) for e in events if isinstance(e, Metrics)]


class FailingOnce:
    """Wraps a real sink; its first ``write`` raises before reaching the sink (fault injection)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failed = False

    def open(self, context: Any) -> None:
        opener = getattr(self.inner, "open", None)
        if opener is not None:
            try:
                opener(context)
            except TypeError:
                opener()

    def write(self, batch: Sequence[Event]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected failure")
        self.inner.write(batch)

    def flush(self) -> None:
        flusher = getattr(self.inner, "flush", None)
        if flusher is not None:
            flusher()

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            closer()


class SinkContract:
    """Base class of the contract tests; override :meth:`make_sink` and :meth:`read_back`."""

    #: Seconds the contract allows for close.
    close_timeout: float = 30.0

    def make_sink(self, run_dir: Path) -> Sink:
        """A fresh sink writing under ``run_dir``."""
        raise NotImplementedError

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        """Every metric point the backend holds after close, as ``(step, values)``, in order."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------
    def _run(self, run_dir: Path, sink: Any, events: Sequence[Event], policy: SinkPolicy | None = None) -> Bus:
        bus = Bus(run_dir, journal=False)
        bus.add_sink("contract", sink, policy or SinkPolicy(batch_delay=0.01))
        bus.open()
        for event in events:
            bus.publish(event)
        assert bus.flush(self.close_timeout), "flush was not acknowledged"
        assert bus.close(self.close_timeout), f"close failed: {bus.stats()['contract']}"
        return bus

    @staticmethod
    def _metrics(steps: range, names: Sequence[str] = ("loss", "acc")) -> list[Event]:
        return [
            Metrics(time=time.time(), step=s, epoch=0, values={n: s + i / 10 for i, n in enumerate(names)})
            for s in steps
        ]

    # -- the contract -----------------------------------------------------------------
    def test_contract_order_is_kept(self, tmp_path: Path) -> None:
        events = self._metrics(range(200))
        bus = self._run(tmp_path, self.make_sink(tmp_path), events)
        assert self.read_back(tmp_path) == metric_points(events)
        health = bus.stats()["contract"]
        assert health.delivered == len(events) and health.dropped == 0 and health.errors == 0

    def test_contract_batches_of_any_size(self, tmp_path: Path) -> None:
        events = self._metrics(range(50))
        self._run(tmp_path, self.make_sink(tmp_path), events, SinkPolicy(batch_size=1, batch_delay=0))
        assert self.read_back(tmp_path) == metric_points(events)

    def test_contract_lifecycle_events(self, tmp_path: Path) -> None:
        events: list[Event] = [
            RunStarted(time=time.time(), run_id="r", host="h", pid=1, run_dir=str(tmp_path)),
            Hyperparams(time=time.time(), params={"optim": {"lr": 0.1}, "layers": [1, 2]}),
            *self._metrics(range(5)),
            RunFinished(time=time.time(), status="completed", step=4),
        ]
        self._run(tmp_path, self.make_sink(tmp_path), events)
        assert self.read_back(tmp_path) == metric_points(events)

    def test_contract_close_is_bounded_and_idempotent(self, tmp_path: Path) -> None:
        sink = self.make_sink(tmp_path)
        bus = Bus(tmp_path, journal=False, sinks={"contract": sink})
        bus.open()
        bus.publish(self._metrics(range(1))[0])
        start = time.monotonic()
        assert bus.close(self.close_timeout)
        assert time.monotonic() - start <= self.close_timeout
        assert bus.close(self.close_timeout)  # idempotent
        assert bus.stats()["contract"].state == "closed"

    def test_contract_exception_is_isolated_and_counted(self, tmp_path: Path) -> None:
        events = self._metrics(range(30))
        wrapped = FailingOnce(self.make_sink(tmp_path))
        bus = Bus(tmp_path, journal=False)
        bus.add_sink("contract", wrapped, SinkPolicy(batch_size=10, batch_delay=0))
        bus.open()
        for event in events:
            bus.publish(event)
        bus.flush(self.close_timeout)
        bus.close(self.close_timeout)
        health = bus.stats()["contract"]
        assert health.errors == 1
        assert health.failed >= 1 and health.delivered + health.failed == len(events)
        delivered = self.read_back(tmp_path)
        assert delivered == metric_points(events)[health.failed :]
