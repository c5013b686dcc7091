"""Real NeMo ``exp_manager:`` blocks (../shared/nemo_configs): each loads to the values NeMo's schema merge gives, and runs.

NeMo's own validation is emulated as INDEX.md describes: its dataclasses (copied below from
NVIDIA/NeMo @8cfedd72, Apache-2.0) merged with the block resolved against the whole config.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import msgspec
import pytest
from omegaconf import OmegaConf

from expbus.sinks import ConfigError
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.ema import EMA
from expbus.trainer_bridge.exp_manager import NotFoundError, exp_manager, load_exp_manager_config

# A copy of ../shared/nemo_configs (the corpus beside the repository) travels with the tests,
# so a clone without shared/ still checks every real NeMo block.
NEMO_CONFIGS = Path(__file__).resolve().parent / "nemo_configs"

FILES = sorted(p for p in NEMO_CONFIGS.glob("*.yaml") if p.name != "multirun_voicebox_hparams_search_example.yaml")
POSITIVE = [p for p in FILES if not p.name.startswith("invalid_")]


# -- NeMo's schema (nemo/utils/exp_manager.py and nemo/utils/loggers/*.py @8cfedd72) -------------
@dataclass
class EarlyStoppingParams:
    monitor: str = "val_loss"
    mode: str = "min"
    min_delta: float = 0.001
    patience: int = 10
    verbose: bool = True
    strict: bool = True
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None
    check_on_train_epoch_end: bool | None = None
    log_rank_zero_only: bool = False


@dataclass
class IPLEpochStopperParams:
    enable_stop: bool = True
    stop_every_n_epochs: int = 1


@dataclass
class CallbackParams:
    filepath: str | None = None
    dirpath: str | None = None
    filename: str | None = None
    monitor: str | None = "val_loss"
    verbose: bool | None = True
    save_last: bool | None = True
    save_top_k: int | None = 3
    save_weights_only: bool | None = False
    mode: str | None = "min"
    auto_insert_metric_name: bool = True
    every_n_epochs: int | None = 1
    every_n_train_steps: int | None = None
    train_time_interval: Any | None = None
    prefix: str | None = None
    postfix: str = ".nemo"
    save_best_model: bool = False
    always_save_nemo: bool = False
    save_nemo_on_train_end: bool | None = True
    model_parallel_size: int | None = None
    save_on_train_epoch_end: bool | None = False
    async_save: bool | None = False
    save_last_n_optim_states: int | None = -1


@dataclass
class StepTimingParams:
    reduction: str | None = "mean"
    sync_cuda: bool | None = False
    buffer_size: int | None = 1


@dataclass
class EMAParams:
    enable: bool | None = False
    decay: float | None = 0.999
    cpu_offload: bool | None = False
    validate_original_weights: bool | None = False
    every_n_steps: int = 1


@dataclass
class StragglerDetectionParams:
    report_time_interval: float = 300
    calc_relative_gpu_perf: bool = True
    calc_individual_gpu_perf: bool = True
    num_gpu_perf_scores_to_log: int = 5
    gpu_relative_perf_threshold: float = 0.7
    gpu_individual_perf_threshold: float = 0.7
    stop_if_detected: bool = False


@dataclass
class FaultToleranceParams:
    workload_check_interval: float = 5.0
    initial_rank_heartbeat_timeout: float | None = 60.0 * 60.0
    rank_heartbeat_timeout: float | None = 45.0 * 60.0
    calculate_timeouts: bool = True
    safety_factor: float = 5.0
    rank_termination_signal: signal.Signals = signal.SIGKILL if os.name != "nt" else signal.SIGTERM
    log_level: str = "INFO"
    max_rank_restarts: int = 0
    max_subsequent_job_failures: int = 0
    additional_ft_launcher_args: str = ""
    simulated_fault: Any | None = None


@dataclass
class MLFlowParams:
    experiment_name: str | None = None
    run_name: str | None = None
    tracking_uri: str | None = None
    tags: dict[str, Any] | None = None
    save_dir: str | None = "./mlruns"
    prefix: str = ""
    artifact_location: str | None = None
    run_id: str | None = None
    log_model: bool = False


@dataclass
class DLLoggerParams:
    verbose: bool | None = False
    stdout: bool | None = False
    json_file: str | None = "./dllogger.json"


@dataclass
class ClearMLParams:
    project: str | None = None
    task: str | None = None
    connect_pytorch: bool | None = False
    model_name: str | None = None
    tags: list[str] | None = None
    log_model: bool | None = False
    log_cfg: bool | None = False
    log_metrics: bool | None = False


@dataclass
class NeMoExpManagerConfig:
    explicit_log_dir: str | None = None
    exp_dir: str | None = None
    name: str | None = None
    version: str | None = None
    use_datetime_version: bool | None = True
    resume_if_exists: bool | None = False
    resume_past_end: bool | None = False
    resume_ignore_no_checkpoint: bool | None = False
    resume_from_checkpoint: str | None = None
    create_tensorboard_logger: bool | None = True
    summary_writer_kwargs: dict[Any, Any] | None = None
    create_wandb_logger: bool | None = False
    wandb_logger_kwargs: dict[Any, Any] | None = None
    create_mlflow_logger: bool | None = False
    mlflow_logger_kwargs: MLFlowParams | None = field(default_factory=MLFlowParams)
    create_dllogger_logger: bool | None = False
    dllogger_logger_kwargs: DLLoggerParams | None = field(default_factory=DLLoggerParams)
    create_clearml_logger: bool | None = False
    clearml_logger_kwargs: ClearMLParams | None = field(default_factory=ClearMLParams)
    create_neptune_logger: bool | None = False
    neptune_logger_kwargs: dict[Any, Any] | None = None
    create_checkpoint_callback: bool | None = True
    checkpoint_callback_params: CallbackParams | None = field(default_factory=CallbackParams)
    create_early_stopping_callback: bool | None = False
    create_ipl_epoch_stopper_callback: bool | None = False
    early_stopping_callback_params: EarlyStoppingParams | None = field(default_factory=EarlyStoppingParams)
    ipl_epoch_stopper_callback_params: IPLEpochStopperParams | None = field(default_factory=IPLEpochStopperParams)
    create_preemption_callback: bool | None = True
    files_to_copy: list[str] | None = None
    log_step_timing: bool | None = True
    log_delta_step_timing: bool | None = False
    step_timing_kwargs: StepTimingParams | None = field(default_factory=StepTimingParams)
    log_local_rank_0_only: bool | None = False
    log_global_rank_0_only: bool | None = False
    disable_validation_on_resume: bool | None = True
    ema: EMAParams | None = field(default_factory=EMAParams)
    max_time_per_run: str | None = None
    seconds_to_sleep: float = 5
    create_straggler_detection_callback: bool | None = False
    straggler_detection_params: StragglerDetectionParams | None = field(default_factory=StragglerDetectionParams)
    create_fault_tolerance_callback: bool | None = False
    fault_tolerance: FaultToleranceParams | None = field(default_factory=FaultToleranceParams)
    log_tflops_per_sec_per_gpu: bool | None = True


def nemo_schema_merge(block: Any) -> dict[str, Any]:
    """What NeMo's exp_manager makes of a block (``exp_manager.py:600``), as plain values."""
    merged = OmegaConf.merge(OmegaConf.structured(NeMoExpManagerConfig),
                             OmegaConf.create(OmegaConf.to_container(block, resolve=True)))
    return OmegaConf.to_container(merged, enum_to_str=True)  # type: ignore[return-value]


# -- loading, as INDEX.md says -----------------------------------------------------------------
_NOW = dt.datetime(2024, 8, 27, 12, 30, 45)


@pytest.fixture(autouse=True)
def _resolvers() -> Iterator[None]:
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)
    # Hydra's ``now``, pinned (as INDEX.md pinned it for its comparison).
    OmegaConf.register_new_resolver("now", lambda pattern: _NOW.strftime(pattern), replace=True)
    yield
    OmegaConf.clear_resolver("now")


def load(path: Path) -> Any:
    return OmegaConf.load(path)


@pytest.mark.parametrize("path", POSITIVE, ids=lambda p: p.stem)
def test_positive_block_loads_to_nemos_values(path: Path) -> None:
    root = load(path)
    cfg = load_exp_manager_config(root.exp_manager)
    ours = msgspec.to_builtins(cfg)
    for key in ("sinks", "journal", "bus", "preemption_signal"):  # expbus's own keys
        ours.pop(key)
    assert ours == nemo_schema_merge(root.exp_manager)


def test_corpus_quirks() -> None:
    def cfg(stem: str) -> Any:
        return load_exp_manager_config(load(NEMO_CONFIGS / f"{stem}.yaml").exp_manager)

    assert cfg("launcher_gpt3_mlperf").resume_if_exists is False  # resume_if_exists: 0
    assert cfg("tts_vits").exp_dir is None  # exp_dir: ??? inside the block
    assert cfg("tts_spectrogram_enhancer").exp_dir == ""
    assert cfg("speechlm2_salm").max_time_per_run == "00:03:50:00"
    rad = cfg("tts_rad_tts_dec").checkpoint_callback_params
    assert rad.filepath is not None and rad.filename == "model_checkpoint" and rad.monitor == "val/loss_ctc"
    peft = cfg("nlp_megatron_gpt_peft_finetuning").checkpoint_callback_params
    assert peft.filename is not None and "{validation_" in peft.filename and "${" not in peft.filename
    gpt = cfg("nlp_megatron_gpt_config").checkpoint_callback_params
    assert gpt.model_parallel_size is not None and gpt.async_save is not None
    voicebox = cfg("tts_voicebox_composed_loggers")
    assert voicebox.summary_writer_kwargs is None and voicebox.version is None
    assert voicebox.create_mlflow_logger and voicebox.create_dllogger_logger and voicebox.create_clearml_logger
    assert cfg("audio_predictive_ema_early_stop").ema.enable is True


def test_invalid_nullname_fails_naming_the_key() -> None:
    root = load(NEMO_CONFIGS / "invalid_launcher_clip_siglip_nullname.yaml")
    with pytest.raises(ConfigError) as info:
        load_exp_manager_config(root.exp_manager)
    assert info.value.path == "exp_manager.nullname"
    assert "did you mean name?" in str(info.value)


def test_invalid_ema_enabled_is_nemos_docs_spelling_and_attaches_ema(
        make_trainer: Callable[..., pl.Trainer]) -> None:
    root = load(NEMO_CONFIGS / "invalid_tts_voicebox_ema_enabled_typo.yaml")
    # NeMo's schema rejects `enabled`; its docs use it, so it is read as `enable` here.
    assert load_exp_manager_config(root.exp_manager).ema.enable is True
    trainer = make_trainer()
    exp_manager(trainer, root.exp_manager)
    assert any(isinstance(cb, EMA) for cb in trainer.callbacks)  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", POSITIVE, ids=lambda p: p.stem)
def test_positive_block_runs_through_exp_manager(path: Path, tmp_path: Path,
                                                 make_trainer: Callable[..., pl.Trainer]) -> None:
    root = load(path)
    block = root.exp_manager
    # Only the locations change: everything else is the block as written.
    if block.get("explicit_log_dir"):
        block.explicit_log_dir = str(tmp_path / "explicit")
    else:
        block.exp_dir = str(tmp_path / "exps")
    cfg = load_exp_manager_config(block)
    trainer = make_trainer()
    if cfg.resume_if_exists and not cfg.resume_ignore_no_checkpoint:
        with pytest.raises(NotFoundError):
            exp_manager(trainer, block)
        return
    log_dir = exp_manager(trainer, block)
    assert log_dir is not None and log_dir.is_dir() and tmp_path in log_dir.parents
    bridge = next(cb for cb in trainer.callbacks if isinstance(cb, BridgeCallback))  # type: ignore[attr-defined]
    assert bridge.run_dir == log_dir
    wanted = {sink for switch, sink in (("create_tensorboard_logger", "tensorboard"),
                                        ("create_wandb_logger", "wandb"), ("create_mlflow_logger", "mlflow"),
                                        ("create_dllogger_logger", "dllogger"), ("create_clearml_logger", "clearml"),
                                        ("create_neptune_logger", "neptune")) if getattr(cfg, switch)}
    assert set(bridge.config.sinks) == wanted
    assert (log_dir / "cmd-args.log").is_file()
