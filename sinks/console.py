"""The ``console`` sink: a compact, periodic table of the latest metrics on rank 0's terminal."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Literal, TextIO

from expbus.bus import CheckpointSaved, Event, Metrics, RunFinished, RunStarted, SinkContext, Timing

__all__ = ["ConsoleSink"]

# A longer metric name is cut (with "…") so that one name cannot widen the whole table.
_MAX_NAME = 48


class ConsoleSink:
    """Prints the latest value of each metric, at most every ``every_secs``, plus run lifecycle lines.

    Output (on global rank 0 only; other ranks stay silent)::

        expbus run r1 started on host-a (pid 4242, 8 processes)
        expbus checkpoint saved at step 1000 (epoch 2, val_loss=0.4123, best): /runs/r1/ckpt/step=1000.ckpt
        expbus metrics, run r1, step 1200:
          metric            value  step
          train_loss     0.231871  1200
          val_loss         0.4123  1000
        expbus run r1 completed at step 1200

    A table is printed when a batch arrives ``every_secs`` or more after the previous
    table and some value changed since, and once more at ``RunFinished`` (or at close, when
    the run never finished). ``Timing`` durations are listed like metrics, in seconds.
    Lifecycle and checkpoint lines are printed as they arrive.

    Args:
        every_secs: least seconds between two tables; 0 prints one per delivered batch.
        stream: ``"stdout"`` or ``"stderr"``.
        max_metrics: most rows in a table (sorted by name); the rest are counted.
    """

    #: A resumed run does not reprint the lines an earlier session missed (``catch_up: true``
    #: in the sink's block asks for them anyway).
    catch_up = False

    def __init__(
        self,
        every_secs: float = 10.0,
        stream: Literal["stdout", "stderr"] = "stdout",
        max_metrics: int = 20,
    ) -> None:
        if every_secs < 0:
            raise ValueError(f"every_secs must be >= 0, got {every_secs}")
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
        if max_metrics < 1:
            raise ValueError(f"max_metrics must be at least 1, got {max_metrics}")
        self.every_secs = every_secs
        self.stream = stream
        self.max_metrics = max_metrics
        self.run_id = ""
        # name -> (value, step) of the latest report of each metric.
        self.latest: dict[str, tuple[float, int]] = {}
        self._enabled = True
        self._changed = False
        self._finished = False
        self._last_table: float | None = None
        # Monotonic clock for the throttle, and an output override: both replaceable in tests.
        self._clock: Callable[[], float] = time.monotonic
        self._out: TextIO | None = None

    def open(self, context: SinkContext) -> None:
        """Start the throttle clock; stay silent unless this is global rank 0."""
        self._enabled = context.global_rank == 0
        self.run_id = context.run_id
        self._last_table = self._clock()

    def write(self, batch: Sequence[Event]) -> None:
        """Record the latest values; print lifecycle lines now and a table when one is due."""
        if not self._enabled:
            return
        lines: list[str] = []
        for event in batch:
            if isinstance(event, Metrics):
                self._record(event.values, event.step)
            elif isinstance(event, Timing):
                self._record(event.durations, event.step)
            elif isinstance(event, RunStarted):
                self.run_id = event.run_id or self.run_id
                world = f", {event.world_size} processes" if event.world_size > 1 else ""
                lines.append(f"expbus run {self.run_id} started on {event.host} (pid {event.pid}{world})")
            elif isinstance(event, CheckpointSaved):
                lines.append(_checkpoint_line(event))
            elif isinstance(event, RunFinished):
                # The final table goes before the line that ends the run.
                lines.extend(self._table(event.step))
                lines.append(_finished_line(self.run_id, event))
                self._finished = True
        now = self._clock()
        if self._changed and (self._last_table is None or now - self._last_table >= self.every_secs):
            lines.extend(self._table(None))
        self._emit(lines)

    def flush(self) -> None:
        """Flush the stream."""
        if self._enabled:
            self._target().flush()

    def close(self) -> None:
        """Print the values not shown yet when the run never reported its end."""
        if self._enabled and not self._finished:
            self._emit(self._table(None))

    def _record(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.latest[name] = (value, step)
        if values:
            self._changed = True

    def _table(self, step: int | None) -> list[str]:
        """The lines of a table of the latest values (none when nothing changed since the last)."""
        if not self._changed:
            return []
        self._changed = False
        self._last_table = self._clock()
        names = sorted(self.latest)
        shown = names[: self.max_metrics]
        if step is None:
            step = max(s for _, s in self.latest.values())
        rows = [(_clip(name), _format_value(self.latest[name][0]), str(self.latest[name][1])) for name in shown]
        name_w = max(len("metric"), *(len(r[0]) for r in rows))
        value_w = max(len("value"), *(len(r[1]) for r in rows))
        step_w = max(len("step"), *(len(r[2]) for r in rows))
        lines = [f"expbus metrics, run {self.run_id}, step {step}:"]
        lines.append(f"  {'metric':<{name_w}}  {'value':>{value_w}}  {'step':>{step_w}}")
        lines += [f"  {n:<{name_w}}  {v:>{value_w}}  {s:>{step_w}}" for n, v, s in rows]
        if len(names) > len(shown):
            lines.append(f"  ... and {len(names) - len(shown)} more")
        return lines

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        out = self._target()
        # One write for the whole block, so that a table printed from this worker thread
        # is not interleaved line by line with the progress bar's output.
        out.write("\n".join(lines) + "\n")
        out.flush()

    def _target(self) -> TextIO:
        # Looked up at each write (not at construction), so that a redirected or captured
        # sys.stdout/sys.stderr receives the output.
        if self._out is not None:
            return self._out
        return sys.stderr if self.stream == "stderr" else sys.stdout


def _format_value(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    return f"{value:.6g}"


def _clip(name: str) -> str:
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 1] + "…"


def _checkpoint_line(event: CheckpointSaved) -> str:
    details: list[str] = []
    if event.epoch is not None:
        details.append(f"epoch {event.epoch}")
    if event.monitor is not None and event.monitor_value is not None:
        details.append(f"{event.monitor}={_format_value(event.monitor_value)}")
    if event.is_best:
        details.append("best")
    if event.is_last:
        details.append("last")
    extra = f" ({', '.join(details)})" if details else ""
    return f"expbus checkpoint saved at step {event.step}{extra}: {event.path}"


def _finished_line(run_id: str, event: RunFinished) -> str:
    where = f" at step {event.step}" if event.step is not None else ""
    line = f"expbus run {run_id} {event.status}{where}"
    if event.error:
        line += f": {event.error}"
    return line
