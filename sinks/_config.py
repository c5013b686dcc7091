"""The expbus YAML configuration: loaded with OmegaConf, validated with msgspec in two stages.

Stage 1 checks the structure (``ExpbusConfig``); stage 2 checks each sink's own options
against its constructor. Either stage fails with one :class:`ConfigError` naming the key
path, the bad value and the close match::

    sinks.tb.flush_sec: unknown key; did you mean flush_secs? (valid: ...)
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from expbus.bus import Bus, Sink, SinkPolicy, ValueResolver

from ._errors import ConfigError, unknown_key_error
from ._paths import check_sink_paths
from ._process import CALL_TIMEOUT_GRACE, ProcessSink
from ._registry import (
    RESERVED_KEYS,
    WORKER_MODES,
    check_workers,
    create_sink,
    resolve_sink_class,
    validate_sink_options,
)

__all__ = [
    "ExpbusConfig",
    "JournalConfig",
    "BusConfig",
    "load_config",
    "build_bus",
    "resolve_run_dir",
    "sink_workers",
    "DEFAULT_WORKERS",
]

#: Sink classes (``module:qualname``) whose default is ``workers: process``; any other sink
#: defaults to ``thread`` unless its class declares ``default_workers = "process"``. An explicit
#: ``workers:`` on the sink, or ``bus.workers``, wins over both. MLflow's client spends about
#: 100 µs of Python (SQLAlchemy) per metric value: on a thread of the training process that
#: is GIL time a Python-bound step loses (benchmarks/workers_ab.py, workload b at K=100: the
#: mlflow sink's step overhead 0.37x and the training process's logging CPU 0.17x in a
#: process). The wandb SDK keeps an asyncio thread of its own in the process that calls
#: ``wandb.init`` and does Python work per logged row on the caller's thread: in a process,
#: the training process's other-thread CPU per step fell from 259 to 69 µs (workload a, K=1)
#: and from 434 to 204 µs (K=10), and the training thread's wait from 229 to 91 µs and 505 to
#: 244 µs (6 interleaved runs each). The other built-in sinks measured alike either way, so
#: they stay on a thread.
DEFAULT_WORKERS: dict[str, str] = {
    "expbus.sinks.mlflow:MlflowSink": "process",
    "expbus.sinks.wandb:WandbSink": "process",
}


class JournalConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``journal:``: the msgpack record of every event in the run directory.

    Attributes:
        enabled: write the journal.
        fsync_interval: at most this many seconds between fsyncs (the power-loss window).
        name: file name inside the run directory.
    """

    enabled: bool = True
    fsync_interval: float = 1.0
    name: str = "journal.msgpack"


class BusConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``bus:``: timing of the bus thread, and where sinks run by default.

    Attributes:
        poll_interval: how often the bus thread drains published events (seconds).
        flush_timeout: deadline of a flush requested by the bridge.
        close_timeout: deadline of closing every sink at the end of a run.
        open_timeout: deadline for every sink's ``open``.
        workers: ``thread`` or ``process``: where a sink without its own ``workers:`` key
            runs (see :func:`sink_workers`); ``None`` (the default) leaves it to each sink's
            default (``process`` for ``mlflow`` and ``wandb``, see :data:`DEFAULT_WORKERS`; else ``thread``).
    """

    poll_interval: float = 1.0
    flush_timeout: float = 10.0
    close_timeout: float = 30.0
    open_timeout: float = 120.0
    workers: Literal["thread", "process"] | None = None


class ExpbusConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration.

    Attributes:
        exp_dir: root of experiments (NeMo's default ``./nemo_experiments``).
        name: experiment name, a folder under ``exp_dir``.
        version: run folder under the name; ``None`` = the start time
            (``%Y-%m-%d_%H-%M-%S``).
        run_dir: the run directory verbatim (overrides ``exp_dir/name/version``).
        journal: see :class:`JournalConfig`.
        bus: see :class:`BusConfig`.
        sinks: sink id -> ``{type: ..., <policy keys>, <sink options>}``.
    """

    exp_dir: str = "./nemo_experiments"
    name: str = "default"
    version: str | None = None
    run_dir: str | None = None
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    sinks: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")


def _to_plain(source: Any) -> Any:
    """A plain dict from a path, a DictConfig or a mapping (interpolations resolved)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist", value=str(path))
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}", value=str(path)) from None
        source = loaded
    if isinstance(source, DictConfig):
        try:
            return OmegaConf.to_container(source, resolve=True)
        except Exception as exc:
            raise ConfigError(f"config: cannot resolve: {exc}") from None
    if isinstance(source, Mapping):
        return dict(source)
    raise ConfigError(f"config: expected a mapping, a YAML path or a DictConfig, got {type(source).__name__}",
                      value=source)


def _lookup(data: Any, dotted: str) -> Any:
    for part in [p for p in dotted.split(".") if p]:
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        else:
            return None
    return data


def _structure_error(exc: msgspec.ValidationError, data: Any) -> ConfigError:
    text = str(exc)
    detail, _, where = text.partition(" - at `$")
    where = where.rstrip("`").lstrip(".").replace("[", ".").replace("]", "").replace("'", "").replace('"', "")
    unknown = _UNKNOWN.match(detail)
    if unknown:
        key = unknown.group("key")
        parent = _lookup(data, where)
        model: Any = ExpbusConfig
        for part in [p for p in where.split(".") if p]:
            field_type = model.__annotations__.get(part) if hasattr(model, "__annotations__") else None
            model = {"journal": JournalConfig, "bus": BusConfig}.get(part, field_type)
        valid = model.__struct_fields__ if hasattr(model, "__struct_fields__") else (parent or {})
        return unknown_key_error(where, key, valid)
    value = _lookup(data, where)
    return ConfigError(f"{where or 'config'}: {detail} (got {value!r})", path=where, value=value)


def load_config(source: Any = None) -> ExpbusConfig:
    """Load and validate a configuration.

    Args:
        source: a YAML file path, an OmegaConf ``DictConfig``, a mapping, an
            :class:`ExpbusConfig` or ``None`` (the defaults). A mapping with a top-level
            ``expbus:`` key uses that block.

    Raises:
        ConfigError: naming the key path, the value and the close match.
    """
    if source is None:
        return ExpbusConfig()
    if isinstance(source, ExpbusConfig):
        config = source
        data = msgspec.to_builtins(source)
    else:
        data = _to_plain(source)
        if isinstance(data, Mapping) and "expbus" in data and isinstance(data["expbus"], Mapping):
            data = dict(data["expbus"])
        bus = data.get("bus") if isinstance(data, Mapping) else None
        if isinstance(bus, Mapping):
            # Before the schema check, whose message for a Literal has no "did you mean".
            check_workers(bus.get("workers"), "bus.workers")
        try:
            config = msgspec.convert(data, ExpbusConfig, strict=False)
        except msgspec.ValidationError as exc:
            raise _structure_error(exc, data) from None
    check_workers(config.bus.workers, "bus.workers")
    for sink_id, spec in config.sinks.items():
        if spec.get("enabled", True) is False:
            continue
        validate_sink_options(sink_id, spec)
        # Before training: a relative path that climbs out of the run directory is refused now.
        check_sink_paths(sink_id, spec, base=f"sinks.{sink_id}")
    return config


def sink_workers(spec: Mapping[str, Any], default: str | None = None) -> str:
    """Where a sink runs, ``thread`` or ``process``.

    The sink block's ``workers:`` key, else ``default`` (``bus.workers``), else the sink
    class's default (its ``default_workers`` attribute, else :data:`DEFAULT_WORKERS`), else
    ``thread``.
    """
    chosen = spec.get("workers") or default
    if chosen:
        return str(chosen)
    if os.name != "posix":
        return "thread"  # worker processes need POSIX; a default must not make a config fail here
    factory = resolve_sink_class(spec.get("type"))  # type: ignore[arg-type]
    declared = getattr(factory, "default_workers", None)
    if declared in WORKER_MODES:
        return str(declared)
    key = f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}"
    return DEFAULT_WORKERS.get(key, "thread")


def resolve_run_dir(config: ExpbusConfig, *, when: _dt.datetime | None = None) -> Path:
    """``run_dir`` verbatim, else ``exp_dir/name/version`` (version: the start time)."""
    if config.run_dir:
        return Path(config.run_dir)
    version = config.version or (when or _dt.datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    name = config.name or "default"
    for label, part in (("name", name), ("version", version)):
        if Path(part).is_absolute() or ".." in Path(part).parts:
            raise ConfigError(f"{label}: {part!r} would leave exp_dir; use a plain folder name",
                              path=label, value=part)
    return Path(config.exp_dir or ".") / name / version


def build_bus(
    config: ExpbusConfig,
    *,
    run_dir: str | os.PathLike[str],
    run_id: str | None = None,
    global_rank: int = 0,
    world_size: int = 1,
    extra_sinks: Mapping[str, Sink] | None = None,
    catch_up: bool = True,
    value_resolver: ValueResolver | None = None,
) -> Bus:
    """A (not yet opened) bus with every enabled sink of ``config`` plus ``extra_sinks``.

    With ``catch_up`` (the default) each sink first receives the journal records of
    ``run_dir`` it has not acknowledged yet (see :class:`expbus.bus.Bus`).

    Active :func:`expbus.sinks.testing.capture_events` blocks add their memory sink.
    """
    bus = Bus(
        run_dir,
        run_id=run_id,
        journal=config.journal.enabled,
        journal_name=config.journal.name,
        fsync_interval=config.journal.fsync_interval,
        poll_interval=config.bus.poll_interval,
        open_timeout=config.bus.open_timeout,
        global_rank=global_rank,
        world_size=world_size,
        catch_up=catch_up,
        value_resolver=value_resolver,
    )
    check_workers(config.bus.workers, "bus.workers")
    for sink_id, spec in config.sinks.items():
        if spec.get("enabled", True) is False:
            continue
        sink, policy = create_sink(sink_id, spec)
        where = sink_workers(spec, config.bus.workers)
        if where == "thread" and spec.get("worker_priority") is not None:
            raise ConfigError(f"sinks.{sink_id}.worker_priority: {spec['worker_priority']!r} applies to a sink "
                              "in a worker process, and this one runs on a thread of the training process; "
                              "remove the key, or set workers: process",
                              path=f"sinks.{sink_id}.worker_priority", value=spec["worker_priority"])
        if where == "process":
            # The sink built above only checked the options; the child builds its own.
            options = {k: v for k, v in spec.items() if k not in RESERVED_KEYS}
            sink = ProcessSink(
                spec["type"], options, sink_id=sink_id,
                call_timeout=policy.write_timeout + CALL_TIMEOUT_GRACE,
                open_timeout=config.bus.open_timeout, close_timeout=config.bus.close_timeout,
                priority=spec.get("worker_priority") or "idle",
            )
        bus.add_sink(sink_id, sink, policy)
    for sink_id, sink in (extra_sinks or {}).items():
        bus.add_sink(sink_id, sink)
    from .testing import active_captures

    for index, capture in enumerate(active_captures()):
        # A capture sees this session's events only, never a catch-up of earlier ones.
        bus.add_sink(f"_capture{index}", capture, SinkPolicy(when_full="block", batch_delay=0.05, catch_up=False))
    return bus
