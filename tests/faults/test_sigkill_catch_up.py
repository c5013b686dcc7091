"""Fault: SIGKILL mid-run, then resume. The journal is intact up to its fsync window, and every
sink ends with every point the journal holds (caught up from it), none twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from expbus.bus import CursorStore, Metrics, from_json, read_journal

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Publishes one Metrics event per step through a bus built from YAML-style config (the same
# path the bridge takes), with slow batching so the sinks lag the journal when it is killed.
SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    from expbus.bus import Metrics
    from expbus.sinks import build_bus, load_config

    run_dir, first, count, progress = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    lag = {"batch_delay": 2.0}
    config = load_config({"sinks": {
        "events": {"type": "jsonl", **lag},
        "tb": {"type": "tensorboard", **lag},
        "mlflow": {"type": "mlflow", "tracking_uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}",
                   "experiment_name": "sigkill", **lag},
    }})
    with build_bus(config, run_dir=run_dir, run_id="sigkill-run") as bus:
        print("OPEN", {k: v for k, v in bus.catch_up_plan().items()}, flush=True)
        for step in range(first, first + count):
            bus.publish(Metrics(time=1_700_000_000.0 + step, step=step, values={"loss": 1.0 / (step + 1)}))
            with progress.open("a") as f:
                f.write(f"{step} {time.time()}\\n")
            time.sleep(0.005)
    print("CLOSED", flush=True)
""")


def _start(tmp_path: Path, run_dir: Path, first: int, count: int, progress: Path) -> subprocess.Popen[str]:
    script = tmp_path / "publish.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, str(script), str(run_dir), str(first), str(count), str(progress)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _published(progress: Path) -> dict[int, float]:
    out = {}
    for line in progress.read_text().splitlines():
        step, when = line.split()
        out[int(step)] = float(when)
    return out


def _tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("loss")]


def _mlflow_steps(db: Path) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("sigkill").experiment_id])
    return [m.step for m in client.get_metric_history(run.info.run_id, "loss")]


def _assert_once_each(name: str, steps: list[int], want: list[int]) -> None:
    twice = sorted(step for step, n in Counter(steps).items() if n > 1)
    assert not twice, f"{name}: steps delivered twice: {twice[:20]}"
    missing = sorted(set(want) - set(steps))
    assert not missing, f"{name}: {len(missing)} steps missing, first {missing[:20]}"
    assert sorted(steps) == want, name


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_then_resume_catches_every_sink_up_without_duplicates(tmp_path: Path) -> None:
    run_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    first = _start(tmp_path, run_dir, 0, 100_000, progress)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not progress.is_file() or len(progress.read_text().split()) < 2 * 600):
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    killed_at = time.time()
    first.kill()
    output = first.communicate(timeout=60)[0]
    assert first.returncode == -signal.SIGKILL, output

    # 1. The journal: every event older than its fsync interval (1 s) is there, in order.
    journal_steps = [e.step for e in read_journal(run_dir) if isinstance(e, Metrics)]
    assert journal_steps == list(range(len(journal_steps)))
    old_enough = [s for s, when in _published(progress).items() if when < killed_at - 1.0]
    assert len(old_enough) > 300 and set(old_enough) <= set(journal_steps)
    # The sinks lag the journal at the kill (2 s batches): there is something to catch up.
    cursors = CursorStore(run_dir, "journal.msgpack")
    behind = {sink: len(journal_steps) - (c.position if (c := cursors.load(sink)) else 0)
              for sink in ("events", "tb", "mlflow")}
    assert all(lag > 0 for lag in behind.values()), behind

    # 2. Resume: a new process on the same run directory publishes the next 200 steps.
    resumed_from = len(journal_steps)
    second = _start(tmp_path, run_dir, resumed_from, 200, tmp_path / "progress2.txt")
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 0 and "CLOSED" in output, output

    want = list(range(resumed_from + 200))
    assert [e.step for e in read_journal(run_dir) if isinstance(e, Metrics)] == want
    events = [from_json(line) for line in (run_dir / "events.jsonl").read_bytes().splitlines()]
    _assert_once_each("jsonl", [e.step for e in events if isinstance(e, Metrics)], want)
    _assert_once_each("tensorboard", _tensorboard_steps(run_dir), want)
    _assert_once_each("mlflow", _mlflow_steps(tmp_path / "mlflow.db"), want)
    for sink in ("events", "tb", "mlflow"):
        assert cursors.load(sink).position == len(want) + 0, sink  # type: ignore[union-attr]
