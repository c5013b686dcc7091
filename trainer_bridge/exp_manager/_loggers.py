"""NeMo's ``create_*_logger`` switches and their ``*_logger_kwargs`` as expbus sink blocks.

NeMo builds synchronous Lightning loggers; here each switch becomes a sink on the bus of the
run's :class:`~expbus.trainer_bridge.BridgeCallback`, so logging never waits on a backend.
The kwargs are checked against the sink before anything is created: a key the sink does not
know is a :class:`~expbus.sinks.ConfigError` naming ``exp_manager.<kwargs>.<key>``, except for
sinks that pass other keys on to their client (W&B's ``wandb.init``, Neptune's
``init_run``), where a near miss of a known option is logged.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expbus.sinks import ConfigError, create_sink, resolve_sink_class, validate_sink_options
from expbus.sinks._errors import close_match, unknown_key_error
from expbus.sinks._paths import check_sink_paths

if TYPE_CHECKING:
    from ._config import ExpManagerConfig

__all__ = ["LOGGER_SINK_IDS", "check_logger_options", "enabled_loggers", "logger_sinks"]

log = logging.getLogger("expbus.exp_manager")

#: ``create_<x>_logger`` switch -> (sink id and type, the kwargs field).
LOGGER_SINK_IDS: dict[str, tuple[str, str]] = {
    "create_tensorboard_logger": ("tensorboard", "summary_writer_kwargs"),
    "create_wandb_logger": ("wandb", "wandb_logger_kwargs"),
    "create_mlflow_logger": ("mlflow", "mlflow_logger_kwargs"),
    "create_dllogger_logger": ("dllogger", "dllogger_logger_kwargs"),
    "create_clearml_logger": ("clearml", "clearml_logger_kwargs"),
    "create_neptune_logger": ("neptune", "neptune_logger_kwargs"),
}

# summary_writer_kwargs that Lightning's TensorBoardLogger accepts but the sink has no use for:
# ``comment`` is ignored by SummaryWriter whenever a log_dir is given (always, under NeMo).
_TB_IGNORED = frozenset({"comment"})
# DLLogger's NeMo default: the file belongs to the run, so it goes into the log dir.
_DLLOGGER_DEFAULT = "./dllogger.json"


def enabled_loggers(config: ExpManagerConfig) -> list[str]:
    """The ``create_*_logger`` switches that are on, in NeMo's order."""
    return [switch for switch in LOGGER_SINK_IDS if getattr(config, switch)]


def _kwargs(config: ExpManagerConfig, field: str) -> dict[str, Any]:
    value = getattr(config, field)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    import msgspec

    return msgspec.structs.asdict(value)


def _options(sink_type: str) -> tuple[set[str], bool]:
    """(named constructor options, accepts **kwargs) of a registered sink type."""
    factory = resolve_sink_class(sink_type)
    params = inspect.signature(factory).parameters
    named = {n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_logger_options(config: ExpManagerConfig) -> None:
    """Check every enabled logger's kwargs against its sink (called when the config is loaded).

    Raises:
        ConfigError: naming ``exp_manager.<kwargs>.<key>``.
    """
    from ._config import ROOT

    for switch in enabled_loggers(config):
        sink_id, field = LOGGER_SINK_IDS[switch]
        base = f"{ROOT}.{field}"
        kwargs = _kwargs(config, field)
        if sink_id in config.sinks and config.sinks[sink_id].get("enabled", True) is not False:
            raise ConfigError(f"{ROOT}.sinks.{sink_id}: this sink id is taken by {switch}; choose another id",
                              path=f"{ROOT}.sinks.{sink_id}", value=sink_id)
        for reserved in ("type", "enabled"):
            if reserved in kwargs:
                raise ConfigError(f"{base}.{reserved}: set by exp_manager ({switch}); remove it",
                                  path=f"{base}.{reserved}", value=kwargs[reserved])
        if sink_id in ("wandb", "neptune") and "name" not in kwargs and "project" not in kwargs:
            # NeMo's own check (a ValueError there too).
            raise ConfigError(f"{base}: name and project are required for {sink_id}_logger "
                              f"(set {base}.name and {base}.project)", path=base, value=None)
        if sink_id == "tensorboard":
            if "log_dir" in kwargs:
                raise ConfigError(f"{base}.log_dir: You cannot pass `log_dir` as part of `summary_writer_kwargs`: "
                                  "exp_manager writes TensorBoard into the log dir (use sub_dir for a folder "
                                  "inside it)", path=f"{base}.log_dir", value=kwargs["log_dir"])
            if kwargs.get("log_graph"):
                raise ConfigError(f"{base}.log_graph: the tensorboard sink does not write the model graph; "
                                  "remove log_graph or set it to false", path=f"{base}.log_graph", value=True)
            kwargs = {k: v for k, v in kwargs.items() if k not in _TB_IGNORED and k != "log_graph"}
        named, var_kw = _options(sink_id)
        for key in kwargs:
            if key in named:
                continue
            if not var_kw:
                raise unknown_key_error(base, key, named - {"log_dir"})
            match = close_match(key, named)
            if match is not None:
                log.warning("%s.%s: not an option of the %s sink, so it is passed to the %s client as is; "
                            "did you mean %s?", base, key, sink_id, sink_id, match)
        spec = {"type": sink_id, **{k: v for k, v in kwargs.items() if v is not None}}
        try:
            validate_sink_options(sink_id, spec)
        except ConfigError as exc:
            raise _repath(exc, f"sinks.{sink_id}", base) from None


def _repath(exc: ConfigError, old: str, new: str) -> ConfigError:
    message, path = str(exc), exc.path
    if path.startswith(old):
        path = new + path[len(old):]
    if message.startswith(old):
        message = new + message[len(old):]
    return ConfigError(message, path=path, value=exc.value)


def _absolute(path: str | None) -> str | None:
    """A user-given path as NeMo reads it: relative to the current directory."""
    if path is None or path == "":
        return None
    return os.path.abspath(os.path.expanduser(path))


def logger_sinks(
    config: ExpManagerConfig, *, exp_dir: Path, name: str, version: str | None
) -> dict[str, dict[str, Any]]:
    """The sink blocks for the enabled loggers, then the ``sinks:`` map, checked by building each once.

    Args:
        config: the validated configuration.
        exp_dir: NeMo's ``exp_dir`` of the run (the explicit log dir when there is one).
        name: the experiment name (for MLflow's experiment, ClearML's task and model).
        version: the version, ``None`` when there is no version folder.

    Raises:
        ConfigError: a sink refuses its options (naming the kwargs key).
    """
    from ._config import ROOT

    specs: dict[str, dict[str, Any]] = {}
    for switch in enabled_loggers(config):
        sink_id, field = LOGGER_SINK_IDS[switch]
        kwargs = _kwargs(config, field)
        spec: dict[str, Any]
        if sink_id == "tensorboard":
            # The event file goes straight into the log dir (NeMo's TensorBoardLogger(save_dir=
            # exp_dir, name=name, version=version)), and a resumed run continues it.
            spec = {k: v for k, v in kwargs.items() if k not in _TB_IGNORED and k != "log_graph"}
        elif sink_id == "wandb":
            spec = dict(kwargs)
            # NeMo: save_dir defaults to exp_dir; relative paths are relative to the current directory.
            spec["save_dir"] = _absolute(spec.get("save_dir")) or str(exp_dir)
            if spec.get("dir") is not None:
                spec["dir"] = _absolute(spec["dir"])
            # A W&B id in the kwargs wins over the version (Lightning's WandbLogger lets the
            # version win); without either, the sink keeps one id per log dir.
            if spec.get("id") is None and spec.get("version") is None and version:
                spec["id"] = version
        elif sink_id == "mlflow":
            spec = {k: v for k, v in kwargs.items() if v is not None}
            spec["experiment_name"] = kwargs.get("experiment_name") or name
            if not kwargs.get("experiment_name"):
                log.info("mlflow logger: no experiment_name set, using the experiment name %r", name)
            if kwargs.get("run_name") is None and version:
                spec["run_name"] = version
            # NeMo's save_dir (./mlruns) is relative to the current directory; MLflow 3
            # refuses file stores, so the sink keeps a SQLite store mlflow.db in it.
            spec["save_dir"] = _absolute(kwargs.get("save_dir")) or str(exp_dir)
        elif sink_id == "dllogger":
            json_file = kwargs.get("json_file")
            if json_file == _DLLOGGER_DEFAULT:
                json_file = "dllogger.json"  # inside the log dir: one file per run, continued on resume
            spec = {"json_file": json_file or None, "stdout": bool(kwargs.get("stdout")),
                    "verbose": bool(kwargs.get("verbose"))}
        elif sink_id == "clearml":
            # NeMo lets CLEARML_PROJECT / CLEARML_TASK win over the config; the sink reads them
            # when its option is unset.
            spec = {
                "project": None if os.environ.get("CLEARML_PROJECT") else kwargs.get("project"),
                "task": None if os.environ.get("CLEARML_TASK") else (kwargs.get("task") or f"Trainer {name}"),
                "connect_pytorch": bool(kwargs.get("connect_pytorch")),
                "model_name": kwargs.get("model_name") or name,
                "tags": kwargs.get("tags"),
                "log_model": bool(kwargs.get("log_model")),
                "log_cfg": bool(kwargs.get("log_cfg")),
                "log_metrics": bool(kwargs.get("log_metrics")),
            }
        else:  # neptune: Lightning's NeptuneLogger arguments are the sink's
            spec = dict(kwargs)
        spec = {"type": sink_id, **spec}
        _try_build(sink_id, spec, f"{ROOT}.{LOGGER_SINK_IDS[switch][1]}")
        specs[sink_id] = spec
    for sink_id, sink_spec in config.sinks.items():
        if sink_id in specs:  # pragma: no cover - rejected when the config was loaded
            raise ConfigError(f"{ROOT}.sinks.{sink_id}: this sink id is taken by a logger", path=f"{ROOT}.sinks")
        if sink_spec.get("enabled", True) is not False:
            _try_build(sink_id, sink_spec, f"{ROOT}.sinks.{sink_id}")
        specs[sink_id] = dict(sink_spec)
    return specs


def _try_build(sink_id: str, spec: Mapping[str, Any], base: str) -> None:
    # Sink constructors only check and store their options (clients are imported at open),
    # so building one here surfaces a refused option before the log dir exists.
    try:
        create_sink(sink_id, spec)
    except ConfigError as exc:
        raise _repath(exc, f"sinks.{sink_id}", base) from None
    # NeMo's cwd-relative options (W&B and MLflow save_dir) are absolute by now; any other
    # relative path lives in the log dir and must not climb out of it.
    check_sink_paths(sink_id, spec, base=base)
