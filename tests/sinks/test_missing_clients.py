"""Every backend sink, found through the registry, names the extra to install when its client is missing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from expbus.bus import SinkContext
from expbus.sinks import resolve_sink_class
from expbus.sinks._optional import MissingClientError

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("tensorboard", "tensorboard", {}),
    ("mlflow", "mlflow", {"tracking_uri": "sqlite:////nonexistent/m.db"}),
    ("wandb", "wandb", {"offline": True}),
    ("clearml", "clearml", {}),
    ("neptune", "neptune", {}),
]


@pytest.mark.parametrize(("sink_type", "client", "options"), BACKENDS, ids=[b[0] for b in BACKENDS])
def test_missing_client_names_the_extra(
    sink_type: str, client: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = resolve_sink_class(sink_type)(**options)  # constructing never imports the client
    monkeypatch.setitem(sys.modules, client, None)
    with pytest.raises(MissingClientError, match=rf"pip install 'expbus\[{sink_type}\]'"):
        sink.open(SinkContext(sink_id="x", run_dir=tmp_path, run_id="r"))
