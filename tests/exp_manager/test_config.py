"""ExpManagerConfig: NeMo's fields and defaults, OmegaConf's coercions, and errors that name the key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import msgspec
import pytest
from omegaconf import OmegaConf

from expbus.sinks import ConfigError
from expbus.trainer_bridge.exp_manager import ExpManagerConfig, load_exp_manager_config
from expbus.trainer_bridge.exp_manager._config import NEMO_FIELDS, parse_max_time

# NeMo main @8cfedd72, nemo/utils/exp_manager.py: ExpManagerConfig's fields in order.
NEMO_EXP_MANAGER_FIELDS = [
    "explicit_log_dir", "exp_dir", "name", "version", "use_datetime_version", "resume_if_exists",
    "resume_past_end", "resume_ignore_no_checkpoint", "resume_from_checkpoint", "create_tensorboard_logger",
    "summary_writer_kwargs", "create_wandb_logger", "wandb_logger_kwargs", "create_mlflow_logger",
    "mlflow_logger_kwargs", "create_dllogger_logger", "dllogger_logger_kwargs", "create_clearml_logger",
    "clearml_logger_kwargs", "create_neptune_logger", "neptune_logger_kwargs", "create_checkpoint_callback",
    "checkpoint_callback_params", "create_early_stopping_callback", "create_ipl_epoch_stopper_callback",
    "early_stopping_callback_params", "ipl_epoch_stopper_callback_params", "create_preemption_callback",
    "files_to_copy", "log_step_timing", "log_delta_step_timing", "step_timing_kwargs", "log_local_rank_0_only",
    "log_global_rank_0_only", "disable_validation_on_resume", "ema", "max_time_per_run", "seconds_to_sleep",
    "create_straggler_detection_callback", "straggler_detection_params", "create_fault_tolerance_callback",
    "fault_tolerance", "log_tflops_per_sec_per_gpu",
]


def test_every_nemo_field_with_its_default_and_attribute_access() -> None:
    assert list(NEMO_FIELDS) == NEMO_EXP_MANAGER_FIELDS
    cfg = ExpManagerConfig()
    assert cfg.ema.enable is False and cfg.ema.decay == 0.999 and cfg.ema.every_n_steps == 1
    assert cfg.checkpoint_callback_params.save_top_k == 3
    assert cfg.checkpoint_callback_params.monitor == "val_loss"
    assert cfg.checkpoint_callback_params.postfix == ".nemo"
    assert cfg.early_stopping_callback_params.patience == 10
    assert cfg.step_timing_kwargs.buffer_size == 1 and cfg.step_timing_kwargs.reduction == "mean"
    assert cfg.mlflow_logger_kwargs.save_dir == "./mlruns"
    assert cfg.dllogger_logger_kwargs.json_file == "./dllogger.json"
    assert cfg.clearml_logger_kwargs.project is None
    assert cfg.fault_tolerance.rank_heartbeat_timeout == 45 * 60.0
    assert (cfg.exp_dir, cfg.name, cfg.version, cfg.explicit_log_dir) == (None, None, None, None)
    assert cfg.use_datetime_version and cfg.create_tensorboard_logger and cfg.create_checkpoint_callback
    assert cfg.create_preemption_callback and cfg.log_step_timing and cfg.disable_validation_on_resume
    assert not cfg.resume_if_exists and not cfg.create_wandb_logger and cfg.seconds_to_sleep == 5
    assert cfg.sinks == {} and cfg.journal.enabled
    assert load_exp_manager_config(None) == cfg
    assert load_exp_manager_config({}) == cfg


def test_scalars_are_coerced_as_omegaconf_does() -> None:
    cfg = load_exp_manager_config({
        "resume_if_exists": 0,
        "resume_ignore_no_checkpoint": "yes",
        "use_datetime_version": "False",
        "version": 957,
        "name": 123,
        "seconds_to_sleep": "60",
        "ema": {"decay": "0.5", "every_n_steps": "2"},
        "checkpoint_callback_params": {"save_top_k": "-1", "every_n_epochs": 1.0},
    })
    assert cfg.resume_if_exists is False and cfg.resume_ignore_no_checkpoint is True
    assert cfg.use_datetime_version is False
    assert cfg.version == "957" and cfg.name == "123"
    assert cfg.seconds_to_sleep == 60.0
    assert cfg.ema.decay == 0.5 and cfg.ema.every_n_steps == 2
    assert cfg.checkpoint_callback_params.save_top_k == -1 and cfg.checkpoint_callback_params.every_n_epochs == 1


def test_missing_values_inside_the_block_keep_the_default() -> None:
    cfg = load_exp_manager_config({"exp_dir": "???", "ema": {"decay": "???"}, "name": "x"})
    assert cfg.exp_dir is None and cfg.ema.decay == 0.999 and cfg.name == "x"


def test_missing_value_in_logger_kwargs_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config({"wandb_logger_kwargs": {"name": "a", "project": "???"}})
    assert info.value.path == "exp_manager.wandb_logger_kwargs.project"


def test_null_params_block_means_the_defaults() -> None:
    cfg = load_exp_manager_config({"ema": None, "checkpoint_callback_params": None})
    assert cfg.ema == ExpManagerConfig().ema
    assert cfg.checkpoint_callback_params.save_top_k == 3


@pytest.mark.parametrize(
    ("block", "path", "hint"),
    [
        ({"nullname": "x"}, "exp_manager.nullname", "did you mean name?"),
        ({"checkpoint_callback_params": {"save_top": 1}}, "exp_manager.checkpoint_callback_params.save_top",
         "did you mean save_top_k?"),
        ({"ema": {"decy": 0.9}}, "exp_manager.ema.decy", "did you mean decay?"),
        ({"step_timing_kwargs": {"buffer": 3}}, "exp_manager.step_timing_kwargs.buffer", "did you mean buffer_size?"),
        ({"mlflow_logger_kwargs": {"experiment": "e"}}, "exp_manager.mlflow_logger_kwargs.experiment",
         "did you mean experiment_name?"),
    ],
)
def test_unknown_keys_name_the_path_and_the_close_match(block: dict[str, object], path: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config(block)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: unknown key; {hint}")


@pytest.mark.parametrize(
    ("block", "path"),
    [
        ({"resume_if_exists": "maybe"}, "exp_manager.resume_if_exists"),
        ({"seconds_to_sleep": True}, "exp_manager.seconds_to_sleep"),
        ({"files_to_copy": "a.txt"}, "exp_manager.files_to_copy"),
        ({"ema": {"every_n_steps": "often"}}, "exp_manager.ema.every_n_steps"),
        ({"step_timing_kwargs": {"reduction": "median"}}, "exp_manager.step_timing_kwargs.reduction"),
        ({"checkpoint_callback_params": {"mode": "up"}}, "exp_manager.checkpoint_callback_params.mode"),
        ({"early_stopping_callback_params": {"mode": "up"}}, "exp_manager.early_stopping_callback_params.mode"),
    ],
)
def test_bad_values_name_the_path_and_the_value(block: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config(block)
    assert info.value.path == path
    assert str(info.value).startswith(path)


def test_ema_enabled_is_accepted_as_nemos_docs_spell_it() -> None:
    assert load_exp_manager_config({"ema": {"enabled": True}}).ema.enable is True
    with pytest.raises(ConfigError, match=r"exp_manager\.ema\.enabled: same setting as exp_manager\.ema\.enable"):
        load_exp_manager_config({"ema": {"enable": False, "enabled": True}})


def test_a_node_resolves_against_the_whole_config_with_nemos_resolvers() -> None:
    if OmegaConf.has_resolver("multiply"):
        OmegaConf.clear_resolver("multiply")  # load_exp_manager_config provides it, as NeMo's import does
    root = OmegaConf.create({
        "name": "gpt",
        "model": {"lr": 0.1, "tp": 2, "pp": 4},
        "exp_manager": {
            "name": "${name}-lr${model.lr}",
            "version": "${multiply:${model.tp},${model.pp}}",
            "checkpoint_callback_params": {"monitor": "val_wer",
                                           "filename": "${exp_manager.name}--{${exp_manager.checkpoint_callback_params.monitor}:.3f}"},
        },
    })
    cfg = load_exp_manager_config(root.exp_manager)
    assert cfg.name == "gpt-lr0.1" and cfg.version == "8"
    assert cfg.checkpoint_callback_params.filename == "gpt-lr0.1--{val_wer:.3f}"
    # A whole config with an exp_manager: block uses that block.
    assert load_exp_manager_config(root) == cfg
    assert load_exp_manager_config({"exp_manager": root.exp_manager}) == cfg


def test_an_unresolvable_interpolation_names_the_key() -> None:
    root = OmegaConf.create({"exp_manager": {"name": "${nowhere}"}})
    with pytest.raises(ConfigError, match=r"exp_manager\.name: cannot resolve"):
        load_exp_manager_config(root.exp_manager)


def test_yaml_file_and_config_instances(tmp_path: Path) -> None:
    path = tmp_path / "em.yaml"
    path.write_text("exp_manager:\n  name: from_file\n  resume_if_exists: 1\n")
    cfg = load_exp_manager_config(path)
    assert cfg.name == "from_file" and cfg.resume_if_exists is True
    assert load_exp_manager_config(cfg) is cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_exp_manager_config(tmp_path / "nope.yaml")


def test_sinks_map_is_checked_like_expbus_yaml() -> None:
    cfg = load_exp_manager_config({"sinks": {"events": {"type": "jsonl"}}})
    assert cfg.sinks == {"events": {"type": "jsonl"}}
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config({"sinks": {"events": {"type": "jsnl"}}})
    assert info.value.path == "exp_manager.sinks.events.type" and "did you mean jsonl?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config({"sinks": {"events": {"type": "jsonl", "pth": "x"}}})
    assert info.value.path == "exp_manager.sinks.events.pth"
    # The loggers' sink ids are taken while the logger is on.
    with pytest.raises(ConfigError, match=r"exp_manager\.sinks\.tensorboard: this sink id is taken"):
        load_exp_manager_config({"sinks": {"tensorboard": {"type": "jsonl"}}})
    assert load_exp_manager_config({"create_tensorboard_logger": False, "sinks": {"tensorboard": {"type": "jsonl"}}})


@pytest.mark.parametrize("value", ["../up", "/abs/name", "a/../../b"])
def test_names_that_leave_exp_dir_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="would leave exp_dir"):
        load_exp_manager_config({"name": value})
    with pytest.raises(ConfigError, match=r"exp_manager\.version"):
        load_exp_manager_config({"version": value})


def test_value_checks_nemo_makes_later() -> None:
    with pytest.raises(ConfigError, match="log_local_rank_0_only"):
        load_exp_manager_config({"log_local_rank_0_only": True, "log_global_rank_0_only": True})
    with pytest.raises(ConfigError, match=r"exp_manager\.files_to_copy\[0\]"):
        load_exp_manager_config({"files_to_copy": ["missing.txt"]})
    with pytest.raises(ConfigError, match="seconds_to_sleep"):
        load_exp_manager_config({"seconds_to_sleep": -1})


def test_max_time_per_run_forms() -> None:
    assert parse_max_time("00:03:50:00") == dt.timedelta(hours=3, minutes=50)
    assert parse_max_time("1:00:00:00") == dt.timedelta(days=1)
    # YAML 1.1 reads an unquoted 1:00:00 as the base-60 number 3600: seconds.
    assert parse_max_time(3600) == dt.timedelta(hours=1)
    assert load_exp_manager_config({"max_time_per_run": 3600}).max_time_per_run == 3600
    assert load_exp_manager_config({"max_time_per_run": "00:00:01:00"}).max_time_per_run == "00:00:01:00"
    for bad in ("1:00", "soon", 0, "00:00:00:00"):
        with pytest.raises(ConfigError, match=r"exp_manager\.max_time_per_run"):
            load_exp_manager_config({"max_time_per_run": bad})


def test_round_trip_through_builtins() -> None:
    cfg = load_exp_manager_config({"name": "x", "ema": {"decay": 0.9}, "sinks": {"e": {"type": "jsonl"}}})
    again = load_exp_manager_config(msgspec.to_builtins(cfg))
    assert again == cfg
