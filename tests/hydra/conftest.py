"""Make the repository's ``hydra_plugins/`` importable when expbus is installed without it (an older install)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.expbus_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


if not _installed():
    # hydra_plugins is a namespace package: a path entry added later still extends it.
    sys.path.append(str(ROOT))
