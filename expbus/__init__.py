"""expbus: an experiment manager for PyTorch Lightning whose logging never slows the training step.

The public API, re-exported from ``expbus.bus`` (events, the bus, the journal), ``expbus.sinks``
(the sink protocol, registry and built-in sinks) and ``expbus.trainer_bridge`` (the Lightning
callback). ``expbus.trainer_bridge`` is imported lazily so that ``import expbus`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from expbus.bus import (
    AnyEvent,
    Bus,
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    JournalReader,
    Metrics,
    RunFinished,
    RunStarted,
    SinkContext,
    SinkHealth,
    SinkOpenError,
    SinkPolicy,
    Text,
    Timing,
    TransientSinkError,
    read_journal,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AnyEvent",
    "Bus",
    "Event",
    "RunStarted",
    "Hyperparams",
    "Metrics",
    "Text",
    "CheckpointSaved",
    "CheckpointRemoved",
    "Timing",
    "RunFinished",
    "JournalReader",
    "read_journal",
    "SinkContext",
    "SinkHealth",
    "SinkOpenError",
    "SinkPolicy",
    "TransientSinkError",
    "BridgeCallback",
    "ConfigError",
    "ExpbusConfig",
    "load_config",
    "build_bus",
    "Sink",
    "available_sinks",
    "create_sink",
    "capture_events",
    "MemorySink",
    "exp_manager",
    "ExpManagerConfig",
    "load_exp_manager_config",
    "clean_exp_ckpt",
    "restore_weights",
    "NotFoundError",
    "LoggerMisconfigurationError",
    "CheckpointMisconfigurationError",
    "hydra_runner",
]

_LAZY = {
    "BridgeCallback": "expbus.trainer_bridge",
    "ConfigError": "expbus.sinks",
    "ExpbusConfig": "expbus.sinks",
    "load_config": "expbus.sinks",
    "build_bus": "expbus.sinks",
    "Sink": "expbus.sinks",
    "available_sinks": "expbus.sinks",
    "create_sink": "expbus.sinks",
    "capture_events": "expbus.sinks.testing",
    "MemorySink": "expbus.sinks.testing",
    "exp_manager": "expbus.trainer_bridge.exp_manager",
    "ExpManagerConfig": "expbus.trainer_bridge.exp_manager",
    "load_exp_manager_config": "expbus.trainer_bridge.exp_manager",
    "clean_exp_ckpt": "expbus.trainer_bridge.exp_manager",
    "restore_weights": "expbus.trainer_bridge.exp_manager",
    "NotFoundError": "expbus.trainer_bridge.exp_manager",
    "LoggerMisconfigurationError": "expbus.trainer_bridge.exp_manager",
    "CheckpointMisconfigurationError": "expbus.trainer_bridge.exp_manager",
    "hydra_runner": "expbus.trainer_bridge.hydra_runner",
}

if TYPE_CHECKING:
    from expbus.sinks import (
        ConfigError,
        ExpbusConfig,
        Sink,
        available_sinks,
        build_bus,
        create_sink,
        load_config,
    )
    from expbus.sinks.testing import MemorySink, capture_events
    from expbus.trainer_bridge import BridgeCallback
    from expbus.trainer_bridge.exp_manager import (
        CheckpointMisconfigurationError,
        ExpManagerConfig,
        LoggerMisconfigurationError,
        NotFoundError,
        clean_exp_ckpt,
        exp_manager,
        load_exp_manager_config,
        restore_weights,
    )
    from expbus.trainer_bridge.hydra_runner import hydra_runner


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'expbus' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
