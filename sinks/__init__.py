"""expbus.sinks: the sink protocol, the registry, the YAML configuration and the built-in sinks.

A sink needs only ``write(batch)``; see :class:`expbus.bus.Sink`. Sinks are found by a
registered name (entry-point group ``expbus.sinks``) or an import path
``package.module:Class`` in the ``type:`` key of their YAML block.
"""

from expbus.bus import Sink, SinkContext, SinkOpenError, SinkPolicy, TransientSinkError

from ._config import (
    BusConfig,
    ExpbusConfig,
    JournalConfig,
    build_bus,
    load_config,
    resolve_run_dir,
    sink_workers,
)
from ._errors import ConfigError
from ._process import ProcessSink, wait_for_workers
from ._registry import (
    ENTRY_POINT_GROUP,
    RESERVED_KEYS,
    available_sinks,
    create_sink,
    resolve_sink_class,
    validate_sink_options,
)
from ._replay import ReplayProgress, ReplayResult, journal_run_id, replay_journal

__all__ = [
    "Sink",
    "SinkContext",
    "SinkPolicy",
    "SinkOpenError",
    "TransientSinkError",
    "ConfigError",
    "ExpbusConfig",
    "JournalConfig",
    "BusConfig",
    "load_config",
    "build_bus",
    "resolve_run_dir",
    "ENTRY_POINT_GROUP",
    "RESERVED_KEYS",
    "available_sinks",
    "create_sink",
    "resolve_sink_class",
    "validate_sink_options",
    "replay_journal",
    "ProcessSink",
    "wait_for_workers",
    "sink_workers",
    "ReplayProgress",
    "ReplayResult",
    "journal_run_id",
]
