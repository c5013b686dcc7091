"""Tests of the clearml sink, read back from ClearML's offline session (the zip ``Task.import_offline_session`` uploads)."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from expbus.bus import (
    Bus,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    SinkContext,
    Text,
    Timing,
)
from expbus.sinks import ConfigError, create_sink, load_config
from expbus.sinks.clearml import ClearMLSink, OfflineSession, split_title_series
from expbus.sinks.clearml import read_offline_sessions as _read_sessions
from expbus.sinks.contract import SinkContract

clearml = pytest.importorskip("clearml")
from clearml import Task  # noqa: E402

# ClearML's vendored pyhocon calls pyparsing's pre-3.0 names: noise, not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:clearml"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pyparsing"),
]

NAN = float("nan")
T0 = 1_700_000_000.0


Session = OfflineSession


def only_session(run_dir: Path, cache_dir: str = "clearml") -> OfflineSession:
    sessions = _read_sessions(run_dir, cache_dir=cache_dir)
    assert len(sessions) == 1, [s.path for s in sessions]
    return sessions[0]


def points_by_step(session: OfflineSession) -> list[tuple[int, dict[str, float]]]:
    return session.points()


def context(run_dir: Path, sink_id: str = "cml") -> SinkContext:
    return SinkContext(sink_id=sink_id, run_dir=run_dir, run_id="expbus-run")


def state(run_dir: Path, sink_id: str = "cml") -> dict[str, Any]:
    return json.loads((run_dir / ".expbus" / "sinks" / f"{sink_id}.json").read_text())


@pytest.fixture(autouse=True)
def _clearml_offline_and_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline ClearML whose files stay in tmp_path (its session cache goes to ~/.clearml); no task left open."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    for name in ("CLEARML_API_HOST", "CLEARML_PROJECT", "CLEARML_TASK"):
        monkeypatch.delenv(name, raising=False)
    yield
    leftover = getattr(Task, "_Task__main_task", None)
    if leftover is not None:
        leftover.close()


# -- (1) the contract -------------------------------------------------------------------
class TestClearMLContract(SinkContract):
    def make_sink(self, run_dir: Path) -> ClearMLSink:
        return ClearMLSink(offline=True)

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        return points_by_step(only_session(run_dir))


# -- (2) a whole run through a real bus --------------------------------------------------
def run_events(ckpt: Path, last: Path) -> list[Event]:
    events: list[Event] = [
        RunStarted(time=T0, run_id="r", host="h", pid=1),
        Hyperparams(time=T0, params={
            "lr": 0.001,
            "model": {"hidden": 128, "layers": [64, 32], "act": "gelu", "dropout": None},
            "trainer": {"precision": "bf16", "devices": 1},
        }),
    ]
    for step in range(300):
        values = {"train/loss": 1.0 / (step + 1), "lr": 1e-3, "val/ds1/acc": step / 300}
        if step == 7:
            values["train/loss"] = NAN
        events.append(Metrics(time=T0 + step, step=step, values=values, epoch=step // 100))
        if step % 100 == 99:
            events.append(Timing(time=T0 + step, step=step, durations={"train_step_timing": 0.25}))
    events += [
        Text(time=T0 + 300, step=299, name="note", text="hello clearml"),
        CheckpointSaved(time=T0 + 301, path=str(ckpt), step=299, epoch=2, monitor="val/ds1/acc",
                        monitor_value=0.99, is_best=True),
        # Lightning's -last copy at the same step: the same weights, not uploaded again.
        CheckpointSaved(time=T0 + 302, path=str(last), step=299, epoch=2, is_last=True),
        RunFinished(time=T0 + 303, status="completed", step=299),
    ]
    return events


@pytest.mark.timeout(90)
def test_full_run_read_back_from_the_offline_session(tmp_path: Path) -> None:
    run_dir = tmp_path / "nemo_experiments" / "my_exp" / "2024-01-01_00-00-00"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt, last = run_dir / "checkpoints" / "epoch=2-step=299.ckpt", run_dir / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(os.urandom(5000))
    last.write_bytes(ckpt.read_bytes())
    sink = ClearMLSink(project="expbus-tests", tags=["t1"], log_model=True, log_cfg=True, log_metrics=True)
    events = run_events(ckpt, last)
    with Bus(run_dir, sinks={"cml": sink}) as bus:
        for event in events:
            bus.publish(event)
    health = bus.stats()["cml"]
    assert (health.state, health.delivered, health.errors, health.dropped) == ("closed", len(events), 0, 0)
    assert sink.is_offline  # nothing configured: an offline session

    session = only_session(run_dir)
    assert session.task["id"] == sink.task_id == state(run_dir)["task_id"]
    assert session.path == Path(f"{state(run_dir)['offline_folder']}.zip")
    # NeMo's naming: project, "Trainer <experiment>", the NeMo tag first.
    assert (session.task["project_name"], session.task["name"]) == ("expbus-tests", "Trainer my_exp")
    assert sorted(session.task["tags"]) == ["NeMo", "t1"]

    scalars = session.scalars()
    # Every finite metric at every step, as (title, series) ClearML's TensorBoard binding gives them.
    assert scalars[("train", "loss")] == [(s, 1.0 / (s + 1)) for s in range(300) if s != 7]
    assert scalars[("lr", "lr")] == [(s, 1e-3) for s in range(300)]
    assert scalars[("val_ds1", "acc")] == [(s, s / 300) for s in range(300)]
    assert scalars[("epoch", "epoch")] == [(s, float(s // 100)) for s in range(300)]
    assert scalars[("train_step_timing", "train_step_timing")] == [(99, 0.25), (199, 0.25), (299, 0.25)]
    assert set(scalars) == {("train", "loss"), ("lr", "lr"), ("val_ds1", "acc"), ("epoch", "epoch"),
                            ("train_step_timing", "train_step_timing")}
    # NaN is not reported at all (ClearML would have stored 0.0).
    assert (7, 0.0) not in scalars[("train", "loss")] and sink.nonfinite_skipped == 1

    assert session.hyperparams() == {
        "lr": "0.001", "model/hidden": "128", "model/layers": "[64, 32]", "model/act": "gelu",
        "model/dropout": "", "trainer/precision": "bf16", "trainer/devices": "1",
    }
    assert any("note (step 299): hello clearml" in str(entry.get("msg")) for entry in session.log)

    # One model upload for step 299 (the -last copy was not sent twice), its bytes in the session.
    models = session.task["offline_output_models"]
    assert len(models) == 1
    model = models[0]
    assert (model["init"]["name"], model["init"]["framework"], model["init"]["tags"]) == ("my_exp", "NeMo",
                                                                                          ["NeMo", "t1"])
    assert model["weights"]["iteration"] == 299
    assert model["init"]["config_dict"]["model"] == {"hidden": 128, "layers": [64, 32], "act": "gelu",
                                                     "dropout": None}
    assert session.files == {f"models/{ckpt.name}": ckpt.read_bytes()}


def test_failed_run_and_log_metrics_offline(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = run_dir / "a.ckpt"
    ckpt.write_bytes(b"w" * 100)
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.clearml"):
        with Bus(run_dir, sinks={"cml": ClearMLSink(log_model=True, log_metrics=True)}) as bus:
            for step in (1, 2):
                bus.publish(Metrics(time=T0, step=step, values={"loss": 0.5}))
                bus.publish(CheckpointSaved(time=T0, path=str(ckpt), step=step))
            bus.publish(RunFinished(time=T0, status="failed", error="RuntimeError: boom", step=2))
    assert bus.stats()["cml"].errors == 0
    # Model metadata is a server feature: said once, not per upload.
    assert caplog.text.count("log_metrics needs a ClearML server") == 1
    session = only_session(run_dir)
    assert [m["weights"]["iteration"] for m in session.task["offline_output_models"]] == [1, 2]
    assert session.scalars()[("loss", "loss")] == [(1, 0.5), (2, 0.5)]


def test_clearml_side_effects_stay_off(run_dir: Path) -> None:
    import psutil

    random.seed(12345)
    expected = random.random()
    random.seed(12345)
    stdout, stderr = sys.stdout, sys.stderr
    before = Task.__dict__.get("_report_subprocess_enabled")
    children = {p.pid for p in psutil.Process().children()}
    sink = ClearMLSink(offline=True)
    sink.open(context(run_dir))
    try:
        # Task.init would re-seed random/numpy/torch with 1337; the sink turned that off.
        assert random.random() == expected
        # ClearML's reporter runs in threads: no forked child process.
        assert {p.pid for p in psutil.Process().children()} - children == set()
        assert sys.stdout is stdout and sys.stderr is stderr
        assert not [t.name for t in __import__("threading").enumerate() if "resource" in t.name.lower()]
    finally:
        sink.close()
    assert Task.__dict__.get("_report_subprocess_enabled") == before
    assert getattr(Task, "_Task__main_task", None) is None
    # ClearML's last-task cache went to $HOME (here tmp_path/home), not elsewhere.
    assert (Path(os.environ["HOME"]) / ".clearml").is_dir()


def test_existing_task_is_used_and_left_open(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Task.set_offline(offline_mode=True)
    # The user's task, in reporter threads (ClearML's subprocess reporter takes ~10 s to close).
    monkeypatch.setattr(Task, "_report_subprocess_enabled", False, raising=False)
    owner = Task.init(project_name="user", task_name="own", reuse_last_task_id=False,
                      auto_connect_frameworks={"detect_repository": False, "tensorboard": False},
                      auto_connect_arg_parser=False, auto_resource_monitoring=False, auto_connect_streams=False)
    try:
        with Bus(run_dir, sinks={"cml": ClearMLSink()}) as bus:
            bus.publish(Metrics(time=T0, step=3, values={"loss": 0.25}))
        assert state(run_dir)["task_id"] == owner.id
        assert getattr(Task, "_Task__main_task", None) is owner  # still the user's, still open
    finally:
        owner.close()
    session = Session(Path(f"{owner.get_offline_mode_folder()}.zip"))
    assert session.scalars()[("loss", "loss")] == [(3, 0.25)]


@pytest.mark.timeout(30)
def test_close_is_bounded(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = ClearMLSink(offline=True, close_timeout=0.5)
    sink.open(context(run_dir))
    task = sink._task
    monkeypatch.setattr(task, "close", lambda: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not close"):
        sink.close()
    assert time.monotonic() - start < 5
    sink.close()  # idempotent
    monkeypatch.undo()
    task.close()


# -- (3) resume ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_resume_continues_the_same_task(run_dir: Path) -> None:
    with Bus(run_dir, run_id="r", sinks={"cml": ClearMLSink(log_model=True)}) as bus:
        for step in range(50):
            bus.publish(Metrics(time=T0 + step, step=step, values={"loss": float(step)}))
        (run_dir / "a.ckpt").write_bytes(b"a")
        bus.publish(CheckpointSaved(time=T0, path=str(run_dir / "a.ckpt"), step=49))
    first_id = state(run_dir)["task_id"]
    second = ClearMLSink(log_model=True)
    with Bus(run_dir, run_id="r", sinks={"cml": second}) as bus:
        for step in range(50, 100):
            bus.publish(Metrics(time=T0 + step, step=step, values={"loss": float(step)}))
        (run_dir / "b.ckpt").write_bytes(b"b")
        bus.publish(CheckpointSaved(time=T0, path=str(run_dir / "b.ckpt"), step=99))
    assert second.continued and second.task_id == first_id
    session = only_session(run_dir)  # still one session: the same task, continued
    assert session.task["id"] == first_id
    # Every step once, at its own iteration (no "last iteration + 1" offset).
    assert session.scalars()[("loss", "loss")] == [(s, float(s)) for s in range(100)]
    # The first session's model is still registered for the importer (ClearML alone would drop it).
    assert [m["weights"]["iteration"] for m in session.task["offline_output_models"]] == [49, 99]
    assert session.files == {"models/a.ckpt": b"a", "models/b.ckpt": b"b"}


def test_resume_in_another_mode_starts_a_new_task(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Bus(run_dir, sinks={"cml": ClearMLSink()}) as bus:
        bus.publish(Metrics(time=T0, step=1, values={"loss": 1.0}))
    first = state(run_dir)
    (run_dir / ".expbus" / "sinks" / "cml.json").write_text(json.dumps({**first, "offline": False}))
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.clearml"):
        with Bus(run_dir, sinks={"cml": ClearMLSink()}) as bus:
            bus.publish(Metrics(time=T0, step=2, values={"loss": 2.0}))
    assert "starts a new task" in caplog.text
    assert state(run_dir)["task_id"] != first["task_id"]


# -- mapping and options ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train/loss", ("train", "loss")),
        ("train_loss", ("train_loss", "train_loss")),
        ("val/ds1/acc", ("val_ds1", "acc")),
        ("/loss", ("/loss", "loss")),
        ("loss/", ("loss", "loss/")),
    ],
)
def test_split_title_series(name: str, expected: tuple[str, str]) -> None:
    assert split_title_series(name) == expected


def test_offline_unless_a_server_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    import clearml.backend_config.defs as defs

    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.setattr(defs, "get_active_config_file", lambda: None)
    assert ClearMLSink()._resolve_offline() is True
    monkeypatch.setenv("CLEARML_API_HOST", "http://127.0.0.1:8008")
    assert ClearMLSink()._resolve_offline() is False
    assert ClearMLSink(offline=True)._resolve_offline() is True
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    assert ClearMLSink()._resolve_offline() is True
    monkeypatch.delenv("CLEARML_API_HOST")
    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.setattr(defs, "get_active_config_file", lambda: "/home/u/clearml.conf")
    assert ClearMLSink()._resolve_offline() is False


# -- (5) options --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"log_model": "yes please"}, "sinks.x.log_model"),
        ({"tags": "one-tag"}, "sinks.x.tags"),
        ({"tags": [1, {"a": 2}]}, "sinks.x.tags"),
        ({"offline": "sometimes"}, "sinks.x.offline"),
        ({"close_timeout": "later"}, "sinks.x.close_timeout"),
        ({"project": ["a"]}, "sinks.x.project"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"sinks": {"x": {"type": "clearml", **options}}})


def test_non_positive_close_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="close_timeout"):
        create_sink("x", {"type": "clearml", "close_timeout": 0})


def test_options_from_yaml_nemo_style() -> None:
    # NeMo's ClearMLParams, verbatim, plus a Task.init keyword.
    spec = {"type": "clearml", "project": None, "task": None, "connect_pytorch": False, "model_name": None,
            "tags": None, "log_model": False, "log_cfg": False, "log_metrics": False, "task_type": "testing"}
    load_config({"sinks": {"cml": spec}})
    sink, _policy = create_sink("cml", spec)
    assert isinstance(sink, ClearMLSink)
    assert (sink.project, sink.task, sink.tags, sink.log_model, sink.offline, sink.cache_dir) == (
        None, None, [], False, None, "clearml")
    assert sink.init_kwargs == {"task_type": "testing"}


def test_online_without_a_server_fails_to_open_without_reaching_out(run_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import clearml.backend_config.defs as defs

    monkeypatch.delenv("CLEARML_OFFLINE_MODE")
    monkeypatch.setattr(defs, "get_active_config_file", lambda: None)
    before = Task.__dict__.get("_report_subprocess_enabled")
    with pytest.raises(Exception) as raised:
        ClearMLSink(offline=False).open(context(run_dir))
    # ClearML's own "no configuration" error, not a connection attempt to a public server.
    assert type(raised.value).__name__ == "MissingConfigError", raised.value
    assert Task.__dict__.get("_report_subprocess_enabled") == before
    assert getattr(Task, "_Task__main_task", None) is None
