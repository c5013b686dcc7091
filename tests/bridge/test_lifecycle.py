"""The bridge's run lifecycle: start, hyperparameters, finish (completed, failed, interrupted), pickling, forks."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import msgspec
import pytest
import torch

from expbus.bus import Bus, Hyperparams, Metrics, RunFinished, RunStarted, Text, now, read_journal
from expbus.sinks import ConfigError, load_config
from expbus.sinks.testing import MemorySink, capture_events
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.demo import DemoRegressor

pytestmark = pytest.mark.slow


class _Spy(pl.Callback):
    """Keeps the bridge's bus (and anything else a test wants) from inside the run."""

    def __init__(self, bridge: BridgeCallback, pickle_it: bool = False) -> None:
        self.bridge = bridge
        self.pickle_it = pickle_it
        self.bus: Bus | None = None
        self.pickled: bytes | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bus is None:
            self.bus = self.bridge.bus
            if self.pickle_it:
                self.pickled = pickle.dumps(self.bridge)


class _Boom(DemoRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 5:
            raise ValueError("boom at step 5")
        return super().training_step(batch, batch_idx)


class _CtrlC(DemoRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 3:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_a_completed_run_reports_start_hparams_and_finish(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    memory = MemorySink()
    bridge = BridgeCallback({"run_dir": str(tmp_path / "run")}, sinks={"mem": memory})
    model, data = tiny()
    trainer = make_trainer([bridge])
    trainer.fit(model, datamodule=data)

    events = memory.events
    start = events[0]
    assert isinstance(start, RunStarted)
    assert start.run_id == bridge.run_id == (tmp_path / "run" / ".expbus" / "run_id").read_text().strip()
    assert (start.host, start.pid) == (socket.gethostname(), os.getpid())
    assert (start.global_rank, start.local_rank, start.world_size) == (0, 0, 1)
    assert start.run_dir == str(tmp_path / "run")
    assert start.config == msgspec.to_builtins(load_config({"run_dir": str(tmp_path / "run")}))
    hparams = [e for e in events if isinstance(e, Hyperparams)]
    assert len(hparams) == 1
    assert hparams[0].params == {"in_features": 4, "hidden": 8, "lr": 0.05, "train_size": 64, "val_size": 16,
                                 "batch_size": 8, "noise": 0.1, "seed": 0, "num_workers": 0,
                                 "multiprocessing_context": None}
    finish = events[-1]
    assert isinstance(finish, RunFinished)
    assert (finish.status, finish.error, finish.step) == ("completed", None, 24)
    assert sum(isinstance(e, RunFinished) for e in events) == 1
    # The bus is gone and Lightning is as it was.
    assert bridge.bus is None
    assert "log_metrics" not in trainer._logger_connector.__dict__
    assert "save_checkpoint" not in trainer.__dict__
    assert bridge.last_close_ok is True
    assert bridge.last_stats["mem"].delivered == len(events)
    assert bridge.last_journal_stats is not None and bridge.last_journal_stats.records == len(events)
    assert bridge.journal_path == tmp_path / "run" / "journal.msgpack"


def test_the_run_id_survives_a_resume_in_the_same_run_dir(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    ids = []
    for _ in range(2):
        bridge = BridgeCallback(run_dir=tmp_path / "run")
        model, data = tiny()
        make_trainer([bridge], max_steps=2, limit_val_batches=0).fit(model, datamodule=data)
        ids.append(bridge.run_id)
    assert ids[0] == ids[1]
    starts = [e for e in read_journal(tmp_path / "run") if isinstance(e, RunStarted)]
    assert [e.run_id for e in starts] == ids


def test_a_failing_training_step_reports_failed_and_closes_the_bus(tmp_path: Path, make_trainer: Any,
                                                                   tiny: Any) -> None:
    memory = MemorySink()
    bridge = BridgeCallback({"run_dir": str(tmp_path / "run"), "sinks": {"events": {"type": "jsonl"}}},
                            sinks={"mem": memory})
    spy = _Spy(bridge)
    model, data = tiny(_Boom)
    trainer = make_trainer([bridge, spy])
    with pytest.raises(ValueError, match="boom at step 5"):
        trainer.fit(model, datamodule=data)

    finish = memory.events[-1]
    assert isinstance(finish, RunFinished)
    assert finish.status == "failed"
    assert finish.error is not None and "ValueError: boom at step 5" in finish.error
    assert finish.step == 5
    assert spy.bus is not None and not spy.bus.is_open
    assert bridge.bus is None and bridge.last_close_ok is True
    assert "log_metrics" not in trainer._logger_connector.__dict__
    assert "save_checkpoint" not in trainer.__dict__
    journal = read_journal(tmp_path / "run")
    assert isinstance(journal[-1], RunFinished) and journal[-1].status == "failed"
    # Publishing after the close is a harmless no-op.
    spy.bus.publish(Metrics(time=now(), step=99, values={"x": 1.0}))


def test_ctrl_c_reports_interrupted(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    memory = MemorySink()
    bridge = BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})
    model, data = tiny(_CtrlC)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful exit(1)
            make_trainer([bridge]).fit(model, datamodule=data)
    finally:
        signal.signal(signal.SIGINT, previous)
    finish = memory.events[-1]
    assert isinstance(finish, RunFinished) and finish.status == "interrupted"
    assert bridge.bus is None


def test_capture_events_sees_the_run(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    model, data = tiny()
    with capture_events() as events:
        make_trainer([BridgeCallback(run_dir=tmp_path / "run")], max_steps=4).fit(model, datamodule=data)
    kinds = [type(e) for e in events]
    assert kinds[0] is RunStarted and kinds[-1] is RunFinished
    assert kinds.count(Metrics) >= 4
    assert Hyperparams in kinds


def test_the_callback_pickles_without_its_bus(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    bridge = BridgeCallback({"run_dir": str(tmp_path / "run"), "sinks": {"events": {"type": "jsonl"}}})
    before = pickle.loads(pickle.dumps(bridge))
    assert before.bus is None and before.run_dir == bridge.run_dir and before.config == bridge.config

    spy = _Spy(bridge, pickle_it=True)
    model, data = tiny()
    make_trainer([bridge, spy], max_steps=3).fit(model, datamodule=data)
    assert spy.bus is not None and spy.pickled is not None  # pickled while the bus was open
    during = pickle.loads(spy.pickled)
    assert during.bus is None and during.run_id == bridge.run_id
    after = pickle.loads(pickle.dumps(bridge))
    assert after.bus is None and after.last_stats.keys() == bridge.last_stats.keys()

    # The copy runs a run of its own, in the same run directory.
    model, data = tiny()
    make_trainer([during], max_steps=2).fit(model, datamodule=data)
    assert [type(e) for e in read_journal(tmp_path / "run")].count(RunFinished) == 2


class _LetTheSinksWrite(pl.Callback):
    """Before each epoch (when workers fork), give the sinks time to write: buffers are full at the fork."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        time.sleep(0.1)


def test_forked_dataloader_workers_break_nothing(tmp_path: Path, make_trainer: Any, tiny: Any,
                                                 readers: Any) -> None:
    bridge = BridgeCallback({"run_dir": str(tmp_path / "run"),
                             "sinks": {"events": {"type": "jsonl", "batch_delay": 0.0}}})

    class Publishing(torch.utils.data.Dataset[Any]):
        """Tries to publish from the worker: the forked bus must ignore it."""

        def __init__(self, base: Any) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, index: int) -> Any:
            if torch.utils.data.get_worker_info() is not None and bridge.bus is not None:
                bridge.bus.publish(Text(time=now(), step=index, name="worker", text=str(os.getpid())))
            return self.base[index]

    model, data = tiny(num_workers=2, multiprocessing_context="fork")
    data.setup("fit")
    original = data.train_dataloader

    def train_dataloader() -> Any:
        loader = original()
        return torch.utils.data.DataLoader(Publishing(loader.dataset), batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(0), num_workers=2,
                                           multiprocessing_context="fork")

    data.train_dataloader = train_dataloader  # type: ignore[method-assign]
    data.setup = lambda stage: None  # type: ignore[method-assign]
    make_trainer([bridge, _LetTheSinksWrite()]).fit(model, datamodule=data)

    journal = read_journal(tmp_path / "run")
    lines = readers.jsonl_events(tmp_path / "run" / "events.jsonl")
    assert not any(isinstance(e, Text) for e in journal)
    assert readers.as_json(lines) == readers.as_json(journal)  # nothing lost, nothing written twice
    assert [e.step for e in journal if isinstance(e, Metrics) and "train_loss_step" in e.values] == list(range(24))
    assert isinstance(journal[-1], RunFinished) and journal[-1].status == "completed"


def test_configuration_errors_raise_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sinks\.events\.type"):
        BridgeCallback({"sinks": {"events": {"type": "jsonll"}}})
    with pytest.raises(ConfigError, match="flush_timout"):
        BridgeCallback({"bus": {"flush_timout": 1}})
    with pytest.raises(ConfigError, match="name"):
        BridgeCallback({"name": "../escape"})
    with pytest.raises(ConfigError, match="does not exist"):
        BridgeCallback(tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="write"):
        BridgeCallback(sinks={"bad": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="already has a sink"):
        BridgeCallback({"sinks": {"events": {"type": "jsonl"}}}, sinks={"events": MemorySink()})


def test_yaml_and_dictconfig_configs(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    path = tmp_path / "expbus.yaml"
    path.write_text("exp_dir: exps\nname: mine\nversion: v1\nsinks:\n  events:\n    type: jsonl\n")
    from_yaml = BridgeCallback(path)
    assert from_yaml.run_dir == Path.cwd() / "exps" / "mine" / "v1"
    assert set(from_yaml.config.sinks) == {"events"}
    from_dictconfig = BridgeCallback(OmegaConf.create({"expbus": {"run_dir": str(tmp_path / "r")}}))
    assert from_dictconfig.run_dir == tmp_path / "r"
    overridden = BridgeCallback(path, run_dir=tmp_path / "elsewhere")
    assert overridden.run_dir == tmp_path / "elsewhere"
    assert overridden.config.run_dir == str(tmp_path / "elsewhere")


def test_nothing_is_created_before_setup(tmp_path: Path) -> None:
    bridge = BridgeCallback(run_dir=tmp_path / "run")
    assert bridge.bus is None and bridge.run_id is None
    assert not (tmp_path / "run").exists()


def test_validate_after_fit_is_a_second_session_of_the_same_run(tmp_path: Path, make_trainer: Any,
                                                                 tiny: Any) -> None:
    memory = MemorySink()
    bridge = BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})
    model, data = tiny()
    trainer = make_trainer([bridge], max_steps=8)
    trainer.fit(model, datamodule=data)
    fit_events = len(memory.events)
    trainer.validate(model, datamodule=data)

    session = memory.events[fit_events:]
    assert isinstance(session[0], RunStarted) and session[0].run_id == bridge.run_id
    assert isinstance(session[-1], RunFinished) and session[-1].status == "completed"
    assert [e.values for e in session if isinstance(e, Metrics)] == [{"val_loss": pytest.approx(
        float(trainer.callback_metrics["val_loss"]))}]
    assert bridge.bus is None
    assert [type(e) for e in read_journal(tmp_path / "run")].count(RunStarted) == 2


def test_hyperparams_follow_lightning_rules(tmp_path: Path, make_trainer: Any, tiny: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from omegaconf import OmegaConf

    class Odd(DemoRegressor):
        def __init__(self, in_features: int = 4, hidden: int = 8, lr: float = 0.05, seed: int = 7,
                     extra: Any = None) -> None:
            super().__init__(in_features, hidden, lr)
            self.save_hyperparameters()

    memory = MemorySink()
    model, data = tiny()
    model = Odd(extra={"path": Path("/x"), "tensor": torch.tensor([1.0, 2.0]), "cfg": OmegaConf.create({"a": 1})})
    make_trainer([BridgeCallback(run_dir=tmp_path / "a", sinks={"mem": memory})], max_steps=1,
                 limit_val_batches=0).fit(model, datamodule=data)
    (params,) = [e.params for e in memory.events if isinstance(e, Hyperparams)]
    assert params["seed"] == 0  # the data module's value wins, as in Lightning's merge
    assert params["extra"] == {"path": "/x", "tensor": [1.0, 2.0], "cfg": {"a": 1}}
    assert "differ between the LightningModule and the LightningDataModule" in caplog.text

    memory = MemorySink()
    model, data = tiny()
    make_trainer([BridgeCallback(run_dir=tmp_path / "b", sinks={"mem": memory})], max_steps=1,
                 limit_val_batches=0, enable_autolog_hparams=False).fit(model, datamodule=data)
    assert not any(isinstance(e, Hyperparams) for e in memory.events)


def test_flush_and_live_stats_during_a_run(tmp_path: Path, make_trainer: Any, tiny: Any) -> None:
    memory = MemorySink()
    bridge = BridgeCallback(run_dir=tmp_path / "run", sinks={"mem": memory})
    seen: dict[str, Any] = {}

    class Flusher(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if "flushed" not in seen:
                seen["flushed"] = bridge.flush(5.0)
                seen["delivered"] = bridge.stats()["mem"].delivered
                seen["in_memory"] = len(memory.events)

    model, data = tiny()
    assert bridge.flush() is False  # no bus yet
    make_trainer([bridge, Flusher()], max_steps=10).fit(model, datamodule=data)
    assert seen["flushed"] is True
    assert seen["delivered"] == seen["in_memory"] > 8
    assert bridge.stats() == bridge.last_stats
