"""``workers: process``: real sinks in a child process, fed through a pipe, read back with each backend's reader.

Faults are injected with a small sink module written into tmp_path (the child finds it
through the parent's ``sys.path``, which the adapter sends): a write that raises, a child
that is killed or kills itself, a close that hangs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from expbus.bus import Bus, Event, Hyperparams, Metrics, RunFinished, SinkContext, SinkPolicy, from_json, read_journal
from expbus.sinks import ConfigError, build_bus, load_config
from expbus.sinks._process import ChildSinkError, ProcessSink, WorkerDiedError, wait_for_workers
from expbus.sinks.contract import SinkContract, metric_points
from expbus.sinks.testing import MemorySink

REPO_ROOT = Path(__file__).resolve().parents[2]

FAULTY_SINK = textwrap.dedent(
    '''
    """A sink for fault injection: writes the step of every Metrics event to a file, then misbehaves as told."""
    from __future__ import annotations

    import logging
    import os
    import signal
    import time

    from expbus.bus import Metrics, TransientSinkError

    log = logging.getLogger("expbus_faulty.sink")


    class FaultySink:
        def __init__(self, path: str = "faulty.txt", fail: str = "never", transient: bool = False,
                     hang: str = "never", die_at_step: int = -1, chatty: bool = False) -> None:
            self.path_option = path
            self.fail = fail
            self.transient = transient
            self.hang = hang
            self.die_at_step = die_at_step
            self.chatty = chatty
            self.attempts = 0
            self._file = None

        def open(self, context) -> None:
            self._file = open(context.resolve(self.path_option), "a")
            log.warning("faulty sink %s opened in pid %d", context.sink_id, os.getpid())

        def write(self, batch) -> None:
            self.attempts += 1
            if self.chatty:
                print("a line on stdout from the sink", flush=True)
            if self.hang == "write":
                time.sleep(3600)
            if self.fail == "always" or (self.fail == "once" and self.attempts == 1):
                if self.transient:
                    raise TransientSinkError("injected transient failure")
                raise ValueError("injected failure")
            for event in batch:
                if isinstance(event, Metrics):
                    if event.step == self.die_at_step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    self._file.write(f"{event.step} {id(batch)}\\n")
            self._file.flush()

        def flush(self) -> None:
            self._file.flush()

        def close(self) -> None:
            if self.hang == "close":
                time.sleep(3600)
            self._file.close()
    '''
)


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The import path of the fault-injection sink (a module in tmp_path, on sys.path)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "expbus_faulty.py").write_text(FAULTY_SINK)
    monkeypatch.syspath_prepend(str(site))
    yield "expbus_faulty:FaultySink"
    sys.modules.pop("expbus_faulty", None)


def metrics(steps: range, k: int = 3) -> list[Event]:
    return [Metrics(time=time.time(), step=s, epoch=0, values={f"m{i}": s + i / 10 for i in range(k)}) for s in steps]


def jsonl(path: Path) -> list[Event]:
    return [from_json(line) for line in path.read_bytes().splitlines() if line.strip()]


def faulty_steps(path: Path) -> list[int]:
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie of another parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# -- configuration (no child started) -------------------------------------------------------------
def test_workers_key_is_validated_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"sinks\.e\.workers: expected 'thread' or 'process', got 'proces'; "
                                          r"did you mean process\?") as info:
        load_config({"sinks": {"e": {"type": "jsonl", "workers": "proces"}}})
    assert info.value.path == "sinks.e.workers" and info.value.value == "proces"
    with pytest.raises(ConfigError, match=r"bus\.workers: expected 'thread' or 'process', got 'threads'; "
                                          r"did you mean thread\?"):
        load_config({"bus": {"workers": "threads"}})
    with pytest.raises(ConfigError, match=r"bus\.worker: unknown key; did you mean workers\?"):
        load_config({"bus": {"worker": "process"}})
    with pytest.raises(ConfigError, match=r"sinks\.e\.workers: expected 'thread' or 'process', got 2"):
        load_config({"sinks": {"e": {"type": "jsonl", "workers": 2}}})
    # Under exp_manager (NeMo's block with expbus's keys) too, before anything is created on disk.
    from expbus.trainer_bridge.exp_manager._config import load_exp_manager_config

    with pytest.raises(ConfigError, match=r"exp_manager\.bus\.workers: expected one of 'process', 'thread' or null, "
                                          r"got 'proc'"):
        load_exp_manager_config({"exp_manager": {"bus": {"workers": "proc"}}})
    with pytest.raises(ConfigError, match=r"exp_manager\.sinks\.e\.workers: expected 'thread' or 'process'"):
        load_exp_manager_config({"exp_manager": {"sinks": {"e": {"type": "jsonl", "workers": "thred"}}}})
    # A valid key never reaches the sink's constructor.
    config = load_config({"bus": {"workers": "process"}, "sinks": {"e": {"type": "jsonl", "workers": "thread"}}})
    assert config.bus.workers == "process" and config.sinks["e"]["workers"] == "thread"


def test_worker_priority_is_validated_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sinks\.m\.worker_priority: expected 'idle' or 'normal', got 'idel'; "
                                          r"did you mean idle\?") as info:
        load_config({"sinks": {"m": {"type": "jsonl", "workers": "process", "worker_priority": "idel"}}})
    assert info.value.path == "sinks.m.worker_priority" and info.value.value == "idel"
    with pytest.raises(ConfigError, match=r"sinks\.j\.worker_priority: 'normal' applies to a sink in a worker "
                                          r"process.*set workers: process"):
        build_bus(load_config({"sinks": {"j": {"type": "jsonl", "worker_priority": "normal"}}}), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"sinks\.jsonl\.worker_priority: expected 'idle' or 'normal', got 'low'"):
        ProcessSink("jsonl", priority="low")
    bus = build_bus(load_config({"sinks": {"a": {"type": "jsonl", "workers": "process"},
                                           "b": {"type": "jsonl", "workers": "process", "worker_priority": "normal",
                                                 "path": "b.jsonl"}}}), run_dir=tmp_path)
    priorities = {sink_id: getattr(runner.sink, "priority", None) for sink_id, runner in bus._runners.items()}
    assert priorities == {"a": "idle", "b": "normal"}


PRIORITY_PROBE = textwrap.dedent(
    '''
    """A sink that records the scheduling policy it runs under at open, write and close.

    Like a real client, it starts a thread and a program of its own at open (wandb starts
    wandb-core): at close they must run under the normal policy too.
    """
    import os
    import subprocess
    import sys
    import threading


    class PolicyProbe:
        def __init__(self, path: str = "policy.txt") -> None:
            self.path_option = path

        def _note(self, call: str) -> None:
            with open(self.path, "a") as fh:
                fh.write(f"{call} {os.sched_getscheduler(0)} {os.sched_getscheduler(self._thread.native_id)} "
                         f"{os.sched_getscheduler(self._program.pid)}\\n")

        def open(self, context) -> None:
            self.path = context.resolve(self.path_option)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._stop.wait, daemon=True)
            self._thread.start()
            self._program = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            self._note("open")

        def write(self, batch) -> None:
            self._note("write")

        def close(self) -> None:
            self._note("close")
            self._stop.set()
            self._program.kill()
            self._program.wait()
    '''
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize("priority", ["idle", "normal"])
def test_the_child_runs_at_its_priority_and_closes_at_the_normal_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, priority: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "expbus_policy_probe.py").write_text(PRIORITY_PROBE)
    monkeypatch.syspath_prepend(str(site))
    sink = ProcessSink("expbus_policy_probe:PolicyProbe", sink_id="probe", priority=priority)
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("probe", sink, SinkPolicy(batch_delay=0.01))
    expected = os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER
    with bus:
        assert sink.pid is not None and os.sched_getscheduler(sink.pid) == expected
        bus.publish(metrics(range(1))[0])
        assert bus.flush(30)
    notes = (tmp_path / "policy.txt").read_text().split("\n")
    three = " ".join([str(expected)] * 3)
    normal = " ".join([str(os.SCHED_OTHER)] * 3)
    assert notes == [f"open {three}", f"write {three}", f"close {normal}", ""]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training process is never touched
    sys.modules.pop("expbus_policy_probe", None)


def test_build_bus_wraps_the_sinks_configured_for_a_process(tmp_path: Path) -> None:
    from expbus.sinks._config import sink_workers

    config = load_config({"bus": {"workers": "process"},
                          "sinks": {"a": {"type": "jsonl", "workers": "thread"}, "b": {"type": "jsonl", "path": "b"},
                                    "c": {"type": "csv", "workers": "process", "write_timeout": 7}}})
    bus = build_bus(config, run_dir=tmp_path)  # not opened: no child is started
    sinks = {sink_id: runner.sink for sink_id, runner in bus._runners.items()}
    assert type(sinks["a"]).__name__ == "JsonlSink"
    assert isinstance(sinks["b"], ProcessSink) and sinks["b"].options == {"path": "b"} and sinks["b"].pid is None
    assert isinstance(sinks["c"], ProcessSink) and sinks["c"].call_timeout > 7
    # What the bus reads off a sink is mirrored from the sink it runs.
    assert sinks["b"].durable_writes is True
    assert sink_workers({"type": "jsonl"}) == "thread"
    # MLflow's default is a process (its client's Python would hold the training process's GIL).
    assert sink_workers({"type": "mlflow"}) == "process"
    assert sink_workers({"type": "expbus.sinks.mlflow:MlflowSink"}) == "process"
    assert sink_workers({"type": "mlflow"}, "thread") == "thread"
    assert sink_workers({"type": "mlflow", "workers": "thread"}, "process") == "thread"
    assert sink_workers({"type": "jsonl"}, "process") == "process"
    assert sink_workers({"type": "jsonl", "workers": "thread"}, "process") == "thread"


def test_from_spec_checks_options_like_yaml() -> None:
    with pytest.raises(ConfigError, match=r"unknown key; did you mean append\?"):
        ProcessSink.from_spec("jsonl", appnd=True)
    with pytest.raises(ConfigError, match=r"write_timeout are not sink options; give the bus policy to Bus.add_sink"):
        ProcessSink.from_spec("jsonl", write_timeout=3)
    with pytest.raises(ConfigError, match="unknown sink type 'jsnl'; did you mean jsonl"):
        ProcessSink.from_spec("jsnl")
    with pytest.raises(TypeError, match="plain data"):
        ProcessSink("mlflow", {"tags": {"x": object()}})


# -- real sinks in a child -------------------------------------------------------------------------
@pytest.mark.slow
def test_jsonl_in_a_process_receives_every_event(tmp_path: Path) -> None:
    sink = ProcessSink.from_spec("jsonl")
    events: list[Event] = [Hyperparams(time=time.time(), params={"lr": 0.1, "nested": {"a": [1, 2]}}),
                           *metrics(range(500)), RunFinished(time=time.time(), status="completed", step=499)]
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("events", sink, SinkPolicy(batch_size=64, batch_delay=0.01))
    bus.open()
    child = sink.pid
    assert child is not None and child != os.getpid() and not gone(child)
    for event in events:
        bus.publish(event)
    assert bus.flush(30)
    assert bus.close(30)
    assert jsonl(tmp_path / "events.jsonl") == events
    health = bus.stats()["events"]
    assert health.delivered == len(events) and health.errors == 0 and health.state == "closed"
    assert wait_for_workers(30) and sink.returncode == 0 and gone(child)
    assert "sink 'events' (jsonl)" in (tmp_path / ".expbus" / "workers" / "events.stderr").read_text()


@pytest.mark.slow
def test_a_closed_process_sink_opens_again_with_a_new_child(tmp_path: Path) -> None:
    # An extra sink given to the bridge is reused by every fit/validate: each opens a new child.
    sink = ProcessSink.from_spec("jsonl")
    pids = []
    for part in (range(0, 10), range(10, 20)):
        bus = Bus(tmp_path, journal=False)
        bus.add_sink("events", sink, SinkPolicy(batch_delay=0.01))
        with bus:
            pids.append(sink.pid)
            for event in metrics(part):
                bus.publish(event)
        assert bus.stats()["events"].delivered == 10
    assert pids[0] != pids[1]
    assert [e.step for e in jsonl(tmp_path / "events.jsonl")] == list(range(20))  # type: ignore[attr-defined]
    assert wait_for_workers(30) and all(gone(pid) for pid in pids if pid is not None)


@pytest.mark.slow
def test_tensorboard_in_a_process_read_back_with_event_accumulator(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config({"sinks": {"tb": {"type": "tensorboard", "workers": "process", "batch_delay": 0.01}}})
    bus = build_bus(config, run_dir=tmp_path, catch_up=False)
    assert isinstance(bus._runners["tb"].sink, ProcessSink)
    events = metrics(range(200), k=4)
    with bus:
        for event in events:
            bus.publish(event)
    assert bus.stats()["tb"].delivered == len(events)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    for i in range(4):
        got = [(s.step, s.value) for s in acc.Scalars(f"m{i}")]
        assert got == [(s, pytest.approx(s + i / 10, rel=1e-6)) for s in range(200)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # MLflow's sqlalchemy models, on import in the reader
def test_mlflow_in_a_process_read_back_with_mlflow_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "exp" / "proc" / "v0"
    # No workers key: a process is the mlflow sink's default.
    config = load_config({"sinks": {"ml": {"type": "mlflow", "tracking_uri": uri, "experiment_name": "proc",
                                           "batch_delay": 0.05}}})
    bus = build_bus(config, run_dir=run_dir)
    assert isinstance(bus._runners["ml"].sink, ProcessSink)
    events: list[Event] = [Hyperparams(time=time.time(), params={"optim": {"lr": 0.5}}), *metrics(range(120), k=5),
                           RunFinished(time=time.time(), status="completed", step=119)]
    with bus:
        for event in events:
            bus.publish(event)
    health = bus.stats()["ml"]
    assert health.delivered == len(events) and health.errors == 0, health
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proc").experiment_id])
    assert run.data.params["optim/lr"] == "0.5" and run.info.status == "FINISHED"
    for i in range(5):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"m{i}"))
        assert history == [(s, pytest.approx(s + i / 10)) for s in range(120)]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_lightning_run_with_sinks_in_processes_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    import lightning.pytorch as pl
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from expbus.trainer_bridge import BridgeCallback
    from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "exp" / "proc" / "v0"
    db = tmp_path / "mlflow.db"
    (tmp_path / "expbus.yaml").write_text(textwrap.dedent(f"""
        run_dir: {run_dir}
        bus: {{workers: process}}
        sinks:
          events: {{type: jsonl, workers: thread}}
          tb:     {{type: tensorboard}}
          ml:     {{type: mlflow, tracking_uri: "sqlite:///{db}", experiment_name: proc}}
    """))
    bridge = BridgeCallback(str(tmp_path / "expbus.yaml"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=30, log_every_n_steps=3, logger=False, callbacks=[bridge],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    torch.manual_seed(0)
    trainer.fit(DemoRegressor(lr=0.02), datamodule=SyntheticRegression(batch_size=16, train_size=640, val_size=16))

    assert bridge.last_close_ok
    for sink_id, health in bridge.last_stats.items():
        assert health.errors == 0 and health.dropped == 0 and health.state == "closed", (sink_id, health)
    events = read_journal(run_dir)
    assert jsonl(run_dir / "events.jsonl") == events  # the in-process sink, for reference
    expected = metric_points(events)
    names = {name for _, values in expected for name in values}
    assert "train_loss_step" in names
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for name in names:
        want = [(step, values[name]) for step, values in expected if name in values]
        assert [(s.step, s.value) for s in acc.Scalars(name)] == [(s, pytest.approx(v, rel=1e-6)) for s, v in want]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("proc").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.02"
    for name in names:
        want = sorted((step, values[name]) for step, values in expected if name in values)
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert got == [(s, pytest.approx(v)) for s, v in want], name
    workers = sorted(p.name for p in (run_dir / ".expbus" / "workers").iterdir())
    assert workers == ["ml.stderr", "tb.stderr"]


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_write_error_in_the_child_is_reported_with_its_traceback_and_disables(
    tmp_path: Path, faulty: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = load_config({"sinks": {
        "bad": {"type": faulty, "fail": "always", "workers": "process", "batch_size": 10, "batch_delay": 0,
                "max_consecutive_failures": 3},
        "good": {"type": "jsonl"},
    }})
    bus = build_bus(config, run_dir=tmp_path, catch_up=False)
    events = metrics(range(100))
    with bus:
        for event in events:
            bus.publish(event)
        bus.flush(30)
    bad, good = bus.stats()["bad"], bus.stats()["good"]
    assert bad.state == "disabled" and bad.errors >= 3 and bad.retries == 0  # not transient: no retry
    assert bad.last_error is not None and bad.last_error.startswith("ChildSinkError: sink 'bad'")
    assert "ValueError: injected failure" in bad.last_error
    assert good.delivered == len(events) and jsonl(tmp_path / "events.jsonl") == events
    text = caplog.text
    assert "expbus sink 'bad': write failed" in text
    # The child's own traceback, with the line of the sink that raised.
    assert "expbus_faulty.py" in text and 'raise ValueError("injected failure")' in text
    assert "disabled (3 failed batches in a row)" in text
    # The sink's own log record, emitted in the child, reached this process's logging.
    opened = [r for r in caplog.records if r.name == "expbus_faulty.sink"]
    assert len(opened) == 1 and "faulty sink bad opened" in opened[0].getMessage()
    assert opened[0].process != os.getpid()


@pytest.mark.slow
def test_transient_error_in_the_child_is_retried_with_the_same_batch(tmp_path: Path, faulty: str) -> None:
    sink = ProcessSink.from_spec(faulty, fail="once", transient=True)
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("flaky", sink, SinkPolicy(batch_delay=0.01, retry_backoff=0.01))
    events = metrics(range(40))
    with bus:
        for event in events:
            bus.publish(event)
    health = bus.stats()["flaky"]
    assert health.retries == 1 and health.errors == 1 and health.failed == 0 and health.delivered == 40
    assert health.last_error is not None and health.last_error.startswith("TransientSinkError: sink 'flaky'")
    lines = (tmp_path / "faulty.txt").read_text().splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(40))


@pytest.mark.slow
def test_a_child_killed_mid_run_is_reported_and_the_bus_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = ProcessSink.from_spec("jsonl")
    memory = MemorySink()
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("events", sink, SinkPolicy(batch_delay=0.01, max_consecutive_failures=3))
    bus.add_sink("memory", memory, SinkPolicy(batch_delay=0.01))
    bus.open()
    events = metrics(range(100))
    for event in events[:50]:
        bus.publish(event)
    assert bus.flush(30)
    pid = sink.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: sink.returncode is not None)
    for event in events[50:]:
        bus.publish(event)
        time.sleep(0.001)
    assert not bus.flush(30)  # the dead sink does not acknowledge
    bus.close(30)
    health = bus.stats()["events"]
    assert health.delivered == 50 and health.failed + health.dropped == 50 and health.errors >= 1
    assert health.last_error is not None
    assert f"its worker process (pid {pid}) exited during write, exit code -9 (killed by SIGKILL)" in health.last_error
    assert "expbus sink 'events': write failed" in caplog.text
    assert memory.events == events  # the other sink got everything
    assert jsonl(tmp_path / "events.jsonl") == events[:50]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_training_goes_on_when_a_child_dies(tmp_path: Path, faulty: str) -> None:
    import lightning.pytorch as pl
    import torch

    from expbus.trainer_bridge import BridgeCallback
    from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression

    run_dir = tmp_path / "run"
    bridge = BridgeCallback({"run_dir": str(run_dir), "sinks": {
        "events": {"type": "jsonl"},
        "dies": {"type": faulty, "die_at_step": 10, "workers": "process", "batch_delay": 0.01},
    }})
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, log_every_n_steps=1, logger=False, callbacks=[bridge],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    torch.manual_seed(0)
    trainer.fit(DemoRegressor(lr=0.02), datamodule=SyntheticRegression(batch_size=16, train_size=640, val_size=16))
    assert trainer.global_step == 40
    events = read_journal(run_dir)
    assert isinstance(events[-1], RunFinished) and events[-1].status == "completed"
    assert jsonl(run_dir / "events.jsonl") == events
    dies = bridge.last_stats["dies"]
    assert dies.errors >= 1 and dies.last_error is not None
    assert "exit code -9 (killed by SIGKILL)" in dies.last_error
    assert all(step < 10 for step in faulty_steps(run_dir / "faulty.txt"))


@pytest.mark.slow
def test_close_deadline_is_kept_when_the_child_hangs(tmp_path: Path, faulty: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    sink = ProcessSink(faulty, {"hang": "close"}, close_timeout=1.0)
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("stuck", sink, SinkPolicy(batch_delay=0.01))
    bus.open()
    pid = sink.pid
    assert pid is not None
    for event in metrics(range(10)):
        bus.publish(event)
    bus_deadline = 60.0
    start = time.monotonic()
    ok = bus.close(bus_deadline)
    assert time.monotonic() - start < bus_deadline
    assert not ok
    assert sink.returncode == -signal.SIGKILL and gone(pid)
    assert faulty_steps(tmp_path / "faulty.txt") == list(range(10))  # the writes before the hang arrived
    assert "did not answer close within its deadline; killed" in (bus.stats()["stuck"].last_error or "")


@pytest.mark.slow
def test_a_hung_write_disables_the_sink_and_the_child_is_killed(tmp_path: Path, faulty: str) -> None:
    sink = ProcessSink(faulty, {"hang": "write"}, call_timeout=1.5)
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("stuck", sink, SinkPolicy(batch_delay=0.01, write_timeout=1.0))
    bus.open()
    pid = sink.pid
    assert pid is not None
    bus.publish(metrics(range(1))[0])
    assert wait_until(lambda: bus.stats()["stuck"].state == "disabled")
    assert "did not return within write_timeout" in (bus.stats()["stuck"].last_error or "")
    assert wait_until(lambda: sink.returncode is not None)
    assert sink.returncode == -signal.SIGKILL
    bus.close(30)


# -- signals and the parent's death ------------------------------------------------------------------
_PARENT = textwrap.dedent(
    '''
    import os, signal, sys, time
    from expbus.bus import Bus, Metrics, SinkPolicy
    from expbus.sinks._process import ProcessSink

    run_dir, mode = sys.argv[1], sys.argv[2]
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # a preemption handler: set a flag only
    sink = ProcessSink.from_spec("jsonl")
    bus = Bus(run_dir, journal=False)
    bus.add_sink("events", sink, SinkPolicy(batch_delay=0.01))
    bus.open()
    for i in range(20):
        bus.publish(Metrics(time=time.time(), step=i, values={"x": float(i)}))
    assert bus.flush(30)
    print(sink.pid, flush=True)
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    while not stop:
        time.sleep(0.01)
    # After the signal: the child is still there to take the last events and flush them.
    for i in range(20, 30):
        bus.publish(Metrics(time=time.time(), step=i, values={"x": float(i)}))
    ok = bus.flush(30) and bus.close(30)
    from expbus.sinks._process import wait_for_workers
    wait_for_workers(30)  # close returns once the child's sink closed; its exit follows
    print(sink.returncode, flush=True)
    sys.exit(0 if ok else 3)
    '''
)


def _start_parent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    return proc, child


@pytest.mark.slow
def test_a_signal_to_the_training_process_group_does_not_reach_the_child(tmp_path: Path) -> None:
    proc, child = _start_parent(tmp_path, "signal")
    try:
        os.kill(child, signal.SIGTERM)  # sent to the child directly: ignored by design
        os.kill(child, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGTERM)  # the job's process group: the parent's handler sets a flag
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert out.split() == ["0"]  # the child closed cleanly after the flush
    assert [e.step for e in jsonl(tmp_path / "events.jsonl")] == list(range(30))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_child_closes_its_sink_and_exits_when_the_parent_dies(tmp_path: Path) -> None:
    proc, child = _start_parent(tmp_path, "die")
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert wait_until(lambda: gone(child)), "the worker outlived its parent"
    assert [e.step for e in jsonl(tmp_path / "events.jsonl")] == list(range(20))  # type: ignore[attr-defined]
    assert "the training process went away; flushing and closing sink 'events'" in (
        tmp_path / ".expbus" / "workers" / "events.stderr").read_text()


@pytest.mark.slow
def test_a_sink_that_prints_does_not_break_the_protocol(tmp_path: Path, faulty: str,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    sink = ProcessSink.from_spec(faulty, chatty=True)
    bus = Bus(tmp_path, journal=False)
    bus.add_sink("chatty", sink, SinkPolicy(batch_delay=0.01))
    with bus:
        for event in metrics(range(30)):
            bus.publish(event)
    assert bus.stats()["chatty"].delivered == 30 and bus.stats()["chatty"].errors == 0
    assert "a line on stdout from the sink" in capfd.readouterr().out  # on this process's stdout


@pytest.mark.slow
def test_open_failure_in_the_child_names_the_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from expbus.bus import SinkOpenError

    # The directory where the jsonl file should go is a file: open fails in the child.
    (tmp_path / "blocked").write_text("")
    sink = ProcessSink.from_spec("jsonl", path="blocked/events.jsonl")
    bus = Bus(tmp_path, journal=False, sinks={"events": sink})
    with pytest.raises(SinkOpenError, match=r"sink 'events' failed to open: ChildSinkError: sink 'events' \(jsonl\) "
                                            r"in its worker process \(pid \d+\): open failed: "):
        bus.open()
    assert wait_until(lambda: sink.returncode is not None) and sink.returncode == 0


def test_a_dead_worker_error_names_sink_exit_code_and_stderr(tmp_path: Path) -> None:
    error = WorkerDiedError("x", sink_id="s", sink_type="jsonl", pid=1, returncode=-9, stderr_tail="tail")
    assert isinstance(error, ChildSinkError) and isinstance(error, RuntimeError)
    assert (error.sink_id, error.returncode, error.stderr_tail) == ("s", -9, "tail")


# -- the public sink contract, through a process ------------------------------------------------------
@pytest.mark.slow
class TestProcessJsonlContract(SinkContract):
    def make_sink(self, run_dir: Path) -> ProcessSink:
        return ProcessSink.from_spec("jsonl", path="events.jsonl")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        return metric_points(jsonl(run_dir / "events.jsonl"))


def test_context_round_trips_to_the_child_format(tmp_path: Path) -> None:
    import msgspec

    context = SinkContext(sink_id="a", run_dir=tmp_path, run_id="r", global_rank=1, world_size=2)
    data: Any = msgspec.to_builtins(context, enc_hook=str)
    back = msgspec.convert(data, SinkContext, dec_hook=lambda kind, value: Path(value) if kind is Path else value)
    assert back == context
