"""NeMo's logger switches become sinks on the run's bus; NeMo's logger checks and misconfiguration errors stay."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from expbus.sinks import ConfigError
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.exp_manager import LoggerMisconfigurationError, exp_manager, load_exp_manager_config
from expbus.trainer_bridge.exp_manager._loggers import logger_sinks


def sinks_of(block: dict[str, Any], *, name: str = "exp", version: str | None = "v1",
             exp_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    config = load_exp_manager_config(block)
    return logger_sinks(config, exp_dir=exp_dir or Path.cwd() / "exps", name=name, version=version)


def bridge_of(trainer: pl.Trainer) -> BridgeCallback:
    return next(cb for cb in trainer.callbacks if isinstance(cb, BridgeCallback))  # type: ignore[attr-defined]


def test_tensorboard_by_default_with_summary_writer_kwargs() -> None:
    assert sinks_of({}) == {"tensorboard": {"type": "tensorboard"}}
    assert sinks_of({"summary_writer_kwargs": None}) == {"tensorboard": {"type": "tensorboard"}}
    specs = sinks_of({"summary_writer_kwargs": {"flush_secs": 5, "max_queue": 3, "comment": "ignored"}})
    assert specs == {"tensorboard": {"type": "tensorboard", "flush_secs": 5, "max_queue": 3}}
    assert sinks_of({"create_tensorboard_logger": False}) == {}


@pytest.mark.parametrize(
    ("kwargs", "path", "text"),
    [
        ({"log_dir": "x"}, "exp_manager.summary_writer_kwargs.log_dir", "You cannot pass `log_dir`"),
        ({"flush_sec": 5}, "exp_manager.summary_writer_kwargs.flush_sec", "did you mean flush_secs?"),
        ({"log_graph": True}, "exp_manager.summary_writer_kwargs.log_graph", "does not write the model graph"),
        ({"max_queue": "many"}, "exp_manager.summary_writer_kwargs.max_queue", "Expected `int`"),
    ],
)
def test_summary_writer_kwargs_errors_name_the_key(kwargs: dict[str, Any], path: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config({"summary_writer_kwargs": kwargs})
    assert info.value.path == path and text in str(info.value)


def test_wandb_needs_name_or_project_as_in_nemo() -> None:
    with pytest.raises(ValueError, match="name and project are required for wandb_logger"):
        load_exp_manager_config({"create_wandb_logger": True})
    with pytest.raises(ValueError, match="name and project are required"):
        load_exp_manager_config({"create_wandb_logger": True, "wandb_logger_kwargs": {"offline": True}})
    # The keys must be there; null values pass, as NeMo's check (asr_lang_id_titanet_large).
    assert load_exp_manager_config({"create_wandb_logger": True, "wandb_logger_kwargs": {"name": None,
                                                                                         "project": None}})


def test_wandb_mapping(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    block = {"create_tensorboard_logger": False, "create_wandb_logger": True,
             "wandb_logger_kwargs": {"name": "n", "project": "p", "offline": True}}
    spec = sinks_of(block, exp_dir=tmp_path / "exps")["wandb"]
    # NeMo: save_dir defaults to exp_dir; the version is the run id.
    assert spec == {"type": "wandb", "name": "n", "project": "p", "offline": True,
                    "save_dir": str(tmp_path / "exps"), "id": "v1"}
    # A W&B id in the kwargs wins over the version; relative save_dir is relative to the cwd.
    block["wandb_logger_kwargs"] = {"name": "n", "project": "p", "id": "mine", "save_dir": "wb"}
    spec = sinks_of(block)["wandb"]
    assert spec["id"] == "mine" and spec["save_dir"] == str(tmp_path / "wb")
    # Without a version folder (resume_if_exists), the sink keeps its own id per log dir.
    block["wandb_logger_kwargs"] = {"name": "n", "project": "p"}
    assert "id" not in sinks_of(block, version=None)["wandb"]
    # Other keys go to wandb.init; a near miss of a sink option is logged.
    block["wandb_logger_kwargs"] = {"project": "p", "entitty": "team", "anonymous": "allow"}
    with caplog.at_level(logging.WARNING, logger="expbus.exp_manager"):
        spec = sinks_of(block)["wandb"]
    assert spec["anonymous"] == "allow" and "did you mean entity?" in caplog.text
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config({**block, "wandb_logger_kwargs": {"project": "p", "tags": "not-a-list"}})
    assert info.value.path == "exp_manager.wandb_logger_kwargs.tags"
    with pytest.raises(ConfigError, match=r"exp_manager\.wandb_logger_kwargs: "):
        sinks_of({**block, "wandb_logger_kwargs": {"project": "p", "id": "bad/id"}})


def test_mlflow_mapping(tmp_path: Path) -> None:
    block = {"create_tensorboard_logger": False, "create_mlflow_logger": True}
    spec = sinks_of(block)["mlflow"]
    # NeMo's save_dir ./mlruns (cwd) holds a SQLite store; experiment = name, run = version.
    assert spec == {"type": "mlflow", "experiment_name": "exp", "run_name": "v1",
                    "save_dir": str(tmp_path / "mlruns"), "prefix": "", "log_model": False}
    block["mlflow_logger_kwargs"] = {"experiment_name": "e", "run_name": "r", "tracking_uri": "sqlite:///x.db",
                                     "tags": {"a": 1}, "run_id": "abc"}
    spec = sinks_of(block)["mlflow"]
    assert (spec["experiment_name"], spec["run_name"], spec["tracking_uri"], spec["tags"], spec["run_id"]) == (
        "e", "r", "sqlite:///x.db", {"a": 1}, "abc")


def test_dllogger_mapping(tmp_path: Path) -> None:
    block: dict[str, Any] = {"create_tensorboard_logger": False, "create_dllogger_logger": True}
    # NeMo's default ./dllogger.json: inside the log dir (one file per run, continued on resume).
    assert sinks_of(block)["dllogger"] == {"type": "dllogger", "json_file": "dllogger.json", "stdout": False,
                                           "verbose": False}
    block["dllogger_logger_kwargs"] = {"json_file": None, "stdout": True, "verbose": True}
    assert sinks_of(block)["dllogger"] == {"type": "dllogger", "json_file": None, "stdout": True, "verbose": True}


def test_clearml_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    block = {"create_tensorboard_logger": False, "create_clearml_logger": True,
             "clearml_logger_kwargs": {"project": "proj", "tags": ["a"], "log_model": True}}
    spec = sinks_of(block)["clearml"]
    assert spec == {"type": "clearml", "project": "proj", "task": "Trainer exp", "connect_pytorch": False,
                    "model_name": "exp", "tags": ["a"], "log_model": True, "log_cfg": False, "log_metrics": False}
    # NeMo lets CLEARML_PROJECT / CLEARML_TASK win over the configuration.
    monkeypatch.setenv("CLEARML_TASK", "from-env")
    monkeypatch.setenv("CLEARML_PROJECT", "env-proj")
    spec = sinks_of(block)["clearml"]
    assert spec["task"] is None and spec["project"] is None


def test_neptune_mapping_and_nemos_check() -> None:
    with pytest.raises(ValueError, match="name and project are required for neptune_logger"):
        load_exp_manager_config({"create_neptune_logger": True})
    block = {"create_tensorboard_logger": False, "create_neptune_logger": True,
             "neptune_logger_kwargs": {"project": "ws/p", "name": "n", "prefix": "train",
                                       "log_model_checkpoints": False, "tags": None, "description": None}}
    assert sinks_of(block)["neptune"] == {"type": "neptune", **block["neptune_logger_kwargs"]}  # type: ignore[dict-item]


def test_disabled_loggers_kwargs_are_not_checked() -> None:
    # nlp_megatron_gpt_config: Neptune kwargs with Neptune off.
    assert load_exp_manager_config({"create_neptune_logger": False, "neptune_logger_kwargs": {"anything": 1}})


def test_loggers_and_sinks_map_together(make_trainer: Callable[..., pl.Trainer], tmp_path: Path) -> None:
    trainer = make_trainer()
    log_dir = exp_manager(trainer, {"explicit_log_dir": "run", "create_checkpoint_callback": False,
                                    "create_dllogger_logger": True, "sinks": {"events": {"type": "jsonl"}}})
    bridge = bridge_of(trainer)
    assert bridge.run_dir == log_dir == tmp_path / "run"
    assert set(bridge.config.sinks) == {"tensorboard", "dllogger", "events"}
    assert trainer.logger is None  # no Lightning logger: the sinks are on the bus


def test_logged_metrics_and_timings_reach_tensorboard_and_dllogger(make_trainer: Callable[..., pl.Trainer],
                                                                   tiny: Callable[..., Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(max_steps=6)
    log_dir = exp_manager(trainer, {"explicit_log_dir": "run", "create_checkpoint_callback": False,
                                    "create_dllogger_logger": True})
    assert log_dir is not None
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(6))
    assert [e.step for e in events.Scalars("train_step_timing")] == list(range(6))
    lines = [json.loads(line[len("DLLL "):]) for line in (log_dir / "dllogger.json").read_text().splitlines()]
    assert [line["step"] for line in lines if "train_loss" in line["data"]] == list(range(6))


# -- NeMo's test_trainer_loggers -----------------------------------------------------------
@pytest.mark.parametrize(
    "block",
    [
        {"exp_dir": "somewhere"},
        {"explicit_log_dir": "somewhere"},
        {"resume_if_exists": True},
        {"create_tensorboard_logger": False, "name": "n"},
        {"create_tensorboard_logger": False, "create_mlflow_logger": True},
        {"create_tensorboard_logger": False, "sinks": {"e": {"type": "jsonl"}}},
        {"create_tensorboard_logger": False, "resume_if_exists": True, "resume_ignore_no_checkpoint": True},
    ],
)
def test_a_trainer_with_a_logger_is_refused(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                                            block: dict[str, Any]) -> None:
    trainer = make_trainer(logger=True)
    with pytest.raises(LoggerMisconfigurationError, match="logger=False"):
        exp_manager(trainer, {"create_checkpoint_callback": False, **block})
    assert list(tmp_path.iterdir()) == []


def test_a_trainer_with_a_logger_logs_where_its_logger_does(make_trainer: Callable[..., pl.Trainer],
                                                            tmp_path: Path) -> None:
    trainer = make_trainer(logger=True, default_root_dir=str(tmp_path))
    log_dir = exp_manager(trainer, {"create_tensorboard_logger": False, "create_checkpoint_callback": False})
    assert log_dir == tmp_path / "lightning_logs" / "version_0" and log_dir.is_dir()


def test_a_trainer_with_its_own_bridge_is_refused(make_trainer: Callable[..., pl.Trainer]) -> None:
    trainer = make_trainer(callbacks=[BridgeCallback()])
    with pytest.raises(LoggerMisconfigurationError, match="already has a BridgeCallback"):
        exp_manager(trainer, {"create_checkpoint_callback": False})
