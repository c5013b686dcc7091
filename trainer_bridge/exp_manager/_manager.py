"""``exp_manager(trainer, cfg)``: NeMo's experiment manager for any LightningModule, its loggers as expbus sinks."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from expbus.bus import Sink
from expbus.sinks import ConfigError, ExpbusConfig

from ._callbacks import (
    IPLEpochStopper,
    StepTimingCallback,
    configure_no_restart_validation_training_loop,
    early_stopping,
    install_stateless_timer,
    resilience_callbacks,
)
from ._config import ROOT, ExpManagerConfig, load_exp_manager_config, parse_max_time
from ._dirs import (
    LogDirAgreement,
    attach_log_files,
    attach_rank_log,
    detach_log_files,
    kept_names,
    move_previous_run,
    process_ranks,
    publish_version,
    resolve_log_dir,
    write_run_files,
)
from ._errors import CheckpointMisconfigurationError, LoggerMisconfigurationError
from ._loggers import enabled_loggers, logger_sinks

__all__ = ["exp_manager"]

log = logging.getLogger("expbus.exp_manager")

_LOGGER_FALSE = (" You can disable Lightning's Trainer from creating a logger by passing logger=False to its "
                 "constructor.")


def exp_manager(
    trainer: pl.Trainer,
    cfg: Any = None,
    *,
    sinks: Mapping[str, Sink] | None = None,
) -> Path | None:
    """Set up a run's log directory, sinks, checkpointing and resume on a Trainer, as NeMo's ``exp_manager`` does.

    Call it after creating the Trainer (with ``logger=False`` and ``enable_checkpointing=False``)
    and before ``fit``. It follows NeMo's ``exp_dir/name/version`` layout and adds to
    ``trainer.callbacks``:

    * a :class:`~expbus.trainer_bridge.BridgeCallback` whose sinks are the enabled
      ``create_*_logger`` switches (``tensorboard``, ``wandb``, ``mlflow``, ``dllogger``,
      ``clearml``, ``neptune``, configured by their ``*_logger_kwargs``) plus the ``sinks:``
      map, journaling every event into the log dir; no Lightning logger is created;
    * the checkpoint callback (``create_checkpoint_callback``), with ``trainer.ckpt_path`` set
      when the run resumes (``resume_if_exists``, ``resume_from_checkpoint``);
    * ``train_step_timing`` events (``log_step_timing``), ``EarlyStopping``
      (``create_early_stopping_callback``), the per-run time limit (``max_time_per_run``) and
      no re-validation on resume (``disable_validation_on_resume``).

    Rank 0 also writes ``cmd-args.log``, ``git-info.log`` (in a git repository),
    ``nemo_error_log.txt`` and ``lightning_logs.txt``, and copies ``files_to_copy``; every
    rank logs to ``nemo_log_globalrank-<g>_localrank-<l>.txt``. The files an earlier run
    left in a reused log dir move into ``run_N/`` (event files, journals and sink outputs
    that continue on resume stay).

    Preemption (``create_preemption_callback``, default true, with a checkpoint callback) adds a
    :class:`~expbus.trainer_bridge.preemption.PreemptionCallback`: on SIGTERM the step in
    progress finishes, ``-last`` (and its EMA twin) is saved, ``fit`` returns normally after
    ``RunFinished(interrupted)`` is published and the sinks are flushed. ``ema.enable: true``
    adds :class:`~expbus.trainer_bridge.ema.EMA` (its ``-EMA.ckpt`` twin is written beside
    every checkpoint).

    Args:
        trainer: the Lightning Trainer.
        cfg: the ``exp_manager:`` block: a mapping, an OmegaConf ``DictConfig`` (a node of a
            bigger config is resolved against its root), an :class:`ExpManagerConfig`, or a
            whole config with an ``exp_manager:`` key. ``None`` logs an error and does nothing.
        sinks: extra sink objects for the run's bus, keyed by sink id.

    Returns:
        The log dir (absolute), or ``None`` when ``cfg`` is ``None`` or the Trainer runs
        with ``fast_dev_run``.

    Raises:
        ConfigError: a bad key or value, naming it (before anything is created on disk).
        LoggerMisconfigurationError: the Trainer has a logger while exp_manager is asked for
            loggers, ``exp_dir``, ``name``, ``explicit_log_dir`` or a resume.
        CheckpointMisconfigurationError: the Trainer already has a ``ModelCheckpoint``.
        NotFoundError: a resume found no checkpoint (unless ``resume_ignore_no_checkpoint``).
        ValueError: the resume is ambiguous (several ``*last.ckpt``) or the last run ended.
    """
    global_rank, local_rank = process_ranks(trainer)
    if cfg is None:
        log.error("exp_manager did not receive a cfg argument. It will be disabled.")
        return None
    if trainer.fast_dev_run:  # type: ignore[attr-defined]
        log.info("Trainer was called with fast_dev_run. exp_manager will return without any functionality.")
        return None
    config = load_exp_manager_config(cfg)
    _error_checks(trainer, config)

    from expbus.trainer_bridge import BridgeCallback

    from ._checkpoint import configure_checkpointing
    from ._resume import check_resume

    log_dir = resolve_log_dir(trainer, config, global_rank=global_rank)
    checkpoint_name = log_dir.name or config.name or "default"
    specs = logger_sinks(config, exp_dir=log_dir.exp_dir, name=checkpoint_name, version=log_dir.version)
    expbus_config = ExpbusConfig(
        exp_dir=str(log_dir.exp_dir), name=checkpoint_name, version=log_dir.version or None,
        run_dir=str(log_dir.path), journal=config.journal, bus=config.bus, sinks=specs)
    bridge = BridgeCallback(expbus_config, sinks=sinks)
    extra = resilience_callbacks(config, log_dir.path)
    duration = None
    if config.max_time_per_run is not None:
        duration = parse_max_time(config.max_time_per_run)
        if not isinstance(config.max_time_per_run, str):
            log.info("max_time_per_run: %r read as seconds (%s); in YAML, quote a 'DD:HH:MM:SS' value (YAML 1.1 "
                     "reads an unquoted 1:00:00:00 as a base-60 number)", config.max_time_per_run, duration)

    # Before any folder is made, so a resume finds (or misses) the checkpoints of log_dir.
    check_resume(
        trainer,
        log_dir.path,
        resume_if_exists=bool(config.resume_if_exists),
        resume_past_end=bool(config.resume_past_end),
        resume_ignore_no_checkpoint=bool(config.resume_ignore_no_checkpoint),
        dirpath=config.checkpoint_callback_params.dirpath,
        resume_from_checkpoint=config.resume_from_checkpoint,
    )
    checkpoint_callback = None
    if config.create_checkpoint_callback:
        # Still before the folder exists: a refused combination of checkpoint parameters
        # leaves nothing behind.
        checkpoint_callback = configure_checkpointing(trainer, log_dir.path, checkpoint_name,
                                                      bool(config.resume_if_exists), config.checkpoint_callback_params)

    publish_version(log_dir, global_rank=global_rank)
    detach_log_files()
    if global_rank == 0:
        move_previous_run(log_dir.path, kept_names(specs))
    # Every rank makes the folder: each writes its own log file into it.
    log_dir.path.mkdir(parents=True, exist_ok=True)
    log.info("Experiments will be logged at %s", log_dir.path)
    trainer._default_root_dir = str(log_dir.path)  # type: ignore[attr-defined]  # Lightning has no setter
    attach_rank_log(log_dir.path, global_rank=global_rank, local_rank=local_rank, config=config)

    if log_dir.auto_version:
        trainer.callbacks.insert(0, LogDirAgreement(log_dir))  # type: ignore[attr-defined]
    trainer.callbacks.append(bridge)  # type: ignore[attr-defined]
    if config.log_delta_step_timing or config.log_step_timing:
        timing = StepTimingCallback(bridge, config.step_timing_kwargs, delta=bool(config.log_delta_step_timing))
        # First, so the clock starts before the other callbacks' batch-start work.
        trainer.callbacks.insert(0, timing)  # type: ignore[attr-defined]
    if config.create_early_stopping_callback:
        trainer.callbacks.append(early_stopping(config.early_stopping_callback_params))  # type: ignore[attr-defined]
    if config.create_ipl_epoch_stopper_callback:
        trainer.callbacks.append(  # type: ignore[attr-defined]
            IPLEpochStopper.from_params(config.ipl_epoch_stopper_callback_params))
    if config.disable_validation_on_resume:
        configure_no_restart_validation_training_loop(trainer)
    if duration is not None:
        install_stateless_timer(trainer, duration)
    trainer.callbacks.extend(extra)  # type: ignore[attr-defined]
    if config.ema.enable:
        from expbus.trainer_bridge.ema import EMA

        ema = config.ema
        # The checkpoint callback finds it by its ``save_ema_checkpoint`` and writes the ``-EMA.ckpt`` twins.
        trainer.callbacks.append(EMA(  # type: ignore[attr-defined]
            decay=0.999 if ema.decay is None else ema.decay,
            validate_original_weights=bool(ema.validate_original_weights),
            every_n_steps=ema.every_n_steps,
            cpu_offload=bool(ema.cpu_offload)))
    if config.create_preemption_callback and checkpoint_callback is not None:
        from expbus.trainer_bridge.preemption import PreemptionCallback

        # As NeMo: preemption saves through the checkpoint callback, so it exists only with one.
        # SIGUSR1 for SLURM's --signal=USR1@<seconds>; SIGTERM by default.
        sig = signal.Signals[config.preemption_signal]
        trainer.callbacks.append(PreemptionCallback(checkpoint_callback, sig=sig))  # type: ignore[attr-defined]
    if config.log_tflops_per_sec_per_gpu:
        log.debug("log_tflops_per_sec_per_gpu: accepted; expbus does not compute model FLOPs")

    if global_rank == 0:
        write_run_files(log_dir.path, config.files_to_copy)
        attach_log_files(log_dir.path)
    elif trainer.num_nodes * trainer.num_devices > 1 and config.seconds_to_sleep:
        # Give rank 0 time to finish the folder (moving files, writing records), as NeMo does.
        time.sleep(config.seconds_to_sleep)
    return log_dir.path


def _error_checks(trainer: pl.Trainer, config: ExpManagerConfig) -> None:
    """NeMo's checks of the Trainer against the configuration, and the parts not available yet."""
    if config.ema.enable:
        decay, every = config.ema.decay, config.ema.every_n_steps
        if decay is not None and not 0.0 <= decay <= 1.0:
            raise ConfigError(f"{ROOT}.ema.decay: must be between 0 and 1, got {decay!r}",
                              path=f"{ROOT}.ema.decay", value=decay)
        if every < 1:
            raise ConfigError(f"{ROOT}.ema.every_n_steps: must be >= 1, got {every!r}",
                              path=f"{ROOT}.ema.every_n_steps", value=every)
    _check_hydra_cwd()
    if config.create_checkpoint_callback and any(isinstance(cb, ModelCheckpoint)
                                                 for cb in trainer.callbacks):  # type: ignore[attr-defined]
        raise CheckpointMisconfigurationError(
            "The Lightning trainer passed to exp_manager already has a ModelCheckpoint and "
            "create_checkpoint_callback is true. Create the Trainer with enable_checkpointing=False "
            "(and no ModelCheckpoint in callbacks), or set create_checkpoint_callback: false.")
    loggers = list(trainer.loggers)
    if loggers:
        asked = [f"{switch}: true" for switch in enabled_loggers(config)]
        asked += [f"{key}: {getattr(config, key)!r}" for key in ("exp_dir", "explicit_log_dir", "name")
                  if getattr(config, key)]
        if config.sinks:
            asked.append("sinks")
        if config.resume_if_exists:
            asked.append("resume_if_exists: true")
        if asked:
            raise LoggerMisconfigurationError(
                f"The Lightning trainer passed to exp_manager has a logger ({type(loggers[0]).__name__}), and "
                f"exp_manager was asked for {', '.join(asked)}. exp_manager creates the run's loggers (as sinks) "
                "and its log directory itself; they can only be used if the trainer does not already have a "
                "logger." + _LOGGER_FALSE)
    from expbus.trainer_bridge import BridgeCallback

    if any(isinstance(cb, BridgeCallback) for cb in trainer.callbacks):  # type: ignore[attr-defined]
        raise LoggerMisconfigurationError(
            "The Lightning trainer passed to exp_manager already has a BridgeCallback (from your code, or from an "
            "earlier exp_manager call on this trainer); exp_manager attaches its own. Remove it from the trainer's "
            "callbacks and put its sinks under exp_manager.sinks, or create a new Trainer.")


def _check_hydra_cwd() -> None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd
    except ImportError:
        return
    if HydraConfig.initialized() and get_original_cwd() != os.getcwd():
        raise ConfigError("Hydra changed the working directory. This interferes with exp_manager's functionality "
                          "(relative paths, Lightning's DDP). Please pass hydra.run.dir=. (or hydra.job.chdir=false) "
                          "to your python script.", path="hydra.run.dir")
