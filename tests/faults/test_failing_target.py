"""A sink target that fails (a full disk, a read-only directory): a clear error naming the sink and the path, other
sinks unaffected, training unaffected."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from expbus.bus import Metrics, SinkOpenError, from_json, read_journal, to_json
from expbus.trainer_bridge import BridgeCallback

STEPS = 200
# /dev/full: every write to it fails with ENOSPC, from the kernel (a full disk, for real).
FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not (FULL.exists() and os.access(FULL, os.W_OK)), reason="no writable /dev/full")


def modes_are_enforced() -> bool:
    """Whether this process is refused a write into a 0o500 directory (root, or CAP_DAC_OVERRIDE, is not)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "ro"
        probe.mkdir(mode=0o500)
        try:
            (probe / "x").touch()
        except PermissionError:
            return True
        finally:
            probe.chmod(0o700)
        return False


needs_file_modes = pytest.mark.skipif(not modes_are_enforced(),
                                      reason="file modes are not enforced for this user (root ignores them)")


def train(tmp_path: Path, make_trainer: Any, faults: Any, sinks: dict[str, Any]) -> tuple[BridgeCallback, Any, Path]:
    """A real run (10 ms a step, so the sinks get several batches) with a healthy jsonl and tensorboard sink beside."""
    run_dir = tmp_path / "run"
    config = {"run_dir": str(run_dir), "bus": {"close_timeout": 30},
              "sinks": {"events": {"type": "jsonl"}, "tb": {"type": "tensorboard"}, **sinks}}
    bridge = BridgeCallback(config)
    trainer = make_trainer([bridge], max_steps=STEPS)
    trainer.fit(faults.FaultModel(step_sleep=0.01), train_dataloaders=faults.fault_data())
    assert trainer.global_step == STEPS  # training unaffected
    return bridge, trainer, run_dir


def check_healthy_sinks(bridge: BridgeCallback, run_dir: Path, faults: Any) -> list[Any]:
    """Training logged every step; the jsonl and tensorboard sinks hold every point (read back by TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    journal = read_journal(run_dir)
    faults.check_training_logged_every_step(journal, STEPS)
    lines = [from_json(line) for line in (run_dir / "events.jsonl").read_bytes().splitlines()]
    assert [json.loads(to_json(e)) for e in lines] == [json.loads(to_json(e)) for e in journal]
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    for name in ("train_loss", "weights/norm"):
        stored = [(s.step, s.value) for s in accumulator.Scalars(name)]
        # TensorBoard keeps a scalar as float32.
        expected = [(e.step, float(np.float32(e.values[name]))) for e in journal if isinstance(e, Metrics)]
        assert stored == expected, name
    for sink_id in ("events", "tb"):
        health = bridge.last_stats[sink_id]
        assert (health.state, health.delivered, health.dropped, health.failed, health.errors) == (
            "closed", len(journal), 0, 0, 0), health
    return journal


def check_failed_sink(bridge: BridgeCallback, journal: list[Any], sink_id: str, path: Path, error: str,
                      caplog: pytest.LogCaptureFixture) -> None:
    """The failing sink's error names it and its file; its health accounts for every event it did not write."""
    errors = [r for r in caplog.records if r.name == "expbus.bus" and r.levelno == logging.ERROR
              and r.getMessage().startswith(f"expbus sink {sink_id!r}: write failed")]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]  # once; the rest are counted
    message = errors[0].getMessage()
    assert re.search(rf"{error}: '{re.escape(str(path))}'", message), message
    health = bridge.last_stats[sink_id]
    assert health.errors >= 1 and health.retries == 0  # a full or read-only disk is not retried
    assert re.search(rf"{error}: '{re.escape(str(path))}'", health.last_error or ""), health.last_error
    assert health.delivered + health.failed + health.dropped == len(journal), health
    assert health.failed >= 1
    # ... and the close's summary line shows it.
    summary = [r for r in caplog.records if r.name == "expbus.bus" and "bus closed" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert re.search(rf"\n  {sink_id}: \w+ delivered={health.delivered} dropped={health.dropped} "
                     rf"failed={health.failed} ", summary[0].getMessage()), summary[0].getMessage()
    print(f"\n{sink_id} figures: journal={len(journal)} state={health.state} delivered={health.delivered} "
          f"failed={health.failed} dropped={health.dropped} errors={health.errors}")


@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_dev_full
def test_full_disk(tmp_path: Path, make_trainer: Any, faults: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="expbus"):
        bridge, _trainer, run_dir = train(tmp_path, make_trainer, faults, {"full": {"type": "jsonl", "path": str(FULL)}})
    journal = check_healthy_sinks(bridge, run_dir, faults)
    check_failed_sink(bridge, journal, "full", FULL, re.escape("[Errno 28] No space left on device"), caplog)
    # Nothing reached the full disk, and nothing was counted as delivered.
    assert bridge.last_stats["full"].delivered == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_file_modes
def test_read_only_directory(tmp_path: Path, make_trainer: Any, faults: Any,
                             caplog: pytest.LogCaptureFixture) -> None:
    read_only = tmp_path / "run" / "ro"
    read_only.mkdir(parents=True)
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        with caplog.at_level(logging.INFO, logger="expbus"):
            bridge, _trainer, run_dir = train(tmp_path, make_trainer, faults,
                                              {"table": {"type": "csv", "path": "ro/metrics.csv"}})
    finally:
        read_only.chmod(stat.S_IRWXU)
    journal = check_healthy_sinks(bridge, run_dir, faults)
    check_failed_sink(bridge, journal, "table", read_only / "metrics.csv",
                      re.escape("PermissionError: [Errno 13] Permission denied"), caplog)
    # No metric reached the read-only directory (a batch with no metric row, such as the last
    # one with RunFinished alone, writes nothing and succeeds).
    assert list(read_only.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unwritable_target_at_open(tmp_path: Path, make_trainer: Any, faults: Any) -> None:
    # A path whose parent is a file: not even root can create it. The run fails before its
    # first step, with an error naming the sink and the path (a misconfigured target is
    # found at once, not after hours of training).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = {"run_dir": str(tmp_path / "run"),
              "sinks": {"events": {"type": "jsonl"}, "bad": {"type": "jsonl", "path": str(blocker / "events.jsonl")}}}
    trainer = make_trainer([BridgeCallback(config)], max_steps=STEPS)
    with pytest.raises(SinkOpenError) as caught:
        trainer.fit(faults.FaultModel(), train_dataloaders=faults.fault_data())
    assert caught.value.sink_id == "bad"
    assert re.search(rf"sink 'bad' failed to open: \w+Error: \[Errno \d+\] .*: '{re.escape(str(blocker))}",
                     str(caught.value)), str(caught.value)
    assert trainer.global_step == 0
