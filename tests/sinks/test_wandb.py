"""Tests of the wandb sink: real offline W&B runs, read back from wandb's own run files."""

from __future__ import annotations

import base64
import hashlib
import math
import os
import shutil
import signal
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
)
from expbus.sinks import ConfigError, load_config
from expbus.sinks._optional import MissingClientError
from expbus.sinks._registry import create_sink
from expbus.sinks._state import load_state
from expbus.sinks.contract import SinkContract, metric_points
from expbus.sinks.wandb import WandbSink, read_offline_history, read_offline_run, read_offline_runs

pytest.importorskip("wandb")  # the client (extra "wandb"); the sink module itself never imports it

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module", autouse=True)
def _wandb_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep wandb's staging, cache and settings dirs out of the home directory; offline everywhere."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        mp.delenv("WANDB_RUN_ID", raising=False)
        yield


def _md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def _wandb_core_children() -> list[int]:
    """Live (not zombie) wandb-core processes whose parent is this process (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm.startswith("wandb-core") and rest[0] != "Z" and int(rest[1]) == os.getpid():
            found.append(int(entry.name))
    return found


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _assert_points_equal(got: list[tuple[int, dict[str, Any]]], want: list[tuple[int, dict[str, float]]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, g), (_, w) in zip(got, want, strict=True):
        assert g.keys() == w.keys(), step
        assert all(_same(g[k], w[k]) for k in w), (step, g, w)


# -- (1) the public contract -----------------------------------------------------------
class TestWandbContract(SinkContract):
    def make_sink(self, run_dir: Path) -> Any:
        return WandbSink(offline=True, project="contract")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        # ``epoch`` is added to each row as Lightning adds it; the contract compares the values.
        return [(step, {k: v for k, v in values.items() if k != "epoch"})
                for step, values in read_offline_history(run_dir)]


# -- (2) a whole run through the bus ---------------------------------------------------
BIG = "x" * 70_000  # a config value larger than two 32 KiB blocks: a multi-chunk record


def _train_metrics(step: int) -> dict[str, float]:
    return {"train_loss": 1.0 / (step + 1), "lr": 1e-3 * (0.99**step), "grad_norm": NAN if step % 7 == 3 else step / 3}


def _steps() -> range:
    return range(60)


class LoggedRun:
    """One offline run through a real Bus, with what went in and the files it left."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        ckpt_dir = run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True)
        self.ckpt_a = ckpt_dir / "step=20.ckpt"
        self.ckpt_b = ckpt_dir / "step=40.ckpt"
        self.ckpt_a.write_bytes(os.urandom(3000))
        self.ckpt_b.write_bytes(os.urandom(5000))
        self.params = {"model": {"hidden": 128, "act": "gelu", "layers": [64, 32]}, "optim": {"lr": 1e-3},
                       "seed": 7, "notes": BIG}
        t = time.time()
        self.events: list[Event] = [
            RunStarted(time=t, run_id="r", host="h", pid=1, run_dir=str(run_dir), config={"name": "my_experiment"}),
            Hyperparams(time=t, params=self.params),
        ]
        for step in _steps():
            self.events.append(Metrics(time=t, step=step, epoch=step // 20, values=_train_metrics(step)))
            if step % 10 == 9:
                # A second event at the same step (validation): it joins the step's row.
                self.events.append(Metrics(time=t, step=step, epoch=step // 20, values={"val_loss": step / 100}))
                self.events.append(Timing(time=t, step=step, durations={"train_step_timing": 0.25}))
            if step == 20:
                self.events.append(CheckpointSaved(time=t, path=str(self.ckpt_a), step=20, epoch=1, monitor="val_loss",
                                                   monitor_value=0.19, is_best=True, size_bytes=3000))
            if step == 40:
                self.events.append(CheckpointSaved(time=t + 1, path=str(self.ckpt_b), step=40, epoch=2,
                                                   monitor="val_loss", monitor_value=0.39, size_bytes=5000))
                self.events.append(Text(time=t, step=step, name="note", text="not logged"))
        self.events.append(Metrics(time=t, step=60, values={"inf": INF, "neg_inf": -INF, "epoch": 9.0}, epoch=2))
        self.events.append(RunFinished(time=t, status="completed", step=60))
        self.sink = WandbSink(offline=True, project="expbus-tests", log_model="all", tags=["a", "b"],
                              group="g", config={"passed_through": True}, notes="n")
        bus = Bus(run_dir, run_id="bus-run-id", sinks={"wb": self.sink})
        bus.open()
        self.service = self.sink._service
        for event in self.events:
            bus.publish(event)
            if isinstance(event, CheckpointSaved):
                assert bus.flush(30)  # a batch boundary between two steps
        assert bus.close(60)
        self.health = bus.stats()["wb"]
        self.runs = read_offline_runs(run_dir)

    def expected_rows(self) -> list[tuple[int, dict[str, float]]]:
        rows: list[tuple[int, dict[str, float]]] = []
        for step, values in metric_points(self.events):
            event_epoch = next(e.epoch for e in self.events if isinstance(e, Metrics) and e.step == step)
            if rows and rows[-1][0] == step:
                rows[-1][1].update(values)
                continue
            rows.append((step, {**values}))
            rows[-1][1].setdefault("epoch", event_epoch)  # type: ignore[arg-type]
        for event in self.events:
            if isinstance(event, Timing):
                next(r for s, r in rows if s == event.step).update(event.durations)
        return rows


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> LoggedRun:
    return LoggedRun(tmp_path_factory.mktemp("wandb-run") / "run")


@pytest.mark.timeout(60)
def test_every_metric_at_every_step(logged: LoggedRun) -> None:
    assert logged.health.state == "closed" and logged.health.errors == 0 and logged.health.dropped == 0
    assert len(logged.runs) == 1
    points = read_offline_history(logged.run_dir)
    _assert_points_equal(points, logged.expected_rows())
    # One row per step: the validation metrics and timings of a step share its row.
    assert [s for s, _ in points] == [*_steps(), 60]
    nan_steps = [s for s, v in points if "grad_norm" in v and math.isnan(v["grad_norm"])]
    assert nan_steps == [s for s in _steps() if s % 7 == 3]
    last = points[-1][1]
    assert last["inf"] == INF and last["neg_inf"] == -INF
    assert last["epoch"] == 9.0  # a logged "epoch" value wins over the event's epoch


@pytest.mark.timeout(60)
def test_step_metric_and_wandb_rows(logged: LoggedRun) -> None:
    history = logged.runs[0].history
    # trainer/global_step is in every row (the x-axis); W&B's own _step counts the rows.
    assert [row["trainer/global_step"] for row in history] == [*_steps(), 60]
    assert [row["_step"] for row in history] == list(range(len(history)))
    assert all(isinstance(row["trainer/global_step"], int) for row in history)


@pytest.mark.timeout(60)
def test_hyperparameters_and_run_fields(logged: LoggedRun) -> None:
    run = logged.runs[0]
    assert run.config == {**logged.params, "passed_through": True}
    assert run.config["model"]["layers"] == [64, 32]  # nested, as given
    assert len(run.config["notes"]) == len(BIG)  # survived a record split over blocks
    assert run.project == "expbus-tests"
    assert run.name == "my_experiment"  # from RunStarted's config
    assert (run.tags, run.group) == (["a", "b"], "g")
    assert run.exit_code == 0
    # The id was derived from the expbus run id and saved for a resumed run.
    assert run.run_id == "bus-run-id"
    assert load_state(SinkContext(sink_id="wb", run_dir=logged.run_dir, run_id="x"))["id"] == "bus-run-id"
    assert run.path.parent.parent == logged.run_dir / "wandb"  # save_dir defaults to the run dir


@pytest.mark.timeout(60)
def test_checkpoints_are_model_artifacts(logged: LoggedRun) -> None:
    artifacts = logged.runs[0].artifacts
    assert [a["name"] for a in artifacts] == ["model-bus-run-id"] * 2
    assert [a["type"] for a in artifacts] == ["model", "model"]
    assert [sorted(a["aliases"]) for a in artifacts] == [["best", "latest"], ["latest"]]
    for artifact, path, step, score in zip(artifacts, (logged.ckpt_a, logged.ckpt_b), (20, 40), (0.19, 0.39),
                                           strict=True):
        assert artifact["metadata"] == {"score": score, "original_filename": path.name, "step": step,
                                        "epoch": step // 20, "ModelCheckpoint": {"monitor": "val_loss"}}
        entry = artifact["files"]["model.ckpt"]
        assert entry["digest"] == _md5_b64(path) and entry["size"] == path.stat().st_size
        # add_file_policy=mutable: wandb staged a copy to upload from.
        assert Path(entry["local_path"]).read_bytes() == path.read_bytes()


@pytest.mark.timeout(60)
def test_close_ends_the_service_and_its_threads(logged: LoggedRun) -> None:
    assert logged.service is not None and logged.service.poll() is not None
    assert _wandb_core_children() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("wandb") and not t.daemon]


# -- log_model=True: the surviving checkpoints, at the end -----------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", ["completed", "failed"])
def test_log_model_true_logs_survivors_at_a_completed_end(run_dir: Path, status: str) -> None:
    a, b, c = (run_dir / f"{n}.ckpt" for n in "abc")
    for path in (a, b, c):
        path.write_bytes(os.urandom(100))
    t = time.time()
    events: list[Event] = [
        CheckpointSaved(time=t, path=str(a), step=1, monitor="loss", monitor_value=0.5),
        Metrics(time=t, step=1, values={"loss": 0.5}),
        CheckpointSaved(time=t + 1, path=str(b), step=2, monitor="loss", monitor_value=0.25, is_best=True),
        CheckpointRemoved(time=t + 1, path=str(a), step=2),
        CheckpointSaved(time=t + 2, path=str(c), step=3, is_last=True),
        RunFinished(time=t + 3, status=status, step=3),  # type: ignore[arg-type]
    ]
    a.unlink()
    with Bus(run_dir, sinks={"wb": WandbSink(offline=True, log_model=True, checkpoint_name="ckpts")}) as bus:
        for event in events:
            bus.publish(event)
    (run,) = read_offline_runs(run_dir)
    if status == "failed":
        assert run.artifacts == [] and run.exit_code == 1
        return
    assert [(x["name"], x["metadata"]["original_filename"], sorted(x["aliases"])) for x in run.artifacts] == [
        ("ckpts", "b.ckpt", ["best", "latest"]),
        ("ckpts", "c.ckpt", ["latest"]),
    ]
    assert run.artifacts[0]["files"]["model.ckpt"]["digest"] == _md5_b64(b)


# -- (3) resume ------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_resume_continues_the_same_wandb_run(run_dir: Path) -> None:
    def session(steps: range, **options: Any) -> None:
        # A new Bus gets a new random expbus run id: the W&B id must come from the run dir.
        with Bus(run_dir, sinks={"wb": WandbSink(offline=True, project="resume", **options)}) as bus:
            for step in steps:
                bus.publish(Metrics(time=time.time(), step=step, values={"loss": step / 10}))
            bus.publish(RunFinished(time=time.time(), status="completed", step=steps[-1]))

    session(range(0, 10))
    session(range(10, 20))
    runs = read_offline_runs(run_dir)
    assert len(runs) == 2 and runs[0].path.parent != runs[1].path.parent
    assert runs[0].run_id == runs[1].run_id
    points = read_offline_history(run_dir)
    assert points == [(s, {"loss": s / 10}) for s in range(20)]  # every step once, in order

    # An explicit id (or Lightning's version) wins over the saved one, and is saved in turn.
    session(range(20, 21), version="explicit-id")
    assert read_offline_runs(run_dir)[-1].run_id == "explicit-id"
    assert load_state(SinkContext(sink_id="wb", run_dir=run_dir, run_id="x"))["id"] == "explicit-id"


# -- (4) a missing client --------------------------------------------------------------
def test_missing_client_for_the_offline_reader(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sink's own missing-client error is in test_missing_clients.py.
    monkeypatch.setitem(sys.modules, "wandb.proto.wandb_internal_pb2", None)
    with pytest.raises(MissingClientError, match="'wandb' sink"):
        read_offline_run(run_dir / "run-x.wandb")


# -- (5) options -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"log_model": "best"}, "sinks.x.log_model"),
        ({"offline": "maybe"}, "sinks.x.offline"),
        ({"resume": "sometimes"}, "sinks.x.resume"),
        ({"tags": "one"}, "sinks.x.tags"),
        ({"finish_timeout": "soon"}, "sinks.x.finish_timeout"),
        ({"mode": "dryer"}, "sinks.x.mode"),
        ({"settings": ["console", "off"]}, "sinks.x.settings"),
        ({"add_file_policy": "copy"}, "sinks.x.add_file_policy"),
    ],
)
def test_bad_option_types_are_config_errors(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"sinks": {"x": {"type": "wandb", **options}}})
    assert info.value.path == path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"id": "a/b"}, "invalid W&B run id"),
        ({"id": " "}, "invalid W&B run id"),
        ({"id": "a", "version": "b"}, "disagree"),
        ({"offline": True, "mode": "online"}, "contradicts"),
        ({"finish_timeout": -1}, "finish_timeout"),
    ],
)
def test_bad_option_values_are_config_errors(options: dict[str, Any], message: str) -> None:
    load_config({"sinks": {"x": {"type": "wandb", **options}}})  # the types are fine
    with pytest.raises(ConfigError, match=message):
        create_sink("x", {"type": "wandb", **options})


def test_options_from_yaml_and_passthrough() -> None:
    config = load_config({"sinks": {"wb": {"type": "wandb", "project": "p", "entity": "e", "offline": True,
                                           "tags": ["x"], "log_model": "all", "settings": {"x_disable_stats": True},
                                           "anonymous": "never", "when_full": "block"}}})
    sink, policy = create_sink("wb", config.sinks["wb"])
    assert isinstance(sink, WandbSink) and policy.when_full == "block"
    assert (sink.project, sink.entity, sink.mode, sink.tags, sink.log_model) == ("p", "e", "offline", ["x"], "all")
    assert sink.init_kwargs == {"anonymous": "never"}  # any other wandb.init argument passes through
    # Lightning's defaults: resume="allow", no checkpoints, save_dir falls back to dir.
    default = WandbSink(dir="elsewhere")
    assert (default.resume, default.log_model, default.save_dir, default.mode) == ("allow", False, "elsewhere", None)


# -- details ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_prefix_name_and_settings(run_dir: Path) -> None:
    sink = WandbSink(offline=True, name="explicit", prefix="tr", save_dir="wb", settings={"x_disable_stats": True})
    context = SinkContext(sink_id="wb", run_dir=run_dir, run_id="a:b/c")
    sink.open(context)
    assert sink.run.settings.console == "off" and sink.run.settings.x_disable_stats
    sink.write([RunStarted(time=0, run_id="r", host="h", pid=1, config={"name": "ignored"}),
                Metrics(time=0, step=3, values={"loss": 1.5})])
    sink.flush()
    sink.close()
    sink.close()  # idempotent
    (run,) = read_offline_runs(run_dir / "wb")
    assert run.name == "explicit" and run.run_id == "a-b-c"  # reserved characters replaced
    assert run.points() == [(3, {"tr-loss": 1.5})]


@pytest.mark.timeout(60)
def test_a_hung_service_is_killed_at_close(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("expbus.sinks.wandb._FINISH_GRACE", 0.5)
    sink = WandbSink(offline=True, finish_timeout=0.5)
    sink.open(SinkContext(sink_id="wb", run_dir=run_dir, run_id="hung"))
    sink.write([Metrics(time=0, step=s, values={"x": 1.0}) for s in range(3)])
    service = sink._service
    os.kill(service.pid, signal.SIGSTOP)  # wandb-core stops answering
    start = time.monotonic()
    sink.close()
    assert time.monotonic() - start < 10
    assert service.poll() is not None
    assert "was killed" in caplog.text
    assert _wandb_core_children() == []


def test_reader_handles_truncated_and_foreign_files(logged: LoggedRun, tmp_path: Path) -> None:
    source = logged.runs[0].path
    whole = read_offline_run(source)
    cut = tmp_path / "run-cut.wandb"
    data = source.read_bytes()
    for size in (len(data) // 3, 40_000, len(data) - 1):  # mid-record, mid-block
        cut.write_bytes(data[:size])
        partial = read_offline_run(cut)
        assert partial.history == whole.history[: len(partial.history)]
    foreign = tmp_path / "run-x.wandb"
    foreign.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_offline_run(foreign)
    # A run folder or the file itself may be given, too.
    assert [r.run_id for r in read_offline_runs(source.parent)] == [whole.run_id]
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(source, copy / source.name)
    assert read_offline_runs(copy)[0].history == whole.history
