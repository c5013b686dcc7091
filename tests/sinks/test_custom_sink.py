"""A user's own sink, found once through an entry point and once through an import path in YAML."""

from __future__ import annotations

import importlib
import sys
import textwrap
import time
from pathlib import Path

import pytest

from expbus.bus import Metrics, RunFinished
from expbus.sinks import available_sinks, build_bus, load_config

SINK_MODULE = textwrap.dedent(
    '''
    """A third-party sink, as a user would ship it."""
    from __future__ import annotations

    RECEIVED: list = []
    OPENED: list = []


    class MySink:
        def __init__(self, url: str, retries: int = 1) -> None:
            self.url = url
            self.retries = retries

        def open(self, context) -> None:
            OPENED.append((self.url, self.retries, str(context.run_dir)))

        def write(self, batch) -> None:
            RECEIVED.extend(batch)
    '''
)


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An installed distribution ``expbus-testsink`` (module + dist-info with an entry point)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "expbus_testsink.py").write_text(SINK_MODULE)
    dist = site / "expbus_testsink-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: expbus-testsink\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[expbus.sinks]\nmysink = expbus_testsink:MySink\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    module = importlib.import_module("expbus_testsink")
    yield module
    sys.modules.pop("expbus_testsink", None)


def _publish_some(config_data: dict, run_dir: Path) -> None:
    bus = build_bus(load_config(config_data), run_dir=run_dir)
    with bus:
        for i in range(25):
            bus.publish(Metrics(time=time.time(), step=i, values={"loss": i * 1.0}))
        bus.publish(RunFinished(time=time.time(), status="completed"))


def test_registered_through_an_entry_point(user_package, run_dir: Path) -> None:
    assert available_sinks()["mysink"] == "expbus_testsink:MySink"
    _publish_some({"sinks": {"mine": {"type": "mysink", "url": "http://127.0.0.1:1", "retries": 3}}}, run_dir)
    assert [e.step for e in user_package.RECEIVED[:-1]] == list(range(25))
    assert isinstance(user_package.RECEIVED[-1], RunFinished)
    assert user_package.OPENED == [("http://127.0.0.1:1", 3, str(run_dir))]


def test_found_through_an_import_path(user_package, run_dir: Path) -> None:
    _publish_some({"sinks": {"mine": {"type": "expbus_testsink:MySink", "url": "u"}}}, run_dir)
    assert len(user_package.RECEIVED) == 26
    assert user_package.OPENED[0][:2] == ("u", 1)


def test_user_sink_options_are_validated(user_package) -> None:
    from expbus.sinks import ConfigError

    with pytest.raises(ConfigError, match=r"sinks\.mine\.ulr: unknown key; did you mean url\?"):
        load_config({"sinks": {"mine": {"type": "mysink", "ulr": "x"}}})
    with pytest.raises(ConfigError, match=r"sinks\.mine\.retries: Expected `int`"):
        load_config({"sinks": {"mine": {"type": "mysink", "url": "x", "retries": "many"}}})
    with pytest.raises(ConfigError, match=r"sinks\.mine: .*url"):
        build_bus(load_config({"sinks": {"mine": {"type": "mysink"}}}), run_dir="unused")
