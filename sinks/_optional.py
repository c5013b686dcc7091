"""Lazy imports of backend clients, failing with the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingClientError", "require"]


class MissingClientError(ImportError):
    """A sink's backend client is not installed; the message names the extra."""


def require(module: str, *, sink: str, extra: str) -> ModuleType:
    """Import a backend client inside the sink that needs it.

    Raises:
        MissingClientError: ``the 'mlflow' sink needs the 'mlflow' package: pip install 'expbus[mlflow]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingClientError(
            f"the {sink!r} sink needs the {module.split('.')[0]!r} package, which cannot be imported ({exc}); "
            f"install it with: pip install 'expbus[{extra}]'"
        ) from exc
