"""Tests of the mlflow sink, read back with MLflow's own client from a SQLite store and from a real ``mlflow server``."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from expbus.bus import (
    Bus,
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    SinkContext,
    SinkPolicy,
    Text,
    Timing,
    TransientSinkError,
)
from expbus.sinks import ConfigError, create_sink, load_config
from expbus.sinks.contract import SinkContract
from expbus.sinks.mlflow import MlflowSink, is_transient_error, sanitize_name

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric  # noqa: E402
from mlflow.exceptions import MlflowException, RestException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.validation import _validate_metric_name, _validate_param_name  # noqa: E402

MAX = 1.7976931348623157e308  # what MLflow's database stores keep of +inf
NAN = float("nan")
INF = float("inf")
T0 = 1_700_000_000.0


# -- helpers ------------------------------------------------------------------------------
def context(run_dir: Path, sink_id: str = "ml") -> SinkContext:
    return SinkContext(sink_id=sink_id, run_dir=run_dir, run_id="expbus-run")


def run_id_of(run_dir: Path, sink_id: str = "ml") -> str:
    """The MLflow run id the sink kept in the run directory."""
    return str(json.loads((run_dir / ".expbus" / "sinks" / f"{sink_id}.json").read_text())["run_id"])


def histories(uri: str, run_id: str) -> dict[str, list[Metric]]:
    """Every metric's full history, read with MLflow's own client."""
    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {key: client.get_metric_history(run_id, key) for key in sorted(keys)}


def points(uri: str, run_id: str, *, skip: Sequence[str] = ("epoch",)) -> list[tuple[int, dict[str, float]]]:
    """The stored metric points as ``(step, {name: value})``, ordered by step."""
    by_step: dict[int, dict[str, float]] = {}
    for key, history in histories(uri, run_id).items():
        if key in skip:
            continue
        for metric in history:
            by_step.setdefault(metric.step, {})[key] = metric.value
    return sorted(by_step.items())


def comparable(value: float) -> Any:
    """NaN compares equal to NaN; infinities as MLflow's SQL stores keep them."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return MAX if value > 0 else -MAX
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LogBatchSpy:
    """Wraps the real ``MlflowClient.log_batch``: records every request, and can fail chosen calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: Callable[[int], BaseException | None] | None = None):
        self.calls: list[tuple[int, int, int]] = []
        self.failed: list[int] = []
        real = MlflowClient.log_batch
        spy = self

        def log_batch(client: Any, run_id: str, metrics: Sequence[Any] = (), params: Sequence[Any] = (),
                      tags: Sequence[Any] = (), **kwargs: Any) -> Any:
            index = len(spy.calls) + len(spy.failed)
            error = fail(index) if fail is not None else None
            if error is not None:
                spy.failed.append(index)
                raise error
            spy.calls.append((len(metrics), len(params), len(tags)))
            return real(client, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)

    @property
    def metric_requests(self) -> list[int]:
        return [m for m, _p, _t in self.calls if m]


def connection_refused() -> MlflowException:
    """What MLflow raises when its server is down: an MlflowException over ConnectionRefusedError."""
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            raise MlflowException(f"API request to http://127.0.0.1:1/api failed with exception {exc}") from exc
    except MlflowException as wrapped:
        return wrapped


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking database for the module (creating MLflow's schema takes about a second)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-store') / 'mlflow.db'}"


def full_run_events(checkpoint: Path, steps: int = 40) -> list[Event]:
    events: list[Event] = [
        RunStarted(time=T0, run_id="expbus-run", host="h", pid=1),
        Hyperparams(time=T0 + 0.1, params={
            "optim": {"lr": 0.001, "betas": [0.9, 0.999], "sched": {"name": "cosine", "warmup": 10}},
            "model": {"layers": [{"width": 64}, {"width": 32}], "act": "gelu", "dropout": None},
            "seed": 7,
            "amp": True,
        }),
    ]
    for step in range(steps):
        values = {
            "train_loss": 1.0 / (step + 1),
            "lr": 0.001 * 0.99**step,
            "grad_norm": NAN if step == 5 else (INF if step == 6 else -INF if step == 7 else float(step)),
        }
        events.append(Metrics(time=T0 + 1 + step, step=step, values=values, epoch=step // 10))
        if step % 10 == 9:
            events.append(Metrics(time=T0 + 1.5 + step, step=step, values={"val/loss": 0.5 / (step + 1),
                                                                           "val@acc": step / 100}, epoch=step // 10))
        if step == 20:
            events.append(Text(time=T0 + 1.6 + step, step=step, name="note", text="half way"))
            events.append(Timing(time=T0 + 1.7 + step, step=step, durations={"train_step_timing": 0.1}))
            events.append(CheckpointSaved(time=T0 + 1.8 + step, path=str(checkpoint), step=step, epoch=2,
                                          monitor="val/loss", monitor_value=0.25, is_best=True,
                                          size_bytes=checkpoint.stat().st_size))
    events.append(RunFinished(time=T0 + 100, status="completed", step=steps - 1))
    return events


def expected_points(events: Sequence[Event]) -> dict[str, list[tuple[int, Any, int]]]:
    """(step, value, timestamp ms) of every metric, renamed as the sink renames, epoch added as Lightning does."""
    expected: dict[str, list[tuple[int, Any, int]]] = {}
    for event in events:
        if isinstance(event, Metrics):
            values: dict[str, float] = dict(event.values)
            if event.epoch is not None:
                values.setdefault("epoch", event.epoch)
            for name, value in values.items():
                expected.setdefault(sanitize_name(name), []).append(
                    (event.step, comparable(value), int(event.time * 1000)))
    return expected


def check_full_run(uri: str, run_id: str, events: Sequence[Event], checkpoint: Path, tmp_path: Path) -> None:
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    # Every metric at every step, with the event's time as its timestamp.
    stored = {key: sorted((m.step, comparable(m.value), m.timestamp) for m in history)
              for key, history in histories(uri, run_id).items()}
    assert stored == {key: sorted(rows) for key, rows in expected_points(events).items()}
    assert set(stored) == {"train_loss", "lr", "grad_norm", "val/loss", "val_acc", "epoch"}
    assert [v for s, v, _t in stored["grad_norm"] if s in (5, 6, 7)] == ["nan", MAX, -MAX]
    # Hyperparameters, flattened as Lightning flattens them.
    assert run.data.params == {
        "optim/lr": "0.001", "optim/betas": "[0.9, 0.999]", "optim/sched/name": "cosine",
        "optim/sched/warmup": "10", "model/layers/0/width": "64", "model/layers/1/width": "32",
        "model/act": "gelu", "model/dropout": "None", "seed": "7", "amp": "True",
    }
    assert run.info.status == "FINISHED"
    assert run.info.end_time == int((T0 + 100) * 1000)
    assert run.info.run_name == "version_0"
    assert run.data.tags["mlflow.runName"] == "version_0"
    assert run.data.tags["expbus.run_id"] == "expbus-run"
    assert run.data.tags["team"] == "vision"
    assert client.get_experiment(run.info.experiment_id).name == "my_experiment"
    # The checkpoint, as Lightning uploads it: <stem>/<file>, metadata.yaml, aliases.txt.
    listed = sorted(info.path for info in client.list_artifacts(run_id, checkpoint.stem))
    assert listed == [f"{checkpoint.stem}/aliases.txt", f"{checkpoint.stem}/{checkpoint.name}",
                      f"{checkpoint.stem}/metadata.yaml"]
    downloaded = Path(client.download_artifacts(run_id, checkpoint.stem, str(tmp_path / "download")))
    assert (downloaded / checkpoint.name).read_bytes() == checkpoint.read_bytes()
    assert (downloaded / "aliases.txt").read_text() == "['latest', 'best']"
    metadata = yaml.safe_load((downloaded / "metadata.yaml").read_text())
    assert metadata == {"score": 0.25, "original_filename": checkpoint.name, "Checkpoint": {"monitor": "val/loss"},
                        "step": 20, "epoch": 2}


def run_full(tmp_path: Path, uri: str) -> tuple[Path, Path, list[Event], Bus]:
    run_dir = tmp_path / "exp" / "my_experiment" / "version_0"
    run_dir.mkdir(parents=True)
    checkpoint = run_dir / "checkpoints" / "epoch=2-step=20.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(os.urandom(4096))
    events = full_run_events(checkpoint)
    sink = MlflowSink(tracking_uri=uri, log_model="all", tags={"team": "vision"})
    with Bus(run_dir, run_id="expbus-run", sinks={"ml": sink}) as bus:
        for event in events:
            bus.publish(event)
    health = bus.stats()["ml"]
    assert (health.state, health.delivered, health.errors, health.dropped) == ("closed", len(events), 0, 0)
    return run_dir, checkpoint, events, bus


# -- the contract -------------------------------------------------------------------------
class TestMlflowContract(SinkContract):
    @pytest.fixture(autouse=True)
    def _store(self, store_uri: str) -> None:
        self.uri = store_uri

    def make_sink(self, run_dir: Path) -> MlflowSink:
        return MlflowSink(tracking_uri=self.uri, experiment_name="contract")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        # The sink also logs ``epoch`` (as Lightning does); the contract's events never log it.
        return points(self.uri, run_id_of(run_dir, "contract"))


# -- a whole run --------------------------------------------------------------------------
def test_full_run_on_sqlite(tmp_path: Path, store_uri: str) -> None:
    run_dir, checkpoint, events, _bus = run_full(tmp_path, store_uri)
    check_full_run(store_uri, run_id_of(run_dir), events, checkpoint, tmp_path)


def test_default_store_is_sqlite_in_exp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "nemo_experiments" / "gpt" / "2024-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    sink = MlflowSink()
    with Bus(run_dir, sinks={"ml": sink}) as bus:
        bus.publish(Metrics(time=T0, step=0, values={"loss": 1.0}))
    db = tmp_path / "nemo_experiments" / "mlflow.db"
    assert sink.resolved_uri == f"sqlite:///{db}" and db.is_file()
    run = MlflowClient(sink.resolved_uri).get_run(run_id_of(run_dir))
    assert run.info.run_name == "2024-01-01_00-00-00"
    assert MlflowClient(sink.resolved_uri).get_experiment(run.info.experiment_id).name == "gpt"
    # A new experiment's artifacts go beside the database, not into ./mlruns of the cwd.
    assert run.info.artifact_uri == (tmp_path / "nemo_experiments" / "mlartifacts").as_uri() + \
        f"/{run.info.run_id}/artifacts"
    assert bus.stats()["ml"].errors == 0


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "exp" / "name" / "v"
    ctx = context(run_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert MlflowSink(tracking_uri="sqlite:////x/m.db", save_dir="s")._resolve_uri(ctx) == "sqlite:////x/m.db"
    # As in Lightning, the environment variable counts as a tracking_uri and wins over save_dir.
    assert MlflowSink(save_dir="s")._resolve_uri(ctx) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert MlflowSink(save_dir="s")._resolve_uri(ctx) == f"sqlite:///{run_dir.absolute() / 's' / 'mlflow.db'}"
    assert MlflowSink(save_dir=str(tmp_path / "abs"))._resolve_uri(ctx) == f"sqlite:///{tmp_path / 'abs' / 'mlflow.db'}"
    assert MlflowSink()._resolve_uri(ctx) == f"sqlite:///{(tmp_path / 'exp').absolute() / 'mlflow.db'}"


def test_file_store_needs_mlflows_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from expbus.bus import SinkOpenError

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    bus = Bus(tmp_path / "refused", journal=False, sinks={"ml": MlflowSink(tracking_uri=uri)})
    with pytest.raises(SinkOpenError, match="MLFLOW_ALLOW_FILE_STORE"):
        bus.open()
    bus.close()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "allowed"
    with Bus(run_dir, sinks={"ml": MlflowSink(tracking_uri=uri)}) as bus:
        bus.publish(Metrics(time=T0, step=0, values={"x": NAN, "y": INF}))
    run_id = run_id_of(run_dir)
    assert {k: [(m.step, comparable(m.value) if k == "x" else m.value) for m in v]
            for k, v in histories(uri, run_id).items()} == {"x": [(0, "nan")], "y": [(0, INF)]}


def test_params_match_lightnings_mlflow_logger(tmp_path: Path, store_uri: str) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    params = {"optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "layers": [{"w": 1}, {"w": 2}], "name": "x",
              "empty": [], "none": None, "flag": False}
    theirs = loggers.MLFlowLogger(experiment_name="lightning", tracking_uri=store_uri)
    theirs.log_hyperparams(params)
    run_dir = tmp_path / "run"
    sink = MlflowSink(tracking_uri=store_uri, experiment_name="ours")
    sink.open(context(run_dir))
    sink.write([Hyperparams(time=T0, params=params)])
    sink.close()
    client = MlflowClient(store_uri)
    assert client.get_run(run_id_of(run_dir)).data.params == client.get_run(theirs.run_id).data.params


def test_long_param_value_is_cut_with_a_warning(tmp_path: Path, store_uri: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    sink = MlflowSink(tracking_uri=store_uri, experiment_name="params")
    sink.open(context(tmp_path))
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.mlflow"):
        sink.write([Hyperparams(time=T0, params={"prompt": "x" * (MAX_PARAM_VAL_LENGTH + 10), "short": "y"})])
    sink.close()
    params = MlflowClient(store_uri).get_run(run_id_of(tmp_path)).data.params
    assert params == {"prompt": "x" * MAX_PARAM_VAL_LENGTH, "short": "y"}
    assert f"cut to MLflow's limit of {MAX_PARAM_VAL_LENGTH}" in caplog.text


def test_log_model_true_uploads_the_kept_checkpoints_at_the_end(tmp_path: Path, store_uri: str) -> None:
    run_dir = tmp_path / "exp" / "ckpts" / "v"
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    files = {name: ckpt_dir / name for name in ("a.ckpt", "b.ckpt", "c.ckpt", "last.ckpt")}
    for path in files.values():
        path.write_bytes(path.name.encode())

    def saved(name: str, step: int, **kw: Any) -> CheckpointSaved:
        return CheckpointSaved(time=T0 + step, path=str(files[name]), step=step, **kw)

    sink = MlflowSink(tracking_uri=store_uri, log_model=True)
    with Bus(run_dir, sinks={"ml": sink}) as bus:
        bus.publish(saved("a.ckpt", 1))
        bus.publish(saved("last.ckpt", 1, is_last=True))
        bus.publish(saved("b.ckpt", 2, is_best=True, monitor="loss", monitor_value=0.5))
        bus.publish(saved("c.ckpt", 3))
        files["c.ckpt"].unlink()  # top-k pruning
        bus.publish(CheckpointRemoved(time=T0 + 3.5, path=str(files["c.ckpt"]), step=3))
        files["last.ckpt"].write_bytes(b"last, rewritten")
        bus.publish(saved("last.ckpt", 3, is_last=True))
        assert bus.flush()
        client = MlflowClient(store_uri)
        run_id = run_id_of(run_dir)
        assert client.list_artifacts(run_id) == []  # nothing before the end, as Lightning
        bus.publish(RunFinished(time=T0 + 10, status="completed"))
    assert bus.stats()["ml"].errors == 0
    assert sorted(info.path for info in client.list_artifacts(run_id)) == ["a", "b", "last"]
    out = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert (out / "last" / "last.ckpt").read_bytes() == b"last, rewritten"
    assert (out / "b" / "aliases.txt").read_text() == "['latest', 'best']"
    assert (out / "a" / "aliases.txt").read_text() == "['latest']"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_log_model_true_without_run_finished_uploads_at_close(tmp_path: Path, store_uri: str) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"weights")
    sink = MlflowSink(tracking_uri=store_uri, experiment_name="no-finish", log_model=True)
    with Bus(tmp_path, sinks={"ml": sink}) as bus:
        bus.publish(CheckpointSaved(time=T0, path=str(ckpt), step=5, is_last=True))
    assert bus.stats()["ml"].errors == 0
    client = MlflowClient(store_uri)
    run = client.get_run(run_id_of(tmp_path))
    assert sorted(info.path for info in client.list_artifacts(run.info.run_id, "last")) == [
        "last/aliases.txt", "last/last.ckpt", "last/metadata.yaml"]
    assert run.info.status == "RUNNING"  # no RunFinished: MLflow shows it as it shows a crashed run


def test_log_model_false_uploads_nothing_and_statuses(tmp_path: Path, store_uri: str) -> None:
    client = MlflowClient(store_uri)
    for status, expected in (("failed", "FAILED"), ("interrupted", "KILLED"), ("completed", "FINISHED")):
        run_dir = tmp_path / status
        ckpt = run_dir / "x.ckpt"
        run_dir.mkdir()
        ckpt.write_bytes(b"x")
        sink = MlflowSink(tracking_uri=store_uri, experiment_name="statuses")
        with Bus(run_dir, sinks={"ml": sink}) as bus:
            bus.publish(CheckpointSaved(time=T0, path=str(ckpt), step=1))
            bus.publish(RunFinished(time=T0 + 1, status=status, error="boom" if status == "failed" else None))
        run = client.get_run(run_id_of(run_dir))
        assert run.info.status == expected
        assert client.list_artifacts(run.info.run_id) == []
        assert run.data.tags.get("expbus.error") == ("boom" if status == "failed" else None)


# -- resume -------------------------------------------------------------------------------
def test_resume_continues_the_same_run(tmp_path: Path, store_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "exp" / "resumed" / "v"
    run_dir.mkdir(parents=True)
    first = [Metrics(time=T0 + s, step=s, values={"loss": 1.0 / (s + 1)}) for s in range(10)]
    sink = MlflowSink(tracking_uri=store_uri, tags={"attempt": 1})
    with Bus(run_dir, sinks={"ml": sink}) as bus:
        bus.publish(Hyperparams(time=T0, params={"lr": 0.1, "bs": 8}))
        for event in first:
            bus.publish(event)
        bus.publish(RunFinished(time=T0 + 20, status="interrupted"))
    run_id = run_id_of(run_dir)
    client = MlflowClient(store_uri)
    assert client.get_run(run_id).info.status == "KILLED"

    # A second process on the same run directory: the same MLflow run, running again.
    second = MlflowSink(tracking_uri=store_uri, tags={"attempt": 2})
    second.open(context(run_dir))
    assert second.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(run_id).data.tags["attempt"] == "2"
    later = [Metrics(time=T0 + 30 + s, step=s, values={"loss": 0.01 * s}) for s in range(10, 20)]
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.mlflow"):
        # The same hyperparameters again are fine; a changed one keeps its first value.
        second.write([Hyperparams(time=T0 + 30, params={"lr": 0.5, "bs": 8, "new": 1})])
        # Replayed events (a journal replay after a crash) do not duplicate points.
        second.write(first[5:] + later)
        second.write([RunFinished(time=T0 + 50, status="completed")])
    second.close()
    assert "MLflow params cannot change" in caplog.text
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(20))
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "bs": "8", "new": "1"}
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_explicit_run_id_wins(tmp_path: Path, store_uri: str) -> None:
    client = MlflowClient(store_uri)
    experiment = client.get_experiment_by_name("explicit") or client.get_experiment(
        client.create_experiment("explicit"))
    existing = client.create_run(experiment.experiment_id).info.run_id
    # A run kept from before in the run directory loses against an explicit run_id.
    sink = MlflowSink(tracking_uri=store_uri)
    sink.open(context(tmp_path))
    sink.close()
    assert run_id_of(tmp_path) != existing
    sink = MlflowSink(tracking_uri=store_uri, run_id=existing)
    sink.open(context(tmp_path))
    sink.write([Metrics(time=T0, step=3, values={"x": 1.5})])
    sink.close()
    assert [(m.step, m.value) for m in client.get_metric_history(existing, "x")] == [(3, 1.5)]
    assert run_id_of(tmp_path) == existing


def test_a_new_tracking_uri_starts_a_new_run(tmp_path: Path, store_uri: str) -> None:
    sink = MlflowSink(tracking_uri=store_uri)
    sink.open(context(tmp_path))
    sink.close()
    first = run_id_of(tmp_path)
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    sink = MlflowSink(tracking_uri=other)
    sink.open(context(tmp_path))
    sink.close()
    assert run_id_of(tmp_path) != first
    assert MlflowClient(other).get_run(run_id_of(tmp_path)).info.status == "RUNNING"


# -- batching -----------------------------------------------------------------------------
def test_2500_values_in_one_bus_batch_take_3_requests(tmp_path: Path, store_uri: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spy = LogBatchSpy(monkeypatch)
    events = [Metrics(time=T0 + s, step=s, values={f"m{i}": s + i / 10 for i in range(10)}) for s in range(250)]
    sink = MlflowSink(tracking_uri=store_uri, sqlite_bulk_metrics=False, experiment_name="batching")
    writes: list[int] = []
    real_write = sink.write

    def counting_write(batch: Sequence[Event]) -> None:
        writes.append(len(batch))
        real_write(batch)

    sink.write = counting_write  # type: ignore[method-assign]
    # Everything queued before the flush reaches the sink as one batch.
    policy = SinkPolicy(batch_size=10_000, batch_delay=30)
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("ml", sink, policy)
    bus.open()
    for event in events:
        bus.publish(event)
    assert bus.flush(30)
    assert bus.close(30)
    assert writes == [250]
    assert spy.metric_requests == [1000, 1000, 500]  # ceil(2500 / 1000) requests
    stored = histories(store_uri, run_id_of(tmp_path))
    assert {k: len(v) for k, v in stored.items()} == {f"m{i}": 250 for i in range(10)}


def test_params_tags_and_metrics_share_requests(tmp_path: Path, store_uri: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sink = MlflowSink(tracking_uri=store_uri, sqlite_bulk_metrics=False, experiment_name="batching")
    sink.open(context(tmp_path))
    spy = LogBatchSpy(monkeypatch)
    batch: list[Event] = [Hyperparams(time=T0, params={f"p{i}": i for i in range(150)})]
    batch += [Metrics(time=T0 + s, step=s, values={"a": 1.0 * s, "b": 2.0 * s}) for s in range(1250)]
    sink.write(batch)
    sink.close()
    # 150 params (at most 100 a request) and 2500 metrics (at most 1000 entities a request).
    assert spy.calls == [(900, 100, 0), (950, 50, 0), (650, 0, 0)]
    run = MlflowClient(store_uri).get_run(run_id_of(tmp_path))
    assert len(run.data.params) == 150
    assert len(MlflowClient(store_uri).get_metric_history(run.info.run_id, "b")) == 1250


def test_large_param_values_split_by_request_size(tmp_path: Path, store_uri: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sink = MlflowSink(tracking_uri=store_uri, sqlite_bulk_metrics=False, experiment_name="batching")
    sink.open(context(tmp_path))
    spy = LogBatchSpy(monkeypatch)
    # 100 params of 2000 "é": 1.2 MB of JSON (escaped as \u00e9), over MLflow's 1 MB a request.
    params = {f"p{i}": "é" * 2000 for i in range(100)}
    sink.write([Hyperparams(time=T0, params=params)])
    assert len(spy.calls) == 2 and sum(p for _m, p, _t in spy.calls) == 100
    sink.write([RunFinished(time=T0, status="failed", error="e" * 9000)])
    sink.close()
    run = MlflowClient(store_uri).get_run(run_id_of(tmp_path))
    assert run.data.params == params
    assert run.data.tags["expbus.error"] == "e" * 8000  # MLflow's tag value limit


# -- failures -----------------------------------------------------------------------------
def test_transient_failure_mid_batch_resumes_without_resending(tmp_path: Path, store_uri: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spy = LogBatchSpy(monkeypatch, fail=lambda i: connection_refused() if i == 1 else None)
    events = [Metrics(time=T0 + s, step=s, values={f"m{i}": float(s) for i in range(10)}) for s in range(250)]
    sink = MlflowSink(tracking_uri=store_uri, sqlite_bulk_metrics=False, experiment_name="retry")
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("ml", sink, SinkPolicy(batch_size=10_000, batch_delay=30, retry_backoff=0.01))
    bus.open()
    for event in events:
        bus.publish(event)
    assert bus.flush(30)
    assert bus.close(30)
    health = bus.stats()["ml"]
    assert (health.retries, health.errors, health.failed, health.delivered) == (1, 1, 0, 250)
    assert "TransientSinkError" in (health.last_error or "")
    # Request 0 succeeded, request 1 failed; the retry sent 1 and 2 only.
    assert spy.failed == [1] and spy.metric_requests == [1000, 1000, 500]
    assert all(len(h) == 250 for h in histories(store_uri, run_id_of(tmp_path)).values())


def test_unreachable_server_is_transient_and_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    sink = MlflowSink(tracking_uri=uri)
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.mlflow"):
        sink.open(context(tmp_path))  # does not fail: the run is set up at the first write
    assert "is not reachable" in caplog.text
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20"
    start = time.monotonic()
    with pytest.raises(TransientSinkError, match=re.escape("127.0.0.1")):
        sink.write([Metrics(time=T0, step=0, values={"x": 1.0})])
    assert time.monotonic() - start < 5  # no long internal backoff of the client
    sink.close()

    # Through the bus: retried with backoff, counted, the sink stays open.
    bus = Bus(tmp_path / "bus", journal=False)
    bus.add_sink("ml", MlflowSink(tracking_uri=uri), SinkPolicy(max_retries=2, retry_backoff=0.01, batch_delay=0))
    bus.open()
    bus.publish(Metrics(time=T0, step=0, values={"x": 1.0}))
    bus.flush(30)
    health = bus.stats()["ml"]
    assert (health.retries, health.errors, health.failed, health.state) == (2, 3, 1, "open")
    assert bus.close(30)


def test_server_answering_503_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "maintenance"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sink = MlflowSink(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}")
        sink.open(context(tmp_path))
        start = time.monotonic()
        with pytest.raises(TransientSinkError):
            sink.write([Metrics(time=T0, step=0, values={"x": 1.0})])
        assert time.monotonic() - start < 5
        sink.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_user_http_settings_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    sink = MlflowSink(tracking_uri=f"http://127.0.0.1:{free_port()}")
    sink.open(context(tmp_path))
    sink.close()
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("3", "5")


def test_non_transient_failure_still_delivers_the_rest(tmp_path: Path, store_uri: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rejected = MlflowException("bad request", error_code="INVALID_PARAMETER_VALUE")
    spy = LogBatchSpy(monkeypatch, fail=lambda i: rejected if i == 0 else None)
    sink = MlflowSink(tracking_uri=store_uri, sqlite_bulk_metrics=False, experiment_name="rejected")
    sink.open(context(tmp_path))
    with pytest.raises(MlflowException, match="bad request"):
        sink.write([Metrics(time=T0, step=0, values={"x": 1.0}), RunFinished(time=T0 + 1, status="completed")])
    sink.close()
    assert spy.failed == [0]
    assert MlflowClient(store_uri).get_run(run_id_of(tmp_path)).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (connection_refused(), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}), True),
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}), True),
        (MlflowException("nope", error_code="INVALID_PARAMETER_VALUE"), False),
        (MlflowException("missing", error_code="RESOURCE_DOES_NOT_EXIST"), False),
        (ValueError("x"), False),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient_error(exc) is transient


def test_locked_sqlite_is_transient() -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    locked = sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database is locked"))
    try:
        try:
            raise locked
        except Exception as exc:
            raise MlflowException(exc, error_code="INTERNAL_ERROR")  # noqa: B904 - MLflow's own pattern
    except MlflowException as wrapped:
        assert is_transient_error(wrapped)
    assert not is_transient_error(sqlalchemy.exc.OperationalError("SELECT", {}, Exception("no such table")))


# -- names --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("train_loss", "train_loss"),
        ("val/loss", "val/loss"),
        ("val@acc", "val_acc"),
        ("a:b", "a_b"),
        ("loss (x) [y]", "loss _x_ _y_"),
        ("/abs//path/", "abs/path"),
        ("a/./b/../c", "a/_/b/__/c"),
        ("..", "__"),
        ("", "_"),
        ("@@@", "___"),
        ("Ωmega-1.5", "Ωmega-1.5"),
        ("x" * 300, "x" * 250),
    ],
)
def test_sanitize_name(name: str, stored: str) -> None:
    assert sanitize_name(name) == stored
    # MLflow's own validators accept every result.
    _validate_metric_name(stored)
    _validate_param_name(stored)


def test_renamed_metrics_and_prefix(tmp_path: Path, store_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    sink = MlflowSink(tracking_uri=store_uri, experiment_name="names", prefix="fit")
    sink.open(context(tmp_path))
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.mlflow"):
        sink.write([Metrics(time=T0 + s, step=s, values={"loss": 1.0, "top@1": 0.5}, epoch=0) for s in range(3)])
    sink.close()
    stored = histories(store_uri, run_id_of(tmp_path))
    assert sorted(stored) == ["fit-epoch", "fit-loss", "fit-top_1"]
    assert caplog.text.count("'fit-top@1' is logged as 'fit-top_1'") == 1  # once per name


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"log_model": "best"}, "sinks.x.log_model"),
        ({"tags": "team=vision"}, "sinks.x.tags"),
        ({"prefix": 3}, "sinks.x.prefix: Expected `str`"),
        ({"run_id": ["a"]}, "sinks.x.run_id"),
        ({"experiment_name": ""}, "experiment_name must be a non-empty string"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    spec = {"type": "mlflow", **options}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config({"sinks": {"x": spec}})
        create_sink("x", spec)


def test_options_from_yaml() -> None:
    spec = {"type": "mlflow", "experiment_name": "exp", "run_name": "r", "tracking_uri": "sqlite:////tmp/m.db",
            "tags": {"a": 1}, "save_dir": "./mlruns", "log_model": "all", "prefix": "p",
            "artifact_location": "/tmp/art", "run_id": None, "synchronous": True, "registry_uri": "sqlite:////tmp/r.db"}
    load_config({"sinks": {"ml": spec}})
    sink, _policy = create_sink("ml", spec)
    assert isinstance(sink, MlflowSink)
    assert (sink.experiment_name, sink.run_name, sink.log_model, sink.prefix, sink.tags) == ("exp", "r", "all", "p",
                                                                                           {"a": 1})
    assert sink.client_kwargs == {"registry_uri": "sqlite:////tmp/r.db"}
    assert MlflowSink().log_model is False and MlflowSink().prefix == ""


# -- a real tracking server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, mlflow_server_type: type[Any]) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts; stopped at teardown."""
    with mlflow_server_type(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.url


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_full_run_against_a_real_server(tmp_path: Path, mlflow_server: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    run_dir, checkpoint, events, _bus = run_full(tmp_path, mlflow_server)
    check_full_run(mlflow_server, run_id_of(run_dir), events, checkpoint, tmp_path)
    # The artifact went through the server's proxy into its artifacts destination.
    run = MlflowClient(mlflow_server).get_run(run_id_of(run_dir))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_resume_and_batching_against_a_real_server(tmp_path: Path, mlflow_server: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    spy = LogBatchSpy(monkeypatch)
    events = [Metrics(time=T0 + s, step=s, values={f"m{i}": s * 0.5 + i for i in range(10)}) for s in range(250)]
    sink = MlflowSink(tracking_uri=mlflow_server, experiment_name="server-batching")
    sink.open(context(tmp_path))
    sink.write(events[:200])
    sink.close()
    again = MlflowSink(tracking_uri=mlflow_server, experiment_name="server-batching")
    again.open(context(tmp_path))
    again.write(events[150:])  # 50 replayed, 50 new
    again.close()
    assert again.run_id == sink.run_id
    assert spy.metric_requests == [1000, 1000, 1000]
    # Over 1 MB of params: the server would reject it as one request.
    params = {f"p{i}": "é" * 2000 for i in range(100)}
    again = MlflowSink(tracking_uri=mlflow_server, experiment_name="server-batching")
    again.open(context(tmp_path))
    again.write([Hyperparams(time=T0, params=params)])
    again.close()
    assert MlflowClient(mlflow_server).get_run(run_id_of(tmp_path)).data.params == params
    stored = histories(mlflow_server, run_id_of(tmp_path))
    assert {k: sorted(m.step for m in v) for k, v in stored.items()} == {f"m{i}": list(range(250)) for i in range(10)}


# -- SQLite: metric points written in bulk -------------------------------------------------
def bulk_events() -> list[Event]:
    """Points the two write paths must store alike: NaN, infinities, steps out of order, ties."""
    events: list[Event] = []
    for step in range(30):
        values = {"loss": 1.0 / (step + 1), "odd": NAN if step % 7 == 3 else (INF if step == 11 else -INF if step == 12
                                                                             else float(step)),
                  "flat": 0.5}
        events.append(Metrics(time=T0 + step, step=step, values=values, epoch=step // 10))
    # A late point at an earlier step (latest_metrics orders by step first), and a point at
    # the last step with an earlier time and a larger value (then by time, then by value).
    events.append(Metrics(time=T0 + 100, step=3, values={"loss": 9.0}))
    events.append(Metrics(time=T0 + 28.5, step=29, values={"flat": 7.0}))
    return events


def stored_run(uri: str, run_id: str) -> tuple[dict[str, list[tuple[int, int, Any]]], dict[str, Any]]:
    """Every history as (step, timestamp, value) and the run's latest metrics, NaN made comparable."""
    client = MlflowClient(uri)
    latest = {key: comparable(value) for key, value in client.get_run(run_id).data.metrics.items()}
    stored = {key: sorted((m.step, m.timestamp, comparable(m.value)) for m in history)
              for key, history in histories(uri, run_id).items()}
    return stored, latest


def write_through(run_dir: Path, uri: str, events: Sequence[Event], *, bulk: bool, times: int = 1) -> str:
    sink = MlflowSink(tracking_uri=uri, experiment_name="bulk", sqlite_bulk_metrics=bulk)
    sink.open(context(run_dir))
    for _ in range(times):
        sink.write(events)
    sink.close()
    return run_id_of(run_dir)


def test_sqlite_bulk_metrics_store_exactly_what_log_batch_stores(tmp_path: Path, store_uri: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spy = LogBatchSpy(monkeypatch)
    events = bulk_events()
    # The bulk path gets every batch twice (a replay): MLflow keeps one point of each.
    bulk_run = write_through(tmp_path / "bulk", store_uri, events, bulk=True, times=2)
    assert spy.metric_requests == []  # no metric went through log_batch
    plain_run = write_through(tmp_path / "plain", store_uri, events, bulk=False)
    assert spy.metric_requests == [len([1 for e in events if isinstance(e, Metrics)
                                        for _ in [*e.values, *(["epoch"] if e.epoch is not None else [])]])]
    bulk, plain = stored_run(store_uri, bulk_run), stored_run(store_uri, plain_run)
    assert bulk == plain
    histories_, latest = bulk
    assert len(histories_["loss"]) == 31 and len(histories_["odd"]) == 30
    assert [v for s, _t, v in histories_["odd"] if s in (3, 11, 12)] == ["nan", MAX, -MAX]
    assert latest["loss"] == 1.0 / 30  # step 29 beats the later-written point at step 3
    assert latest["flat"] == 0.5  # same step: the later time wins over the larger value
    assert latest["odd"] == 29.0 and latest["epoch"] == 2


def test_sqlite_bulk_metrics_keep_params_tags_and_status(tmp_path: Path, store_uri: str) -> None:
    # Params and tags still go through log_batch, next to the bulk metric points.
    sink = MlflowSink(tracking_uri=store_uri, experiment_name="bulk-mixed")
    sink.open(context(tmp_path))
    sink.write([Hyperparams(time=T0, params={"lr": 0.1}), Metrics(time=T0 + 1, step=1, values={"loss": 0.5}),
                RunFinished(time=T0 + 2, status="failed", error="boom")])
    sink.close()
    run = MlflowClient(store_uri).get_run(run_id_of(tmp_path))
    assert run.data.params == {"lr": "0.1"}
    assert run.data.metrics == {"loss": 0.5}
    assert run.data.tags["expbus.error"] == "boom"
    assert run.info.status == "FAILED"


def test_sqlite_bulk_metrics_wait_out_a_lock_like_log_batch(tmp_path: Path, store_uri: str) -> None:
    import sqlite3
    import threading

    sink = MlflowSink(tracking_uri=store_uri, experiment_name="bulk-locked")
    sink.open(context(tmp_path))
    locker = sqlite3.connect(store_uri[len("sqlite:///"):], isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")  # another process writing to the same database
    release = threading.Timer(0.5, lambda: locker.execute("COMMIT"))
    release.start()
    try:
        sink.write([Metrics(time=T0, step=0, values={"loss": 0.25})])
    finally:
        release.join()
        locker.close()
    sink.close()
    assert points(store_uri, run_id_of(tmp_path)) == [(0, {"loss": 0.25})]


def test_sqlite_bulk_metrics_refuse_a_deleted_run(tmp_path: Path, store_uri: str) -> None:
    sink = MlflowSink(tracking_uri=store_uri, experiment_name="bulk-deleted")
    sink.open(context(tmp_path))
    MlflowClient(store_uri).delete_run(run_id_of(tmp_path))
    with pytest.raises(MlflowException, match="must be in the 'active' state") as caught:
        sink.write([Metrics(time=T0, step=0, values={"loss": 0.25})])
    assert not is_transient_error(caught.value)
    sink.close()


def test_sqlite_bulk_metrics_only_for_sqlite_stores_with_known_tables(store_uri: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from expbus.sinks import _mlflow_sql
    from expbus.sinks._mlflow_sql import SqliteMetricWriter

    assert SqliteMetricWriter.for_client(MlflowClient(store_uri)) is not None
    assert SqliteMetricWriter.for_client(object()) is None
    # Tables whose columns are not the ones the writer fills (another MLflow's schema): log_batch.
    monkeypatch.setattr(_mlflow_sql, "_COLUMNS", (*_mlflow_sql._COLUMNS, "dataset_uuid"))
    assert SqliteMetricWriter.for_client(MlflowClient(store_uri)) is None
