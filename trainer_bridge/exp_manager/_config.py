"""The ``exp_manager:`` configuration: NeMo's ``ExpManagerConfig`` schema as msgspec Structs, loaded as NeMo loads it.

NeMo validates a block with ``OmegaConf.merge(OmegaConf.structured(ExpManagerConfig),
OmegaConf.create(OmegaConf.to_container(block, resolve=True)))``. :func:`load_exp_manager_config`
gives the same field values for the same input (interpolations resolved against the whole
config, ``???`` inside the block dropped so the default stays, scalars coerced as OmegaConf's
typed nodes coerce them: ``resume_if_exists: 0`` is ``False``, ``version: 957`` is ``"957"``)
and fails where NeMo fails, with one :class:`~expbus.sinks.ConfigError` naming the key path and
the close match instead of an OmegaConf traceback::

    exp_manager.nullname: unknown key; did you mean name? (valid: ...)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import msgspec.inspect as mi

from expbus.sinks import BusConfig, ConfigError, JournalConfig, validate_sink_options
from expbus.sinks._errors import unknown_key_error
from expbus.sinks._paths import check_sink_paths

from ._checkpoint_params import CallbackParams

__all__ = [
    "ClearMLParams",
    "DLLoggerParams",
    "EMAParams",
    "EarlyStoppingParams",
    "ExpManagerConfig",
    "FaultToleranceParams",
    "IPLEpochStopperParams",
    "MLFlowParams",
    "StepTimingParams",
    "StragglerDetectionParams",
    "load_exp_manager_config",
    "parse_max_time",
]

log = logging.getLogger("expbus.exp_manager")

# OmegaConf's marker of a mandatory value nobody filled in.
_MISSING = "???"
ROOT = "exp_manager"


class EarlyStoppingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``early_stopping_callback_params``: the arguments of Lightning's ``EarlyStopping`` (NeMo's defaults).

    Attributes:
        monitor: the logged metric to watch.
        mode: ``min`` or ``max``: which direction is an improvement.
        min_delta: smallest change that counts as an improvement.
        patience: validation checks without improvement before stopping.
        verbose: log the decisions.
        strict: fail when ``monitor`` is not logged.
        check_finite: stop when the metric becomes NaN or infinite.
        stopping_threshold: stop as soon as the metric reaches this value.
        divergence_threshold: stop as soon as the metric is worse than this value.
        check_on_train_epoch_end: check at the end of the training epoch instead of after
            validation (``None``: Lightning decides).
        log_rank_zero_only: log the decisions on rank 0 only.
    """

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


class IPLEpochStopperParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``ipl_epoch_stopper_callback_params``: stop training every N epochs (iterative pseudo-labelling).

    Attributes:
        enable_stop: request the stop (``false`` makes the callback inert).
        stop_every_n_epochs: epochs to train before the stop.
    """

    enable_stop: bool = True
    stop_every_n_epochs: int = 1


class StepTimingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``step_timing_kwargs``: how ``train_step_timing`` is measured.

    Attributes:
        reduction: ``mean``, ``sum``, ``min``, ``max`` over the window, or ``none`` (the
            latest step).
        sync_cuda: call ``torch.cuda.synchronize()`` before reading the clock (exact GPU
            time, at the cost of a device sync per step); off by default.
        buffer_size: the moving window in steps; ``<= 0`` means each step on its own.
    """

    reduction: Literal["mean", "sum", "min", "max", "none"] | None = "mean"
    sync_cuda: bool | None = False
    buffer_size: int | None = 1


class EMAParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``ema``: exponential moving average of the weights (NeMo's docs spell the switch ``enabled``; both work).

    Attributes:
        enable: keep an EMA of the weights (not yet available in this version: ``true``
            is a configuration error).
        decay: EMA decay per update.
        cpu_offload: keep the EMA weights on the CPU.
        validate_original_weights: validate with the trained weights instead of the EMA.
        every_n_steps: update the EMA every N optimizer steps.
    """

    enable: bool | None = False
    decay: float | None = 0.999
    cpu_offload: bool | None = False
    validate_original_weights: bool | None = False
    every_n_steps: int = 1


class StragglerDetectionParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``straggler_detection_params``: the arguments of ``ptl_resiliency.StragglerDetectionCallback``."""

    report_time_interval: float = 300
    calc_relative_gpu_perf: bool = True
    calc_individual_gpu_perf: bool = True
    num_gpu_perf_scores_to_log: int = 5
    gpu_relative_perf_threshold: float = 0.7
    gpu_individual_perf_threshold: float = 0.7
    stop_if_detected: bool = False


class FaultToleranceParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``fault_tolerance``: NeMo's fault-tolerance section (also read by NeMo's launcher)."""

    workload_check_interval: float = 5.0
    initial_rank_heartbeat_timeout: float | None = 60.0 * 60.0
    rank_heartbeat_timeout: float | None = 45.0 * 60.0
    calculate_timeouts: bool = True
    safety_factor: float = 5.0
    rank_termination_signal: str | int = "SIGKILL" if os.name != "nt" else "SIGTERM"
    log_level: str = "INFO"
    max_rank_restarts: int = 0
    max_subsequent_job_failures: int = 0
    additional_ft_launcher_args: str = ""
    simulated_fault: Any | None = None


class MLFlowParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``mlflow_logger_kwargs`` (NeMo's ``MLFlowParams``), the options of the ``mlflow`` sink.

    Attributes:
        experiment_name: MLflow experiment; ``None``: the experiment ``name``.
        run_name: MLflow run name; ``None``: the version.
        tracking_uri: tracking server or store; ``None``: a SQLite store in ``save_dir``.
        tags: tags of the run.
        save_dir: directory of the SQLite store ``mlflow.db`` (relative to the current
            directory, like NeMo's ``./mlruns``).
        prefix: put before every metric name.
        artifact_location: artifact location of a new experiment.
        run_id: an existing MLflow run to continue.
        log_model: log checkpoints as artifacts (``true``: at the end, ``all``: each save).
    """

    experiment_name: str | None = None
    run_name: str | None = None
    tracking_uri: str | None = None
    tags: dict[str, Any] | None = None
    save_dir: str | None = "./mlruns"
    prefix: str = ""
    artifact_location: str | None = None
    run_id: str | None = None
    log_model: bool | Literal["all"] = False


class DLLoggerParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``dllogger_logger_kwargs`` (NeMo's ``DLLoggerParams``), the options of the ``dllogger`` sink.

    Attributes:
        verbose: also write one line per step timing.
        stdout: also print DLLogger's stdout format.
        json_file: the JSON-lines file; relative paths (NeMo's default ``./dllogger.json``
            included) are inside the log dir; ``None`` or ``""`` writes none.
    """

    verbose: bool | None = False
    stdout: bool | None = False
    json_file: str | None = "./dllogger.json"


class ClearMLParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``clearml_logger_kwargs`` (NeMo's ``ClearMLParams``), the options of the ``clearml`` sink.

    Attributes:
        project: ClearML project (``CLEARML_PROJECT`` wins, as in NeMo; default ``NeMo``).
        task: task name (``CLEARML_TASK`` wins; default ``Trainer <name>``).
        connect_pytorch: let ClearML register ``torch.save`` files.
        model_name: name of the output model; default the experiment name.
        tags: task tags (after ``NeMo``).
        log_model: upload checkpoints as the output model.
        log_cfg: store the hyperparameters with the model.
        log_metrics: attach the latest metrics to the model.
    """

    project: str | None = None
    task: str | None = None
    connect_pytorch: bool | None = False
    model_name: str | None = None
    tags: list[str] | None = None
    log_model: bool | None = False
    log_cfg: bool | None = False
    log_metrics: bool | None = False


def _struct(cls: type[Any]) -> Any:
    return msgspec.field(default_factory=cls)


class ExpManagerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``exp_manager:`` block: every field of NeMo's ``ExpManagerConfig``, with its default, plus expbus's own.

    ``ExpManagerConfig()`` gives NeMo's defaults with attribute access
    (``cfg.ema.enable``, ``cfg.checkpoint_callback_params.save_top_k``). Build one from YAML
    with :func:`load_exp_manager_config`; the README's exp_manager reference explains each key.

    expbus additions: ``sinks`` (sink id -> sink block, as in ``expbus.yaml``), ``journal``
    and ``bus`` (see :class:`~expbus.sinks.ExpbusConfig`).
    """

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
    summary_writer_kwargs: dict[str, Any] | None = None
    create_wandb_logger: bool | None = False
    wandb_logger_kwargs: dict[str, Any] | None = None
    create_mlflow_logger: bool | None = False
    mlflow_logger_kwargs: MLFlowParams = _struct(MLFlowParams)
    create_dllogger_logger: bool | None = False
    dllogger_logger_kwargs: DLLoggerParams = _struct(DLLoggerParams)
    create_clearml_logger: bool | None = False
    clearml_logger_kwargs: ClearMLParams = _struct(ClearMLParams)
    create_neptune_logger: bool | None = False
    neptune_logger_kwargs: dict[str, Any] | None = None
    create_checkpoint_callback: bool | None = True
    checkpoint_callback_params: CallbackParams = _struct(CallbackParams)
    create_early_stopping_callback: bool | None = False
    create_ipl_epoch_stopper_callback: bool | None = False
    early_stopping_callback_params: EarlyStoppingParams = _struct(EarlyStoppingParams)
    ipl_epoch_stopper_callback_params: IPLEpochStopperParams = _struct(IPLEpochStopperParams)
    create_preemption_callback: bool | None = True
    files_to_copy: list[str] | None = None
    log_step_timing: bool | None = True
    log_delta_step_timing: bool | None = False
    step_timing_kwargs: StepTimingParams = _struct(StepTimingParams)
    log_local_rank_0_only: bool | None = False
    log_global_rank_0_only: bool | None = False
    disable_validation_on_resume: bool | None = True
    ema: EMAParams = _struct(EMAParams)
    max_time_per_run: str | int | float | None = None
    seconds_to_sleep: float = 5
    create_straggler_detection_callback: bool | None = False
    straggler_detection_params: StragglerDetectionParams = _struct(StragglerDetectionParams)
    create_fault_tolerance_callback: bool | None = False
    fault_tolerance: FaultToleranceParams = _struct(FaultToleranceParams)
    log_tflops_per_sec_per_gpu: bool | None = True
    # expbus's own keys.
    sinks: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    journal: JournalConfig = _struct(JournalConfig)
    bus: BusConfig = _struct(BusConfig)
    preemption_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"] = "SIGTERM"


#: The fields that NeMo's ExpManagerConfig has (the rest are expbus's).
NEMO_FIELDS: tuple[str, ...] = tuple(f for f in ExpManagerConfig.__struct_fields__
                                     if f not in ("sinks", "journal", "bus", "preemption_signal"))

# Spellings accepted besides the field name: NeMo's own docs write ``ema.enabled``.
_ALIASES: dict[type[Any], dict[str, str]] = {EMAParams: {"enabled": "enable"}}


# -- coercion, as OmegaConf's typed nodes coerce ------------------------------------------
class _Mismatch(Exception):
    """A value does not fit a type (turned into a ConfigError by the caller)."""


_TRUE = frozenset({"y", "yes", "on", "true"})
_FALSE = frozenset({"n", "no", "off", "false"})


def _describe(t: mi.Type) -> str:
    names = {mi.BoolType: "a boolean", mi.IntType: "an integer", mi.FloatType: "a number",
             mi.StrType: "a string", mi.NoneType: "null", mi.ListType: "a list",
             mi.DictType: "a mapping", mi.StructType: "a mapping"}
    if isinstance(t, mi.UnionType):
        return " or ".join(_describe(m) for m in t.types)
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    return names.get(type(t), type(t).__name__)


def _coerce_scalar(value: Any, t: mi.Type) -> Any:
    if isinstance(t, mi.AnyType):
        return value
    if isinstance(t, mi.NoneType):
        if value is None:
            return None
        raise _Mismatch
    if isinstance(t, mi.BoolType):
        # OmegaConf's BooleanNode: ints are compared with 0, strings parsed as YAML booleans.
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value != 0
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            try:
                return int(lowered) != 0
            except ValueError:
                pass
        raise _Mismatch
    if isinstance(t, mi.IntType):
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _Mismatch
    if isinstance(t, mi.FloatType):
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Mismatch
    if isinstance(t, mi.StrType):
        # OmegaConf's StringNode turns any scalar into its str(): ``version: 957`` is "957".
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)):
            return str(value)
        raise _Mismatch
    if isinstance(t, mi.LiteralType):
        if value in t.values:
            return value
        if isinstance(value, (int, float, bool)) and str(value) in t.values:
            return str(value)
        raise _Mismatch
    raise _Mismatch


def _coerce(value: Any, t: mi.Type, path: str) -> Any:
    """``value`` converted to type ``t`` the way OmegaConf would, or a ConfigError naming ``path``."""
    if isinstance(t, mi.UnionType):
        if value is None and any(isinstance(m, mi.NoneType) for m in t.types):
            return None
        # A value already of a member's type wins over a coercion into an earlier member
        # (``log_model: all`` must not become a boolean, ``max_time_per_run: 3600`` stays an int).
        for member in t.types:
            if _is_exact(value, member):
                return _coerce(value, member, path)
        for member in t.types:
            try:
                return _coerce(value, member, path)
            except ConfigError:
                continue
        raise _type_error(path, value, t)
    if isinstance(t, mi.StructType):
        if value is None:
            return None  # the caller drops the key: the default stays
        if not isinstance(value, Mapping):
            raise _type_error(path, value, t)
        return _coerce_struct(value, t, path)
    if isinstance(t, mi.ListType):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, t)
        return [_coerce(_no_missing(v, f"{path}[{i}]"), t.item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(t, mi.DictType):
        if not isinstance(value, Mapping):
            raise _type_error(path, value, t)
        return {str(k): _coerce(_no_missing(v, f"{path}.{k}"), t.value_type, f"{path}.{k}") for k, v in value.items()}
    if isinstance(t, mi.AnyType):
        return _no_missing_deep(value, path)
    try:
        return _coerce_scalar(value, t)
    except _Mismatch:
        raise _type_error(path, value, t) from None


def _is_exact(value: Any, t: mi.Type) -> bool:
    if isinstance(t, mi.BoolType):
        return isinstance(value, bool)
    if isinstance(t, mi.IntType):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(t, mi.FloatType):
        return isinstance(value, float)
    if isinstance(t, mi.StrType):
        return isinstance(value, str)
    if isinstance(t, mi.LiteralType):
        return value in t.values and type(value) in {type(v) for v in t.values}
    if isinstance(t, (mi.StructType, mi.DictType)):
        return isinstance(value, Mapping)
    if isinstance(t, mi.ListType):
        return isinstance(value, (list, tuple))
    return False


def _type_error(path: str, value: Any, t: mi.Type) -> ConfigError:
    return ConfigError(f"{path}: expected {_describe(t)}, got {value!r}", path=path, value=value)


def _no_missing(value: Any, path: str) -> Any:
    if isinstance(value, str) and value == _MISSING:
        raise ConfigError(f"{path}: missing mandatory value '???'; give it a value or remove the key",
                          path=path, value=value)
    return value


def _no_missing_deep(value: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _no_missing_deep(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_missing_deep(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _no_missing(value, path)


def _coerce_struct(data: Mapping[Any, Any], info: mi.StructType, path: str) -> dict[str, Any]:
    fields = {f.name: f for f in info.fields}
    aliases = _ALIASES.get(info.cls, {})
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        name = aliases.get(key, key)
        if name not in fields:
            raise unknown_key_error(path, key, fields)
        if name in spelled:
            previous = spelled[name]
            raise ConfigError(f"{path}.{key}: same setting as {path}.{previous}; give only one of them",
                              path=f"{path}.{key}", value=value)
        spelled[name] = key
        if isinstance(value, str) and value == _MISSING:
            continue  # as NeMo's schema merge: ``???`` leaves the default in place
        converted = _coerce(value, fields[name].type, f"{path}.{key}")
        if converted is None and isinstance(fields[name].type, mi.StructType):
            continue  # ``ema: null``: NeMo would fail later on ``cfg.ema.enable``; the defaults serve better
        out[name] = converted
    return out


# -- loading ---------------------------------------------------------------------------------
def _register_resolvers() -> None:
    """Provide the resolvers real NeMo configs use, where nobody registered them yet."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("multiply"):
        # NeMo registers it on import (hydra_runner.py, modelPT.py); its configs rely on it.
        OmegaConf.register_new_resolver("multiply", lambda x, y: x * y)
    if not OmegaConf.has_resolver("now"):
        # Hydra's ``now`` (registered when a Hydra app starts, not on import).
        OmegaConf.register_new_resolver("now", lambda pattern: _dt.datetime.now().strftime(pattern),
                                        use_cache=True)


def _plain(source: Any) -> Any:
    """Plain containers from mappings and OmegaConf nodes, interpolations resolved against each node's root."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(source):
        _register_resolvers()
        try:
            # For a child node (``cfg.exp_manager``) this resolves ``${name}``, ``${model.x}``
            # and ``${exp_manager.name}`` against the whole config, as NeMo's exp_manager does.
            return OmegaConf.to_container(source, resolve=True)
        except Exception as exc:
            key = str(getattr(exc, "full_key", "") or "")
            path = f"{ROOT}.{key}" if key and not key.startswith(ROOT) else (key or ROOT)
            first_line = f"{type(exc).__name__}: {exc}".split("\n")[0]
            raise ConfigError(f"{path}: cannot resolve: {first_line}", path=path) from None
    if isinstance(source, Mapping):
        # A plain mapping may hold OmegaConf values (``{"exp_manager": cfg.exp_manager}``).
        return {k: _plain(v) for k, v in source.items()}
    if isinstance(source, (list, tuple)):
        return [_plain(v) for v in source]
    return source


def load_exp_manager_config(source: Any = None) -> ExpManagerConfig:
    """Validate an ``exp_manager:`` block into an :class:`ExpManagerConfig`.

    Args:
        source: a mapping, an OmegaConf ``DictConfig`` (a node of a bigger config is resolved
            against its root: ``${name}``, ``${model.x}``, ``${multiply:a,b}`` work), a YAML
            file path, an :class:`ExpManagerConfig` or ``None`` (NeMo's defaults). A whole
            config with an ``exp_manager:`` mapping uses that block.

    Returns:
        The configuration, NeMo's defaults filled in.

    Raises:
        ConfigError: naming the key path (``exp_manager.ema.decay``), the value and the
            close match, before anything is created on disk.
    """
    if source is None:
        config = ExpManagerConfig()
    elif isinstance(source, ExpManagerConfig):
        config = source
        _check_sinks(config)
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist", value=str(path))
            from omegaconf import OmegaConf

            try:
                source = OmegaConf.load(path)
            except Exception as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}", value=str(path)) from None
        data = _plain(source)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{ROOT}: expected a mapping, got {type(source).__name__}", path=ROOT, value=source)
        block = data.get(ROOT)
        if isinstance(block, Mapping):  # a whole config: its exp_manager block
            data = block
        coerced = _coerce_struct(data, mi.type_info(ExpManagerConfig), ROOT)  # type: ignore[arg-type]
        try:
            config = msgspec.convert(coerced, ExpManagerConfig, strict=False)
        except msgspec.ValidationError as exc:  # pragma: no cover - the coercion checked every type
            raise ConfigError(f"{ROOT}: {exc}", path=ROOT) from None
        _check_sinks(config)
    _check_values(config)
    from ._loggers import check_logger_options

    check_logger_options(config)
    return config


def _check_sinks(config: ExpManagerConfig) -> None:
    for sink_id, spec in config.sinks.items():
        if isinstance(spec, Mapping) and spec.get("enabled", True) is False:
            continue
        try:
            validate_sink_options(sink_id, spec)
        except ConfigError as exc:
            raise _repath(exc, "sinks", f"{ROOT}.sinks") from None
        # Relative sink paths live in the log dir; one climbing out of it is refused here,
        # before anything is created on disk.
        check_sink_paths(sink_id, spec, base=f"{ROOT}.sinks.{sink_id}")


def _repath(exc: ConfigError, old: str, new: str) -> ConfigError:
    """The same error with its key path (and message) under ``new`` instead of ``old``."""
    message = str(exc)
    path = exc.path
    if path == old or path.startswith(old + "."):
        path = new + path[len(old):]
    if message.startswith(old):
        message = new + message[len(old):]
    return ConfigError(message, path=path, value=exc.value)


def _check_values(config: ExpManagerConfig) -> None:
    """Checks that the schema alone cannot express (NeMo fails on these later, or crashes)."""
    if config.log_local_rank_0_only and config.log_global_rank_0_only:
        raise ConfigError(f"{ROOT}.log_local_rank_0_only: cannot be true together with log_global_rank_0_only; "
                          "set one of them, or neither", path=f"{ROOT}.log_local_rank_0_only", value=True)
    for label, value in (("name", config.name), ("version", config.version)):
        if value and (Path(value).is_absolute() or ".." in Path(value).parts):
            raise ConfigError(f"{ROOT}.{label}: {value!r} would leave exp_dir; use a plain folder name "
                              "(or explicit_log_dir for a path of your choice)", path=f"{ROOT}.{label}", value=value)
    if config.max_time_per_run is not None:
        parse_max_time(config.max_time_per_run)
    if config.seconds_to_sleep < 0:
        raise ConfigError(f"{ROOT}.seconds_to_sleep: must be >= 0, got {config.seconds_to_sleep}",
                          path=f"{ROOT}.seconds_to_sleep", value=config.seconds_to_sleep)
    mode = config.early_stopping_callback_params.mode
    if mode not in ("min", "max"):
        raise ConfigError(f"{ROOT}.early_stopping_callback_params.mode: expected 'min' or 'max', got {mode!r}",
                          path=f"{ROOT}.early_stopping_callback_params.mode", value=mode)
    for index, item in enumerate(config.files_to_copy or []):
        if not Path(item).is_file():
            raise ConfigError(f"{ROOT}.files_to_copy[{index}]: {item!r} is not a file (relative paths are "
                              "relative to the current directory)", path=f"{ROOT}.files_to_copy[{index}]", value=item)


def parse_max_time(value: str | int | float) -> _dt.timedelta:
    """``max_time_per_run`` as a duration: ``"DD:HH:MM:SS"`` (Lightning's ``Timer`` format) or seconds.

    A number is read as seconds: YAML 1.1 reads an unquoted ``1:00:00`` as the base-60
    number 3600. It also reads an unquoted ``1:00:00:00`` (meant as one day) as 216000, so
    exp_manager logs how it understood a number; quote the value to be safe.

    Raises:
        ConfigError: naming ``exp_manager.max_time_per_run``.
    """
    path = f"{ROOT}.max_time_per_run"
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected 'DD:HH:MM:SS' or seconds, got {value!r}", path=path, value=value)
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{path}: must be positive, got {value!r}", path=path, value=value)
        return _dt.timedelta(seconds=value)
    parts = value.strip().split(":")
    try:
        days, hours, minutes, seconds = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{path}: expected 'DD:HH:MM:SS' (e.g. '00:03:50:00') or seconds, got {value!r}",
                          path=path, value=value) from None
    duration = _dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if duration <= _dt.timedelta(0):
        raise ConfigError(f"{path}: must be positive, got {value!r}", path=path, value=value)
    return duration
