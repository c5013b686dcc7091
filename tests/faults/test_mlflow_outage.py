"""The ``mlflow server`` is killed mid-run and restarted 10 s later: training never waits on it, the MLflow sink
retries with capped exponential backoff, and afterwards every metric is in MLflow, none duplicated."""

from __future__ import annotations

import json
import logging
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from expbus.bus import Bus, Metrics, SinkPolicy, now, read_journal
from expbus.sinks import create_sink
from expbus.sinks.mlflow import MlflowSink, sanitize_name
from expbus.trainer_bridge import BridgeCallback

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

OUTAGE = 10.0  # seconds between the kill and the restart
STEP_SLEEP = 0.01  # a training step's "work"
RETRY_BACKOFF = SinkPolicy().retry_backoff  # the bus's default first delay (0.5 s)
# Capped low here, so the cap shows within a 10 s outage and the sink is back soon after
# the server; the number of retries is the sink's own default.
RETRY_BACKOFF_MAX = 4.0


class LogBatchCalls:
    """Records every real ``MlflowClient.log_batch`` call the sink makes: (start, end, ok, metrics)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[float, float, bool, int]] = []
        real = MlflowClient.log_batch
        calls = self.calls

        def log_batch(client: Any, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                      tags: Sequence[Any] = (), **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                result = real(client, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
            except BaseException:
                calls.append((start, time.monotonic(), False, len(metrics)))
                raise
            calls.append((start, time.monotonic(), True, len(metrics)))
            return result

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)

    def metrics_landed(self) -> bool:
        return any(ok and n for _s, _e, ok, n in list(self.calls))


class Outage(pl.Callback):
    """Kills the server (``SIGKILL``) once metrics have landed, restarts it ``OUTAGE`` s later, then stops training.

    The server is handled from a thread of its own, so the training thread does nothing
    but train: its step times are what logging costs it, outage or not.
    """

    def __init__(self, server: Any, calls: LogBatchCalls, after_steps: int = 100) -> None:
        self.server = server
        self.calls = calls
        self.after_steps = after_steps
        self.killed_at = 0.0
        self.up_at = 0.0
        self.restart_seconds = 0.0
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._training = True
        self._thread: threading.Thread | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._thread = threading.Thread(target=self._run, args=(trainer,), name="outage", daemon=True)
        self._thread.start()

    def _run(self, trainer: pl.Trainer) -> None:
        try:
            deadline = time.monotonic() + 60
            while trainer.global_step < self.after_steps or not self.calls.metrics_landed():
                if not self._training or time.monotonic() > deadline:
                    raise AssertionError(f"no metric reached MLflow by step {trainer.global_step}")
                time.sleep(0.02)
            self.server.kill()
            self.killed_at = time.monotonic()
            time.sleep(OUTAGE)
            self.restart_seconds = self.server.start()
            self.up_at = time.monotonic()
            time.sleep(1.0)  # a little training with the server back
        except BaseException as exc:  # re-raised in the test
            self.error = exc
        finally:
            self._done.set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._done.is_set():
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(120)
        if self.error is not None:
            raise self.error


def test_mlflow_sink_declares_a_retry_budget_that_outlasts_a_server_restart() -> None:
    _sink, policy = create_sink("ml", {"type": "mlflow", "tracking_uri": "http://127.0.0.1:1"})
    assert policy.max_retries == MlflowSink.default_policy["max_retries"] == 20
    # 20 retries of the bus's capped exponential backoff: minutes, not seconds (jitter 0.5-1x).
    delays = [min(policy.retry_backoff * 2**k, policy.retry_backoff_max) for k in range(policy.max_retries)]
    assert 0.5 * sum(delays) > 120
    # The sink block's own keys win.
    _sink, policy = create_sink("ml", {"type": "mlflow", "max_retries": 3, "retry_backoff_max": 4})
    assert (policy.max_retries, policy.retry_backoff_max) == (3, 4.0)


def test_a_batch_that_exhausts_its_retries_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # A server that never comes back (nothing listens on the port): each batch is retried
    # max_retries times, then fails for good; the count and the error are reported, and the
    # journal still holds every event (for a later replay).
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    bus = Bus(tmp_path, run_id="gone")
    bus.add_sink("ml", MlflowSink(tracking_uri=url), SinkPolicy(max_retries=2, retry_backoff=0.01, batch_delay=0))
    with caplog.at_level(logging.INFO, logger="expbus"):
        bus.open()
        for step in range(10):
            bus.publish(Metrics(time=now(), step=step, values={"loss": 1.0 / (step + 1)}))
        bus.close(30)
    health = bus.stats()["ml"]
    assert (health.delivered, health.failed, health.dropped) == (0, 10, 0), health
    batches = health.retries // 2
    assert batches >= 1 and health.retries == 2 * batches and health.errors == 3 * batches, health
    assert url in (health.last_error or "")
    errors = [r.getMessage() for r in caplog.records if r.name == "expbus.bus" and r.levelno == logging.ERROR]
    assert errors and errors[0].startswith("expbus sink 'ml': write failed") and url in errors[0], errors
    summary = [r for r in caplog.records if r.name == "expbus.bus" and "bus closed" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert "ml: closed delivered=0 dropped=0 failed=10 " in summary[0].getMessage()
    assert len([e for e in read_journal(tmp_path) if isinstance(e, Metrics)]) == 10


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mlflow_server_killed_and_restarted_mid_run(tmp_path: Path, make_trainer: Any, faults: Any,
                                                    mlflow_server_type: Any, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)  # the sink's own fail-fast settings apply
    calls = LogBatchCalls(monkeypatch)
    run_dir = tmp_path / "run"
    with mlflow_server_type(tmp_path / "server") as server:
        config = {"run_dir": str(run_dir), "bus": {"close_timeout": 60},
                  # workers: thread, because the test's spy on log_batch lives in this process.
                  "sinks": {"ml": {"type": "mlflow", "tracking_uri": server.url, "experiment_name": "outage",
                                   "retry_backoff_max": RETRY_BACKOFF_MAX, "workers": "thread"}}}
        bridge = BridgeCallback(config)
        clock = faults.StepClock()
        outage = Outage(server, calls)
        trainer = make_trainer([bridge, clock, outage], max_steps=20_000)
        with caplog.at_level(logging.INFO, logger="expbus"):
            trainer.fit(faults.FaultModel(step_sleep=STEP_SLEEP), train_dataloaders=faults.fault_data())
        outage.join()

        # Training never waited on the server: step times during the outage (the restart
        # included) are those of before it, within a generous ratio.
        before = clock.durations(clock.steps[20][0], outage.killed_at)
        during = clock.durations(outage.killed_at, outage.up_at)
        assert len(before) >= 50 and len(during) >= 100, (len(before), len(during))
        ratio = statistics.median(during) / statistics.median(before)
        assert ratio < 3.0, (ratio, statistics.median(before), statistics.median(during))

        # The journal has every metric at every step of the run.
        journal = read_journal(run_dir)
        steps = trainer.global_step
        faults.check_training_logged_every_step(journal, steps)

        # Afterwards every metric of every step is in MLflow (read back from the restarted
        # server, whose SQLite store the killed one wrote), none duplicated.
        client = MlflowClient(server.url)
        run_id = json.loads((run_dir / ".expbus" / "sinks" / "ml.json").read_text())["run_id"]
        run = client.get_run(run_id)
        stored = [(key, m.step, m.value, m.timestamp)
                  for key in run.data.metrics for m in client.get_metric_history(run_id, key)]
        expected = []
        for event in journal:
            if isinstance(event, Metrics):
                values = {sanitize_name(k): float(v) for k, v in event.values.items()}
                values.setdefault("epoch", float(event.epoch or 0))
                expected += [(key, event.step, value, int(event.time * 1000)) for key, value in values.items()]
        assert len(set(stored)) == len(stored), [p for p, n in Counter(stored).items() if n > 1][:5]
        assert Counter(stored) == Counter(expected)
        assert len(stored) == 3 * steps
        assert run.info.status == "FINISHED"

    # The sink's health: retried, nothing failed or dropped, everything delivered.
    health = bridge.last_stats["ml"]
    assert bridge.last_close_ok is True
    assert (health.state, health.delivered, health.dropped, health.failed) == ("closed", len(journal), 0, 0), health
    assert health.retries >= 5 and health.errors == health.retries, health

    # Each attempt failed fast (no client-side retries stalling the sink's thread), and the
    # attempts followed the bus's capped exponential backoff: the k-th delay is
    # min(0.5 s * 2**k, 4 s) with jitter 0.5-1x (plus a generous margin for a loaded machine).
    failed = [(s, e) for s, e, ok, _n in calls.calls if not ok]
    assert len(failed) == health.retries
    assert all(e - s < 5.0 for s, e in failed), failed
    assert all(outage.killed_at - 1.0 <= s <= outage.up_at for s, _e in failed), (failed, outage.killed_at)
    recovered = min(s for s, _e, ok, _n in calls.calls if ok and s > failed[-1][1])
    starts = [s for s, _e in failed[1:]] + [recovered]
    for k, (start, (_s, end)) in enumerate(zip(starts, failed, strict=True)):
        nominal = min(RETRY_BACKOFF * 2**k, RETRY_BACKOFF_MAX)
        assert 0.5 * nominal - 0.01 <= start - end <= nominal + 2.0, (k, start - end, nominal)
    # The cap was reached and held: the last delays are at most the cap.
    assert len(failed) >= 5
    # Back within one capped delay of the server answering again.
    assert recovered - outage.up_at <= RETRY_BACKOFF_MAX + 2.0, recovered - outage.up_at

    # The first failure was logged once, naming the sink and the server.
    errors = [r.getMessage() for r in caplog.records if r.name == "expbus.bus" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("expbus sink 'ml': write failed"), errors
    assert f"mlflow log_batch at {server.url} failed" in errors[0]

    print(f"\noutage figures: steps={steps} before={len(before)} during={len(during)} ratio={ratio:.2f} "
          f"median_before={statistics.median(before) * 1000:.1f}ms median_during={statistics.median(during) * 1000:.1f}ms "
          f"retries={health.retries} delivered={health.delivered} points={len(stored)} "
          f"restart={outage.restart_seconds:.1f}s recovered_after_up={recovered - outage.up_at:.2f}s "
          f"delays={[round(s - e, 2) for s, (_x, e) in zip(starts, failed, strict=True)]}")
