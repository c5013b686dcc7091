"""exp_manager() as a whole: NeMo's entry checks, what it attaches, errors before disk, a resumed run that continues."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from expbus.bus import Metrics, RunFinished, RunStarted, Timing, read_journal
from expbus.sinks import ConfigError
from expbus.sinks.testing import MemorySink
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.exp_manager import (
    CheckpointMisconfigurationError,
    ExpManagerConfig,
    NotFoundError,
    exp_manager,
)
from expbus.trainer_bridge.exp_manager._callbacks import StepTimingCallback
from expbus.trainer_bridge.exp_manager._dirs import LogDirAgreement

REPO_ROOT = Path(__file__).resolve().parents[2]
QUIET = {"create_tensorboard_logger": False, "create_checkpoint_callback": False}


def test_no_config_logs_an_error_and_does_nothing(make_trainer: Callable[..., pl.Trainer],
                                                  caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    trainer = make_trainer()
    before = list(trainer.callbacks)  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="expbus.exp_manager"):
        assert exp_manager(trainer, None) is None
    assert "did not receive a cfg argument" in caplog.text
    assert trainer.callbacks == before and list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]


def test_fast_dev_run_returns_none(make_trainer: Callable[..., pl.Trainer], tmp_path: Path) -> None:
    assert exp_manager(make_trainer(fast_dev_run=True), {"name": "x"}) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "block",
    [
        {"unused": 1},  # NeMo's test_omegaconf
        {"ema": {"enable": True, "decay": 1.5}},
        {"summary_writer_kwargs": {"log_dir": "x"}},
        {"create_wandb_logger": True},
        {"sinks": {"e": {"type": "nope"}}},
        {"wandb_logger_kwargs": {"project": "p", "id": "a/b"}, "create_wandb_logger": True},
        # NeMo's default every_n_epochs: 1 and a step interval cannot both hold.
        {"checkpoint_callback_params": {"every_n_train_steps": 5}},
    ],
)
def test_config_errors_come_before_anything_on_disk(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                                                    block: dict[str, Any]) -> None:
    trainer = make_trainer()
    before = list(trainer.callbacks)  # type: ignore[attr-defined]
    with pytest.raises((ConfigError, CheckpointMisconfigurationError)):
        exp_manager(trainer, block)
    assert list(tmp_path.iterdir()) == []
    assert trainer.callbacks == before  # type: ignore[attr-defined]


def test_checkpoint_configurations(make_trainer: Callable[..., pl.Trainer]) -> None:
    # NeMo's test_checkpoint_configurations: the Trainer's own ModelCheckpoint and exp_manager's clash.
    trainer = make_trainer(enable_checkpointing=True)
    with pytest.raises(CheckpointMisconfigurationError):
        exp_manager(trainer, {"create_tensorboard_logger": False})
    exp_manager(make_trainer(enable_checkpointing=True), QUIET)
    exp_manager(make_trainer(), {"create_tensorboard_logger": False})


def test_what_it_attaches(make_trainer: Callable[..., pl.Trainer], tmp_path: Path) -> None:
    trainer = make_trainer()
    log_dir = exp_manager(trainer, {"exp_dir": "exps", "name": "n"})
    assert log_dir is not None and log_dir.parent == tmp_path / "exps" / "n"
    assert trainer.default_root_dir == str(log_dir)
    kinds = [type(cb).__name__ for cb in trainer.callbacks]  # type: ignore[attr-defined]
    assert kinds[0] == StepTimingCallback.__name__ and LogDirAgreement.__name__ in kinds
    bridge = next(cb for cb in trainer.callbacks if isinstance(cb, BridgeCallback))  # type: ignore[attr-defined]
    assert bridge.run_dir == log_dir and bridge.config.name == "n" and bridge.config.version == log_dir.name
    assert trainer.checkpoint_callback is not None
    assert Path(trainer.checkpoint_callback.dirpath) == log_dir / "checkpoints"  # type: ignore[attr-defined]
    assert trainer.logger is None


def test_accepts_dictconfig_nodes_whole_configs_and_instances(make_trainer: Callable[..., pl.Trainer],
                                                              tmp_path: Path) -> None:
    root = OmegaConf.create({"name": "demo", "exp_manager": {"name": "${name}", "version": "v", **QUIET}})
    assert exp_manager(make_trainer(), root.exp_manager) == tmp_path / "nemo_experiments" / "demo" / "v"
    assert exp_manager(make_trainer(), root) == tmp_path / "nemo_experiments" / "demo" / "v"
    config = ExpManagerConfig(name="inst", version="v", create_tensorboard_logger=False,
                              create_checkpoint_callback=False)
    assert exp_manager(make_trainer(), config) == tmp_path / "nemo_experiments" / "inst" / "v"


def test_extra_sink_objects(make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any]) -> None:
    sink = MemorySink()
    trainer = make_trainer(max_steps=3)
    exp_manager(trainer, {"explicit_log_dir": "run", **QUIET}, sinks={"mine": sink})
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    assert isinstance(sink.events[0], RunStarted) and isinstance(sink.events[-1], RunFinished)


def test_resume_without_checkpoints_fails_before_making_folders(make_trainer: Callable[..., pl.Trainer],
                                                                tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        exp_manager(make_trainer(), {"exp_dir": "exps", "resume_if_exists": True})
    assert not (tmp_path / "exps").exists()
    log_dir = exp_manager(make_trainer(), {"exp_dir": "exps", "resume_if_exists": True,
                                           "resume_ignore_no_checkpoint": True})
    assert log_dir == tmp_path / "exps" / "default"


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resumed_run_continues_its_log_dir_and_sinks(make_trainer: Callable[..., pl.Trainer],
                                                       tiny: Callable[..., Any], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    block = {"exp_dir": "exps", "name": "n", "resume_if_exists": True, "resume_ignore_no_checkpoint": True,
             "checkpoint_callback_params": {"monitor": None, "filename": "{step}", "every_n_epochs": 1}}
    first = make_trainer(max_steps=4)
    log_dir = exp_manager(first, block)
    assert log_dir is not None
    model, data = tiny()
    first.fit(model, datamodule=data)
    event_files = list(log_dir.glob("events.out.tfevents*"))

    second = make_trainer(max_steps=8)
    assert exp_manager(second, block) == log_dir
    assert Path(second.ckpt_path).name == "step=4-last.ckpt"  # type: ignore[arg-type]
    model, data = tiny()
    second.fit(model, datamodule=data)
    assert second.global_step == 8

    # The earlier run's records moved into run_0; TensorBoard, the journal and the sinks' state stay.
    assert (log_dir / "run_0" / "lightning_logs.txt").is_file() and (log_dir / "run_0" / "cmd-args.log").is_file()
    assert list(log_dir.glob("events.out.tfevents*")) == event_files
    journal = read_journal(log_dir)
    steps = [e.step for e in journal if isinstance(e, Metrics) and "train_loss" in e.values]
    assert steps == list(range(8))
    assert len({e.run_id for e in journal if isinstance(e, RunStarted)}) == 1
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(8))
    saved = torch.load(log_dir / "checkpoints" / "step=8-last.ckpt", weights_only=False)
    assert saved["global_step"] == 8


_DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch
sys.path.insert(0, sys.argv[2])
from conftest import TinyData, TinyModel
from expbus.trainer_bridge.exp_manager import exp_manager

if __name__ == "__main__":
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, log_every_n_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    log_dir = exp_manager(trainer, {"exp_dir": sys.argv[1], "name": "ddp",
                                    "checkpoint_callback_params": {"monitor": None, "filename": "{step}"}})
    torch.manual_seed(0)
    trainer.fit(TinyModel(), datamodule=TinyData())
    print("LOGDIR", log_dir)
"""


@pytest.mark.slow
@pytest.mark.timeout(115)
def test_ddp_spawn_on_two_cpu_processes(tmp_path: Path) -> None:
    # In a process of its own (spawned workers pickle the Trainer with exp_manager's callbacks).
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "NEMO_EXPM_VERSION"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "exps"), str(Path(__file__).parent)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = Path(next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("LOGDIR")))
    assert list((tmp_path / "exps" / "ddp").iterdir()) == [log_dir]
    rank0, rank1 = read_journal(log_dir), read_journal(log_dir / "journal.rank1.msgpack")
    for journal in (rank0, rank1):
        assert isinstance(journal[-1], RunFinished) and journal[-1].status == "completed"
        assert [e.step for e in journal if isinstance(e, Timing)] == list(range(4))
    assert list(log_dir.glob("events.out.tfevents*"))
    assert (log_dir / "checkpoints" / "step=4-last.ckpt").is_file()
