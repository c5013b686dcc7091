"""Tests of the neptune sink, read back from Neptune's offline data with Neptune's own classes."""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
    Text,
    Timing,
    TransientSinkError,
)
from expbus.sinks import ConfigError, create_sink, load_config
from expbus.sinks.contract import SinkContract
from expbus.sinks.neptune import (
    NeptuneSink,
    is_transient_error,
    offline_points_by_step,
    offline_series,
    read_offline_runs,
)

offline_runs = read_offline_runs
series = offline_series
points_by_step = offline_points_by_step

neptune = pytest.importorskip("neptune")
from neptune.internal.operation import (  # noqa: E402
    AddStrings,
    AssignBool,
    AssignFloat,
    AssignInt,
    AssignString,
    DeleteAttribute,
    LogFloats,
    LogStrings,
    Operation,
    UploadFile,
    UploadFileSet,
)

NAN = float("nan")
T0 = 1_700_000_000.0


# -- Neptune's offline data, read with Neptune's own classes ------------------------------
def only_run(data_dir: Path) -> list[Operation]:
    runs = offline_runs(data_dir)
    assert len(runs) == 1, list(runs)
    return next(iter(runs.values()))


def assigned(operations: list[Operation]) -> dict[str, Any]:
    """path -> the last value assigned to it (deleted paths removed)."""
    out: dict[str, Any] = {}
    for op in operations:
        key = "/".join(op.path)
        if isinstance(op, (AssignFloat, AssignInt, AssignBool, AssignString)):
            out[key] = op.value
        elif isinstance(op, DeleteAttribute):
            out.pop(key, None)
    return out


def context(run_dir: Path, sink_id: str = "nep") -> SinkContext:
    return SinkContext(sink_id=sink_id, run_dir=run_dir, run_id="expbus-run")


def state(run_dir: Path, sink_id: str = "nep") -> dict[str, Any]:
    return json.loads((run_dir / ".expbus" / "sinks" / f"{sink_id}.json").read_text())


def token(address: str) -> str:
    return base64.b64encode(json.dumps({"api_address": address, "api_url": address, "api_key": "k"}).encode()).decode()


@pytest.fixture(autouse=True)
def _clean_neptune_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("NEPTUNE_MODE", "NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT", "NEPTUNE_CUSTOM_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    # The sink points Neptune at the run directory; anything that escaped would land here.
    monkeypatch.chdir(tmp_path)


# -- (1) the contract -------------------------------------------------------------------
class TestNeptuneContract(SinkContract):
    def make_sink(self, run_dir: Path) -> NeptuneSink:
        return NeptuneSink(mode="offline")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        return points_by_step(only_run(run_dir / ".neptune"))


# -- (2) a whole run through a real bus --------------------------------------------------
def run_events(ckpt_a: Path, ckpt_b: Path, steps: range = range(300)) -> list[Event]:
    events: list[Event] = [
        RunStarted(time=T0, run_id="r", host="h", pid=1),
        Hyperparams(time=T0, params={
            "lr": 0.001,
            "model": {"hidden": 128, "layers": [64, 32], "act": "gelu", "dropout": None},
            "optim": {"name": "adam", "betas": [0.9, 0.99]},
            "amp": True,
        }),
    ]
    for step in steps:
        values = {"train/loss": 1.0 / (step + 1), "lr": 1e-3 * (1 - step / 1000)}
        if step == 7:
            values["train/loss"] = NAN
        events.append(Metrics(time=T0 + step, step=step, values=values, epoch=step // 100))
        if step % 50 == 49:
            # Validation at the same step: Lightning logs the epoch again with it.
            events.append(Metrics(time=T0 + step + 0.5, step=step, values={"val/loss": step / 1000}, epoch=step // 100))
            events.append(Timing(time=T0 + step + 0.5, step=step, durations={"train_step_timing": 0.125}))
    events += [
        Text(time=T0 + 300, step=299, name="note", text="hello"),
        CheckpointSaved(time=T0 + 301, path=str(ckpt_a), step=149, epoch=1, monitor="val/loss",
                        monitor_value=0.149, is_best=True, size_bytes=ckpt_a.stat().st_size),
        CheckpointSaved(time=T0 + 302, path=str(ckpt_b), step=299, epoch=2, monitor="val/loss",
                        monitor_value=0.299, is_best=False),
        CheckpointRemoved(time=T0 + 303, path=str(ckpt_a), step=299),
        RunFinished(time=T0 + 304, status="completed", step=299),
    ]
    return events


@pytest.mark.timeout(60)
def test_full_run_read_back_from_the_offline_data(run_dir: Path) -> None:
    ckpt_a, ckpt_b = run_dir / "checkpoints" / "epoch=1-step=149.ckpt", run_dir / "checkpoints" / "last.ckpt"
    ckpt_a.parent.mkdir()
    ckpt_a.write_bytes(b"a" * 4096)
    ckpt_b.write_bytes(b"b" * 2048)
    sink = NeptuneSink(name="my-run", tags=["nemo", "test"], description="a test run", mode="offline")
    events = run_events(ckpt_a, ckpt_b)
    with Bus(run_dir, sinks={"nep": sink}) as bus:
        for event in events:
            bus.publish(event)
    health = bus.stats()["nep"]
    assert (health.state, health.delivered, health.errors, health.dropped) == ("closed", len(events), 0, 0)

    runs = offline_runs(run_dir / ".neptune")
    assert list(runs) == [state(run_dir)["offline_runs"][0].removeprefix("offline/")]
    ops = runs[next(iter(runs))]
    got = series(ops)
    # Every finite metric at every step, in order, with Lightning's prefix; the NaN is absent.
    assert got["training/train/loss"] == [(s, 1.0 / (s + 1)) for s in range(300) if s != 7]
    assert got["training/lr"] == [(s, 1e-3 * (1 - s / 1000)) for s in range(300)]
    assert got["training/val/loss"] == [(s, s / 1000) for s in range(49, 300, 50)]
    assert got["training/train_step_timing"] == [(s, 0.125) for s in range(49, 300, 50)]
    # The epoch once per step: the validation call's repeat at the same step is not sent.
    assert got["training/epoch"] == [(s, float(s // 100)) for s in range(300)]
    # Points carry the event's time, not the time the sink wrote them.
    first = next(op for op in ops if isinstance(op, LogFloats) and op.path == ["training", "lr"])
    assert first.values[0].ts == T0
    # One operation per series per batch, not one per point.
    assert sum(isinstance(op, LogFloats) for op in ops) < 60
    assert series(ops, LogStrings)["training/note"] == [(299, "hello")]

    values = assigned(ops)
    assert values["training/hyperparams/lr"] == 0.001
    assert values["training/hyperparams/model/hidden"] == 128
    assert values["training/hyperparams/model/layers"] == "[64, 32]"  # stringify_unsupported, as Lightning
    assert values["training/hyperparams/model/dropout"] == "None"
    assert values["training/hyperparams/optim/betas"] == "[0.9, 0.99]"
    assert values["training/hyperparams/amp"] is True
    assert values["sys/name"] == "my-run" and values["sys/description"] == "a test run"
    assert values["training/status"] == "success" and values["sys/failed"] is False
    assert values["training/model/best_model_path"] == str(ckpt_a)
    assert values["training/model/best_model_score"] == 0.149
    assert [set(op.values) for op in ops if isinstance(op, AddStrings)] == [{"nemo", "test"}]

    uploads = [op for op in ops if isinstance(op, UploadFile)]
    assert [("/".join(op.path), op.file_path, op.ext) for op in uploads] == [
        ("training/model/checkpoints/epoch=1-step=149", str(ckpt_a), "ckpt"),
        ("training/model/checkpoints/last", str(ckpt_b), "ckpt"),
    ]
    deleted = ["/".join(op.path) for op in ops if isinstance(op, DeleteAttribute)]
    assert deleted == ["training/model/checkpoints/epoch=1-step=149"]
    # No background capture: nothing under a monitoring namespace, no source snapshot.
    assert not [op for op in ops if op.path[0] == "monitoring"]
    assert [op.file_globs for op in ops if isinstance(op, UploadFileSet)] == [[]]


def test_failed_run_marks_sys_failed_and_keeps_the_error(run_dir: Path) -> None:
    with Bus(run_dir, sinks={"nep": NeptuneSink(prefix="", mode="offline")}) as bus:
        bus.publish(Metrics(time=T0, step=1, values={"loss": 0.5}))
        bus.publish(RunFinished(time=T0 + 1, status="failed", error="RuntimeError: boom", step=1))
    values = assigned(only_run(run_dir / ".neptune"))
    assert values["status"] == "failed" and values["sys/failed"] is True
    assert values["error_message"] == "RuntimeError: boom"
    assert series(only_run(run_dir / ".neptune"))["loss"] == [(1, 0.5)]  # no prefix: at the root


def test_directory_checkpoint_is_a_file_set_and_log_model_checkpoints_false_uploads_nothing(run_dir: Path) -> None:
    shard_dir = run_dir / "ckpt" / "step=10"
    shard_dir.mkdir(parents=True)
    (shard_dir / "shard0.pt").write_bytes(b"0")
    with Bus(run_dir, sinks={"a": NeptuneSink(mode="offline", data_dir="nep-a"),
                             "b": NeptuneSink(mode="offline", data_dir="nep-b", log_model_checkpoints=False)}) as bus:
        bus.publish(CheckpointSaved(time=T0, path=str(shard_dir), step=10))
    ops_a = only_run(run_dir / "nep-a")
    assert [("/".join(op.path), op.file_globs) for op in ops_a if isinstance(op, UploadFileSet) and op.file_globs] == [
        ("training/model/checkpoints/step=10", [str(shard_dir)])]
    ops_b = only_run(run_dir / "nep-b")
    assert not [op for op in ops_b if isinstance(op, UploadFile) or (isinstance(op, UploadFileSet) and op.file_globs)]


def test_steps_must_increase_within_a_series(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = NeptuneSink(mode="offline")
    sink.open(context(run_dir))
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.neptune"):
        sink.write([Metrics(time=T0, step=s, values={"loss": float(s)}) for s in (1, 2, 2, 3)])
        sink.write([Metrics(time=T0, step=s, values={"loss": float(s), "acc": 1.0}) for s in (2, 4)])
    sink.close()
    got = series(only_run(run_dir / ".neptune"))
    assert got["training/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert got["training/acc"] == [(2, 1.0), (4, 1.0)]
    assert sink.skipped_steps == 2
    # A repeat of the same step is routine (Lightning's epoch); going back is worth one warning.
    assert caplog.text.count("below the series' last step") == 1


def test_stdout_and_hardware_capture_stay_off(run_dir: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    stdout, stderr = sys.stdout, sys.stderr
    sink = NeptuneSink(mode="offline")
    sink.open(context(run_dir))
    try:
        new = {t.name for t in threading.enumerate()} - before
        assert sys.stdout is stdout and sys.stderr is stderr
        # Neptune's own ping job is all that runs: no hardware-metrics, stdout or stderr threads.
        assert new <= {"NeptunePing"}, new
    finally:
        sink.close()


@pytest.mark.timeout(30)
def test_close_is_bounded(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = NeptuneSink(mode="offline", stop_timeout=0.5)
    sink.open(context(run_dir))
    run = sink._run
    monkeypatch.setattr(run, "stop", lambda seconds=None: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not stop"):
        sink.close()
    assert time.monotonic() - start < 5
    sink.close()  # idempotent
    monkeypatch.undo()
    run.stop()


# -- (3) resume ---------------------------------------------------------------------------
def test_offline_resume_writes_a_new_offline_run_and_lists_both(run_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with Bus(run_dir, run_id="r", sinks={"nep": NeptuneSink(mode="offline")}) as bus:
        for s in range(50):
            bus.publish(Metrics(time=T0 + s, step=s, values={"loss": float(s)}))
    first = state(run_dir)["offline_runs"]
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.neptune"):
        with Bus(run_dir, run_id="r", sinks={"nep": NeptuneSink(mode="offline")}) as bus:
            for s in range(50, 100):
                bus.publish(Metrics(time=T0 + s, step=s, values={"loss": float(s)}))
    assert "cannot reopen a run" in caplog.text
    listed = state(run_dir)["offline_runs"]
    assert len(listed) == 2 and listed[0] == first[0]
    runs = offline_runs(run_dir / ".neptune")
    assert sorted(runs) == sorted(ref.removeprefix("offline/") for ref in listed)
    per_run = [series(runs[ref.removeprefix("offline/")])["training/loss"] for ref in listed]
    # The second process continues where the first stopped: every step once, in order.
    assert [step for points in per_run for step, _ in points] == list(range(100))


class FakeServer:
    """Stands in for ``neptune.init_run`` on a self-hosted server: records the call, returns a debug run."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.runs: list[Any] = []
        self.init_run = neptune.init_run

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        local = {k: v for k, v in kwargs.items() if k not in ("with_id", "api_token", "project", "mode")}
        run = self.init_run(mode="debug", **local)
        self.runs.append(run)
        return run


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    server = FakeServer()
    monkeypatch.setattr(neptune, "init_run", server)
    yield server


def test_online_resume_reopens_the_run_and_skips_the_steps_it_holds(run_dir: Path, fake_server: FakeServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPTUNE_API_TOKEN", token("http://127.0.0.1:8080"))
    monkeypatch.setenv("NEPTUNE_PROJECT", "team/proj")
    first = NeptuneSink()
    first.open(context(run_dir))
    assert first.resolved_mode == "async"  # a configured server: online by default
    first.write([Metrics(time=T0 + s, step=s, values={"loss": float(s)}) for s in range(10)])
    first.flush()
    first.close()
    assert "with_id" not in fake_server.calls[0] and fake_server.calls[0]["mode"] == "async"
    saved = state(run_dir)
    assert saved["sys_id"] == first.run_ref and saved["last_steps"] == {"training/loss": 9}

    second = NeptuneSink()
    second.open(context(run_dir))
    assert fake_server.calls[1]["with_id"] == first.run_ref and second.continued
    # A resumed run restarts from a checkpoint at step 5: steps 5..9 are held already.
    second.write([Metrics(time=T0 + s, step=s, values={"loss": float(s)}) for s in range(5, 15)])
    assert list(fake_server.runs[1]["training/loss"].fetch_values()["value"]) == [float(s) for s in range(10, 15)]
    assert second.skipped_steps == 5
    second.close()


def test_online_resume_into_another_project_starts_a_new_run(run_dir: Path, fake_server: FakeServer) -> None:
    for project in ("team/a", "team/b"):
        sink = NeptuneSink(project=project, api_token=token("http://127.0.0.1:1"))
        sink.open(context(run_dir))
        sink.close()
    assert [("with_id" in call, call["project"]) for call in fake_server.calls] == [(False, "team/a"),
                                                                                   (False, "team/b")]
    assert state(run_dir)["project"] == "team/b"


def test_explicit_with_id_and_custom_run_id_pass_through(run_dir: Path, fake_server: FakeServer) -> None:
    sink = NeptuneSink(project="team/proj", api_token=token("http://127.0.0.1:1"), with_id="PROJ-7", mode="sync")
    sink.open(context(run_dir))
    sink.close()
    assert fake_server.calls[0]["with_id"] == "PROJ-7" and fake_server.calls[0]["mode"] == "sync"
    sink = NeptuneSink(project="team/proj", api_key=token("http://127.0.0.1:1"), custom_run_id="abc",
                       flush_period=1.0)
    sink.open(context(run_dir, "other"))
    sink.close()
    call = fake_server.calls[1]
    assert "with_id" not in call and call["custom_run_id"] == "abc" and call["flush_period"] == 1.0
    assert call["api_token"] == token("http://127.0.0.1:1")  # api_key is Lightning's name for it


@pytest.mark.parametrize("address", ["https://app.neptune.ai", "https://ui.neptune.ai/api", "NEPTUNE.AI"])
def test_a_token_of_the_closed_hosted_service_is_refused(run_dir: Path, address: str) -> None:
    sink = NeptuneSink(project="team/proj", api_token=token(address))
    with pytest.raises(ValueError, match="hosted service closed"):
        sink.open(context(run_dir))
    assert sink._run is None


def test_the_anonymous_token_is_refused(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPTUNE_MODE", "async")
    with pytest.raises(ValueError, match="hosted service closed"):
        NeptuneSink(project="common/x", api_token=neptune.ANONYMOUS_API_TOKEN).open(context(run_dir))


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NeptuneSink()._resolve_mode() == "offline"  # nothing configured
    assert NeptuneSink(project="a/b")._resolve_mode() == "offline"  # no token
    assert NeptuneSink(api_token=token("http://127.0.0.1:1"))._resolve_mode() == "offline"  # no project
    assert NeptuneSink(project="a/b", api_token=token("http://127.0.0.1:1"))._resolve_mode() == "async"
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    assert NeptuneSink(project="a/b", api_token=token("http://127.0.0.1:1"))._resolve_mode() == "debug"
    assert NeptuneSink(mode="offline")._resolve_mode() == "offline"
    monkeypatch.setenv("NEPTUNE_MODE", "read-only")
    with pytest.raises(ValueError, match="read-only"):
        NeptuneSink()._resolve_mode()


def test_with_id_offline_is_an_error(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs a Neptune server"):
        NeptuneSink(mode="offline", with_id="X-1")
    with pytest.raises(ValueError, match="needs a Neptune server"):
        NeptuneSink(with_id="X-1").open(context(run_dir))  # nothing configured: offline


# -- (5) options --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "read-only"}, "sinks.x.mode"),
        ({"mode": "online"}, "sinks.x.mode"),
        ({"log_model_checkpoints": "sometimes"}, "sinks.x.log_model_checkpoints"),
        ({"tags": "one-tag"}, "sinks.x.tags"),
        ({"stop_timeout": "soon"}, "sinks.x.stop_timeout"),
        ({"prefix": ["a"]}, "sinks.x.prefix"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    spec = {"type": "neptune", **options}
    with pytest.raises(ConfigError, match=message):
        load_config({"sinks": {"x": spec}})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "offline", "with_id": "P-1"}, "needs a Neptune server"),
        ({"api_token": "a", "api_key": "b"}, "same setting"),
        ({"stop_timeout": 0}, "stop_timeout"),
    ],
)
def test_contradicting_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_sink("x", {"type": "neptune", **options})


def test_options_from_yaml_nemo_style() -> None:
    # NeMo's neptune_logger_kwargs, plus a neptune.init_run keyword.
    spec = {"type": "neptune", "project": "team/proj", "name": "exp", "prefix": "train", "log_model_checkpoints": False,
            "tags": ["a", "b"], "description": None, "api_key": "secret-token", "capture_hardware_metrics": True}
    load_config({"sinks": {"nep": spec}})
    sink, _policy = create_sink("nep", spec)
    assert isinstance(sink, NeptuneSink)
    assert (sink.project, sink.name, sink.prefix, sink.log_model_checkpoints, sink.tags) == (
        "team/proj", "exp", "train", False, ["a", "b"])
    assert sink.init_kwargs == {"capture_hardware_metrics": True}
    assert "secret-token" not in repr(sink) and "***" in repr(sink)
    defaults = NeptuneSink()
    assert (defaults.prefix, defaults.log_model_checkpoints, defaults.mode, defaults.data_dir) == (
        "training", True, None, ".neptune")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError("slow"), True),
        (TransientSinkError("x"), True),
        (ValueError("bad"), False),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient_error(exc) is transient
    assert NeptuneSink().is_transient(exc) is transient


def test_connection_lost_is_transient() -> None:
    from neptune.exceptions import NeptuneConnectionLostException

    assert is_transient_error(NeptuneConnectionLostException(ConnectionError("down")))


def test_a_failed_extend_is_retried_without_losing_points(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = NeptuneSink(mode="offline")
    sink.open(context(run_dir))
    batch = [Metrics(time=T0 + s, step=s, values={"a": float(s), "b": -float(s)}) for s in range(5)]
    handler_class = type(sink._run["training/b"])
    real_extend = handler_class.extend
    calls = {"n": 0}

    def flaky_extend(self: Any, values: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("lost")
        return real_extend(self, values, **kwargs)

    monkeypatch.setattr(handler_class, "extend", flaky_extend)
    with pytest.raises(ConnectionError):
        sink.write(batch)
    sink.write(batch)  # what the bus does with a transient failure
    monkeypatch.undo()
    sink.close()
    got = series(only_run(run_dir / ".neptune"))
    assert got["training/a"] == [(s, float(s)) for s in range(5)]
    assert got["training/b"] == [(s, -float(s)) for s in range(5)]
    assert sink.skipped_steps == 5  # the retry's points of "a", which the first try had sent
