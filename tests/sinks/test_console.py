"""Tests of the console sink: throttled tables, lifecycle lines, rank 0 only."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from expbus.bus import (
    Bus,
    CheckpointRemoved,
    CheckpointSaved,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    SinkContext,
    Text,
    Timing,
)
from expbus.sinks._errors import ConfigError
from expbus.sinks._registry import create_sink
from expbus.sinks.console import ConsoleSink


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(sink: ConsoleSink, clock: FakeClock, *, rank: int = 0) -> io.StringIO:
    out = io.StringIO()
    sink._clock = clock
    sink._out = out
    sink.open(SinkContext(sink_id="console", run_dir=Path("."), run_id="r1", global_rank=rank, world_size=2))
    return out


def take(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


def test_tables_are_throttled_and_the_run_ends_with_one() -> None:
    clock = FakeClock()
    sink = ConsoleSink(every_secs=10.0)
    out = opened(sink, clock)

    clock.now = 101.0
    sink.write([RunStarted(time=1.0, run_id="r1", host="node-a", pid=4242, world_size=8),
                Metrics(time=1.0, step=10, values={"train_loss": 0.5}, epoch=0)])
    # Lifecycle lines at once; no table before every_secs have passed since the open.
    assert take(out) == "expbus run r1 started on node-a (pid 4242, 8 processes)\n"

    clock.now = 110.0
    sink.write([Metrics(time=2.0, step=20, values={"train_loss": 0.25, "lr": 0.001}, epoch=0)])
    assert take(out) == (
        "expbus metrics, run r1, step 20:\n"
        "  metric      value  step\n"
        "  lr          0.001    20\n"
        "  train_loss   0.25    20\n"
    )

    clock.now = 115.0
    sink.write([Metrics(time=3.0, step=30, values={"train_loss": 0.125}, epoch=0)])
    assert take(out) == ""  # 5 s after the last table

    clock.now = 121.0
    sink.write([Metrics(time=4.0, step=35, values={"val_loss": 0.75}, epoch=0),
                Timing(time=4.1, step=40, durations={"train_step_timing": 0.0123456789})])
    assert take(out) == (
        "expbus metrics, run r1, step 40:\n"
        "  metric                 value  step\n"
        "  lr                     0.001    20\n"
        "  train_loss             0.125    30\n"
        "  train_step_timing  0.0123457    40\n"
        "  val_loss                0.75    35\n"
    )

    clock.now = 140.0
    sink.write([Text(time=5.0, step=40, name="note", text="x"), Hyperparams(time=5.0, params={"a": 1})])
    assert take(out) == ""  # nothing new to show

    clock.now = 141.0
    sink.write([Metrics(time=6.0, step=50, values={"train_loss": 0.0625}, epoch=1),
                RunFinished(time=7.0, status="completed", step=50)])
    assert take(out) == (
        "expbus metrics, run r1, step 50:\n"
        "  metric                 value  step\n"
        "  lr                     0.001    20\n"
        "  train_loss            0.0625    50\n"
        "  train_step_timing  0.0123457    40\n"
        "  val_loss                0.75    35\n"
        "expbus run r1 completed at step 50\n"
    )
    sink.flush()
    sink.close()
    assert take(out) == ""  # the finished run's table is not printed twice


def test_checkpoint_and_failure_lines() -> None:
    clock = FakeClock()
    sink = ConsoleSink()
    out = opened(sink, clock)
    sink.write([
        CheckpointSaved(time=1.0, step=1000, path="/runs/r1/ckpt/step=1000.ckpt", epoch=2, monitor="val_loss",
                        monitor_value=0.41234567, is_best=True, size_bytes=10),
        CheckpointSaved(time=1.0, step=1000, path="/runs/r1/ckpt/last.ckpt", is_last=True),
        CheckpointRemoved(time=1.1, step=500, path="/runs/r1/ckpt/step=500.ckpt"),
        RunFinished(time=2.0, status="failed", error="RuntimeError: boom", step=1001),
    ])
    assert take(out) == (
        "expbus checkpoint saved at step 1000 (epoch 2, val_loss=0.412346, best): /runs/r1/ckpt/step=1000.ckpt\n"
        "expbus checkpoint saved at step 1000 (last): /runs/r1/ckpt/last.ckpt\n"
        "expbus run r1 failed at step 1001: RuntimeError: boom\n"
    )


def test_max_metrics_nonfinite_values_and_long_names() -> None:
    clock = FakeClock()
    sink = ConsoleSink(every_secs=0.0, max_metrics=3)
    out = opened(sink, clock)
    long_name = "x" * 60
    sink.write([Metrics(time=1.0, step=7, values={"b": float("nan"), "a": float("inf"), "c": -float("inf"),
                                                   "d": 1234567.0, long_name: 1.0})])
    lines = take(out).splitlines()
    assert lines == [
        "expbus metrics, run r1, step 7:",
        "  metric  value  step",
        "  a         inf     7",
        "  b         nan     7",
        "  c        -inf     7",
        "  ... and 2 more",
    ]
    sink.max_metrics = 10
    sink.write([Metrics(time=2.0, step=8, values={"d": 1234567.0})])
    lines = take(out).splitlines()
    # The long name is cut to 48 characters, which sets the name column's width.
    assert lines[1] == "  " + "metric".ljust(48) + "  " + "value".rjust(11) + "  step"
    assert lines[5] == "  " + "d".ljust(48) + "  1.23457e+06     8"
    assert lines[6] == "  " + "x" * 47 + "…" + "  " + "1".rjust(11) + "     7"
    assert len(lines) == 7


def test_close_prints_what_was_not_shown() -> None:
    clock = FakeClock()
    sink = ConsoleSink(every_secs=60.0)
    out = opened(sink, clock)
    sink.write([Metrics(time=1.0, step=3, values={"loss": 1.5})])
    assert take(out) == ""
    sink.close()
    assert take(out) == "expbus metrics, run r1, step 3:\n  metric  value  step\n  loss      1.5     3\n"


def test_silent_off_rank_zero() -> None:
    clock = FakeClock()
    sink = ConsoleSink(every_secs=0.0)
    out = opened(sink, clock, rank=1)
    sink.write([RunStarted(time=1.0, run_id="r1", host="h", pid=1),
                Metrics(time=1.0, step=1, values={"loss": 1.0}),
                RunFinished(time=2.0, status="completed", step=1)])
    sink.flush()
    sink.close()
    assert out.getvalue() == ""


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_stream_option(stream: str, capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleSink(every_secs=0.0, stream=stream)  # type: ignore[arg-type]
    sink.open(SinkContext(sink_id="console", run_dir=Path("."), run_id="r1"))
    sink.write([Metrics(time=1.0, step=1, values={"loss": 1.0})])
    sink.flush()
    captured = capsys.readouterr()
    printed, other = (captured.out, captured.err) if stream == "stdout" else (captured.err, captured.out)
    assert printed == "expbus metrics, run r1, step 1:\n  metric  value  step\n  loss        1     1\n"
    assert other == ""


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="every_secs"):
        ConsoleSink(every_secs=-1.0)
    with pytest.raises(ValueError, match="stream"):
        ConsoleSink(stream="tty")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_metrics"):
        ConsoleSink(max_metrics=0)
    with pytest.raises(ConfigError, match=r"sinks\.console\.stream"):
        create_sink("console", {"type": "console", "stream": "tty"})
    sink, _policy = create_sink("console", {"type": "console", "every_secs": 2, "stream": "stderr", "max_metrics": 5})
    assert isinstance(sink, ConsoleSink)
    assert (sink.every_secs, sink.stream, sink.max_metrics) == (2, "stderr", 5)


def test_through_the_bus(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Bus(run_dir, run_id="r9", sinks={"console": ConsoleSink(every_secs=3600.0)}) as bus:
        bus.publish(RunStarted(time=1.0, run_id="r9", host="node-b", pid=11))
        for step in range(1, 6):
            bus.publish(Metrics(time=1.0 + step, step=step, values={"loss": 1.0 / step}, epoch=0))
        bus.publish(CheckpointSaved(time=7.0, step=5, path="ck/step=5.ckpt", is_last=True))
        bus.publish(RunFinished(time=8.0, status="completed", step=5))
    assert bus.stats()["console"].state == "closed"
    assert capsys.readouterr().out == (
        "expbus run r9 started on node-b (pid 11)\n"
        "expbus checkpoint saved at step 5 (last): ck/step=5.ckpt\n"
        "expbus metrics, run r9, step 5:\n"
        "  metric  value  step\n"
        "  loss      0.2     5\n"
        "expbus run r9 completed at step 5\n"
    )
