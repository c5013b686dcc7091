"""A sink that hangs forever: training finishes, close returns at its deadline, the undelivered count is reported."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from expbus.bus import Event, SinkContext, from_json, read_journal, to_json
from expbus.sinks.jsonl import JsonlSink
from expbus.trainer_bridge import BridgeCallback

CLOSE_TIMEOUT = 2.0
STEPS = 200


class HangingSink:
    """Fault injection around a real jsonl sink: after its first batch, every write blocks forever.

    "Forever" is until the test releases it at teardown, so no thread outlives the test.
    """

    # Batches every 0.5 s (the bus's default is 2 s): the 2 s of training below span several.
    default_policy: ClassVar[dict[str, float]] = {"batch_delay": 0.5}

    def __init__(self, inner: JsonlSink) -> None:
        self.inner = inner
        self.writes = 0
        self.hung = threading.Event()
        self.release = threading.Event()

    def open(self, context: SinkContext) -> None:
        self.inner.open(context)

    def write(self, batch: Sequence[Event]) -> None:
        if self.writes >= 1:
            self.hung.set()
            self.release.wait()
            return  # released at the test's teardown: nothing more reaches the file
        self.writes += 1
        self.inner.write(batch)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def lines(path: Path) -> list[Any]:
    return [json.loads(to_json(from_json(line))) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_sink_that_hangs_forever(tmp_path: Path, make_trainer: Any, faults: Any,
                                   caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    stuck = HangingSink(JsonlSink(path="stuck.jsonl"))
    config = {"run_dir": str(run_dir), "bus": {"close_timeout": CLOSE_TIMEOUT},
              "sinks": {"events": {"type": "jsonl"}}}
    bridge = BridgeCallback(config, sinks={"stuck": stuck})
    clock = faults.StepClock()  # after the bridge: its teardown runs once the bridge has closed the bus
    trainer = make_trainer([bridge, clock], max_steps=STEPS)
    try:
        with caplog.at_level(logging.INFO, logger="expbus"):
            # 10 ms a step: training outlasts the sink's first batch (its batch_delay is 0.5 s), so
            # the first batch reaches the file and a later one hangs.
            trainer.fit(faults.FaultModel(step_sleep=0.01), train_dataloaders=faults.fault_data())
    finally:
        stuck.release.set()
        stuck.inner.close()

    # Training finished every step; the sink did hang.
    assert trainer.global_step == STEPS
    assert stuck.hung.is_set()

    # close returned at its deadline: it waited for the stuck sink, then gave up on it.
    assert bridge.last_close_ok is False
    assert CLOSE_TIMEOUT <= clock.close_seconds < CLOSE_TIMEOUT + 5.0, clock.close_seconds

    # The journal holds everything: every metric at every step, and exactly what the healthy
    # jsonl sink beside the stuck one received.
    journal = read_journal(run_dir)
    faults.check_training_logged_every_step(journal, STEPS)
    assert lines(run_dir / "events.jsonl") == [json.loads(to_json(e)) for e in journal]
    events = bridge.last_stats["events"]
    assert (events.delivered, events.dropped, events.failed, events.errors) == (len(journal), 0, 0, 0)

    # The stuck sink: what reached its file is counted as delivered, everything else as
    # dropped at the close deadline (the batch inside the hung write included), nothing lost
    # from the count.
    reached = lines(run_dir / "stuck.jsonl")
    assert reached == [json.loads(to_json(e)) for e in journal[: len(reached)]]
    health = bridge.last_stats["stuck"]
    assert health.delivered == len(reached) > 0
    assert health.dropped == len(journal) - len(reached) > 0
    assert (health.failed, health.errors, health.state) == (0, 0, "closed")

    # ... and the close's summary reports it, naming the sink.
    summary = [r.getMessage() for r in caplog.records if r.name == "expbus.bus" and "bus closed" in r.getMessage()]
    assert len(summary) == 1
    assert f"stuck: closed delivered={len(reached)} dropped={len(journal) - len(reached)} failed=0" in summary[0]
    assert [r.levelno for r in caplog.records if r.getMessage() == summary[0]] == [logging.WARNING]
    print(f"\nhung sink figures: journal={len(journal)} delivered={health.delivered} dropped={health.dropped} "
          f"close={clock.close_seconds:.2f}s (deadline {CLOSE_TIMEOUT}s)")
