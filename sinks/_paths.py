"""Containment of sink paths: a relative path in a sink's options stays inside the run directory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._registry import RESERVED_KEYS

__all__ = ["check_sink_paths", "leaves_directory"]

# Options named like this hold a path (the same rule exp_manager uses for the files a
# resumed run keeps): ``path``, ``json_file``, ``hparams_file``, ``log_dir``, ``sub_dir``,
# ``save_dir``, ``cache_dir``, ``data_dir``.
_PATH_SUFFIXES = ("file", "path", "dir")


def leaves_directory(path: str | os.PathLike[str]) -> bool:
    """Whether a relative ``path`` climbs out of the directory it is relative to (``../x``, ``a/../../x``).

    Absolute paths (and ``~/...``) are a deliberate choice of the user and do not count.
    """
    candidate = Path(os.fspath(path)).expanduser()
    if candidate.is_absolute() or ".." not in candidate.parts:
        return False
    return os.path.normpath(candidate).split(os.sep)[0] == ".."


def check_sink_paths(sink_id: str, spec: Mapping[str, Any], *, base: str | None = None) -> None:
    """Refuse a sink block whose relative path options would leave the run directory.

    The bus resolves a sink's relative paths inside the run directory
    (:meth:`expbus.bus.SinkContext.resolve` refuses escapes too, at open); this check names
    the key before anything is created on disk.

    Args:
        sink_id: the sink's id.
        spec: its YAML block.
        base: the key path of the block in the error (``sinks.<id>`` by default).

    Raises:
        ConfigError: naming ``<base>.<key>``, the value and the fix.
    """
    where = base if base is not None else f"sinks.{sink_id}"
    for key, value in spec.items():
        if not isinstance(key, str) or key in RESERVED_KEYS or not key.endswith(_PATH_SUFFIXES):
            continue
        if not isinstance(value, (str, os.PathLike)) or not leaves_directory(value):
            continue
        raise ConfigError(
            f"{where}.{key}: {os.fspath(value)!r} would leave the run directory (sink {sink_id!r}); "
            "use a relative path inside the run directory (without '..'), or an absolute path to write "
            "elsewhere on purpose",
            path=f"{where}.{key}", value=value)
