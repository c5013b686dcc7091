"""expbus.trainer_bridge.exp_manager: NeMo's ``exp_manager`` for any LightningModule, its loggers as expbus sinks.

``exp_manager(trainer, cfg)`` takes a NeMo ``exp_manager:`` YAML block unchanged. Lightning is
imported when ``exp_manager``, ``clean_exp_ckpt`` or ``restore_weights`` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import CheckpointMisconfigurationError, LoggerMisconfigurationError, NotFoundError

__all__ = [
    "CheckpointMisconfigurationError",
    "ExpManagerConfig",
    "LoggerMisconfigurationError",
    "NotFoundError",
    "clean_exp_ckpt",
    "exp_manager",
    "load_exp_manager_config",
    "restore_weights",
]

_LAZY = {
    "exp_manager": "._manager",
    "ExpManagerConfig": "._config",
    "load_exp_manager_config": "._config",
    "clean_exp_ckpt": "._clean",
    "restore_weights": "._export",
}

if TYPE_CHECKING:
    from ._clean import clean_exp_ckpt
    from ._config import ExpManagerConfig, load_exp_manager_config
    from ._export import restore_weights
    from ._manager import exp_manager


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
