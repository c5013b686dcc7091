"""expbus.trainer_bridge: the Lightning callback that feeds the bus, and a runnable demo.

``import expbus.trainer_bridge`` is cheap; Lightning is imported when ``BridgeCallback`` or
``run_demo`` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BridgeCallback", "run_demo"]

_LAZY = {
    "BridgeCallback": "expbus.trainer_bridge.callback",
    "run_demo": "expbus.trainer_bridge.demo",
}

if TYPE_CHECKING:
    from .callback import BridgeCallback
    from .demo import run_demo


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'expbus.trainer_bridge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
