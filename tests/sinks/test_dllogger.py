"""Tests of the dllogger sink, byte for byte against DLLogger's own backends (vendored below as the oracle)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from expbus.bus import (
    Bus,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    SinkContext,
    Text,
    Timing,
)
from expbus.sinks._registry import create_sink
from expbus.sinks.dllogger import DLLoggerSink

# ---------------------------------------------------------------------------------------
# The oracle: dllogger/logger.py of github.com/NVIDIA/dllogger at commit 0478734 (v1.1.0),
# verbatim (Apache-2.0, NVIDIA). It runs with its clock (``datetime.now``) scripted and its
# ``atexit`` hooks stubbed; nothing else of it is changed.
# ---------------------------------------------------------------------------------------
_DLLOGGER_SOURCE = r'''# Copyright (c) 2019, NVIDIA CORPORATION. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

from abc import ABC, abstractmethod
from collections import defaultdict
from datetime import datetime
import json
import atexit


class Backend(ABC):
    def __init__(self, verbosity):
        self._verbosity = verbosity

    @property
    def verbosity(self):
        return self._verbosity

    @abstractmethod
    def log(self, timestamp, elapsedtime, step, data):
        pass

    @abstractmethod
    def metadata(self, timestamp, elapsedtime, metric, metadata):
        pass


class Verbosity:
    OFF = -1
    DEFAULT = 0
    VERBOSE = 1


class Logger:
    def __init__(self, backends):
        self.backends = backends
        atexit.register(self.flush)
        self.starttime = datetime.now()

    def metadata(self, metric, metadata):
        timestamp = datetime.now()
        elapsedtime = (timestamp - self.starttime).total_seconds()
        for b in self.backends:
            b.metadata(timestamp, elapsedtime, metric, metadata)

    def log(self, step, data, verbosity=1):
        timestamp = datetime.now()
        elapsedtime = (timestamp - self.starttime).total_seconds()
        for b in self.backends:
            if b.verbosity >= verbosity:
                b.log(timestamp, elapsedtime, step, data)

    def flush(self):
        for b in self.backends:
            b.flush()


def default_step_format(step):
    return str(step)


def default_metric_format(metric, metadata, value):
    unit = metadata["unit"] if "unit" in metadata.keys() else ""
    format = "{" + metadata["format"] + "}" if "format" in metadata.keys() else "{}"
    return "{} : {} {}".format(
        metric, format.format(value) if value is not None else value, unit
    )


def default_prefix_format(timestamp):
    return "DLL {} - ".format(timestamp)


class StdOutBackend(Backend):
    def __init__(
        self,
        verbosity,
        step_format=default_step_format,
        metric_format=default_metric_format,
        prefix_format=default_prefix_format,
    ):
        super().__init__(verbosity=verbosity)

        self._metadata = defaultdict(dict)
        self.step_format = step_format
        self.metric_format = metric_format
        self.prefix_format = prefix_format

    def metadata(self, timestamp, elapsedtime, metric, metadata):
        self._metadata[metric].update(metadata)

    def log(self, timestamp, elapsedtime, step, data):
        print(
            "{}{} {}".format(
                self.prefix_format(timestamp),
                self.step_format(step),
                " ".join(
                    [
                        self.metric_format(m, self._metadata[m], v)
                        for m, v in data.items()
                    ]
                ),
            )
        )

    def flush(self):
        pass


class JSONStreamBackend(Backend):
    def __init__(self, verbosity, filename, append=False):
        super().__init__(verbosity=verbosity)
        self._filename = filename
        self.file = open(filename, "a" if append else "w")
        atexit.register(self.file.close)

    def metadata(self, timestamp, elapsedtime, metric, metadata):
        self.file.write(
            "DLLL {}\n".format(
                json.dumps(
                    dict(
                        timestamp=str(timestamp.timestamp()),
                        elapsedtime=str(elapsedtime),
                        datetime=str(timestamp.astimezone()),
                        type="METADATA",
                        metric=metric,
                        metadata=metadata,
                    )
                )
            )
        )

    def log(self, timestamp, elapsedtime, step, data):
        self.file.write(
            "DLLL {}\n".format(
                json.dumps(
                    dict(
                        timestamp=str(timestamp.timestamp()),
                        datetime=str(timestamp.astimezone()),
                        elapsedtime=str(elapsedtime),
                        type="LOG",
                        step=step,
                        data=data,
                    )
                )
            )
        )

    def flush(self):
        self.file.flush()
'''

_DEFAULT = 0  # dllogger.Verbosity.DEFAULT: what the module-level dllogger.log (NeMo's call) uses
_VERBOSE = 1


class DLLoggerOracle:
    """The real ``dllogger.Logger`` with its real backends, fed events as NeMo's ``DLLogger`` feeds it."""

    def __init__(self, start: float, *, json_path: Path | None, stdout: bool = False, verbose: bool = False,
                 append: bool = False) -> None:
        namespace: dict[str, Any] = {"__name__": "dllogger_oracle"}
        exec(compile(_DLLOGGER_SOURCE, "dllogger/logger.py", "exec"), namespace)
        self._now: deque[datetime] = deque()
        now = self._now

        class ScriptedDatetime(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                return now.popleft()

        namespace["datetime"] = ScriptedDatetime
        # Its atexit hooks would flush/close files after the test is gone.
        namespace["atexit"] = SimpleNamespace(register=lambda *args, **kwargs: None)
        verbosity = _VERBOSE if verbose else _DEFAULT
        self.backends: list[Any] = []
        if json_path is not None:
            self.backends.append(namespace["JSONStreamBackend"](verbosity, str(json_path), append=append))
        if stdout:
            self.backends.append(namespace["StdOutBackend"](verbosity))
        # dllogger.Logger reads datetime.now() once at init (DLLogger's start time).
        self._now.append(datetime.fromtimestamp(start))
        self.logger = namespace["Logger"](self.backends)

    def log(self, when: float, step: Any, data: dict[str, Any], verbosity: int = _DEFAULT) -> None:
        self._now.append(datetime.fromtimestamp(when))
        self.logger.log(step, data, verbosity=verbosity)

    def feed(self, events: Sequence[Event]) -> None:
        """NeMo's mapping (nemo/utils/loggers/dllogger.py) with Lightning's own helpers."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict, _sanitize_callable_params

        for event in events:
            if isinstance(event, Hyperparams):
                # DLLogger.log_hyperparams: dllogger.log(step="PARAMETER", data=params)
                params = _sanitize_callable_params(_flatten_dict(_convert_params(dict(event.params))))
                self.log(event.time, "PARAMETER", params)
            elif isinstance(event, Metrics):
                # Lightning's logger connector adds the epoch; DLLogger.log_metrics logs at the step.
                metrics: dict[str, Any] = dict(event.values)
                if event.epoch is not None:
                    metrics.setdefault("epoch", event.epoch)
                self.log(event.time, event.step, metrics)
            elif isinstance(event, Timing):
                # The sink's own choice (NeMo has no Timing event): durations at VERBOSE level.
                self.log(event.time, event.step, dict(event.durations), _VERBOSE)

    def close(self) -> None:
        for backend in self.backends:
            backend.flush()
            if hasattr(backend, "file"):
                backend.file.close()


# ---------------------------------------------------------------------------------------

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
NAN = float("nan")
INF = float("inf")


def run_events() -> list[Event]:
    """A run with every event type, NaN and infinities, odd timestamps and an epoch-less step."""
    return [
        RunStarted(time=T0 + 0.5, run_id="r", host="h", pid=7),
        Hyperparams(
            time=T0 + 1.0,
            params={
                "lr": 0.001,
                "model": {"hidden": 128, "layers": [64, 32], "act": "gelu", "dropout": None},
                "optim": [{"name": "adam"}, {"name": "sgd", "momentum": 0.9}],
                "tags": [],  # Lightning's _flatten_dict drops an empty list: so must the sink
                "amp": True,
                "name": "résumé",  # json.dumps escapes it (ensure_ascii)
            },
        ),
        Metrics(time=T0 + 2.000001, step=1, values={"train_loss": 0.5, "lr": 1e-3}, epoch=0),
        Metrics(time=T0 + 3.25, step=2, values={"train_loss": NAN, "grad_norm": INF, "neg": -INF}, epoch=0),
        Timing(time=T0 + 3.5, step=2, durations={"train_step_timing": 0.125}),
        Text(time=T0 + 3.6, step=2, name="note", text="hello"),
        CheckpointSaved(time=T0 + 3.7, step=2, path="/ckpt/a.ckpt"),
        Metrics(time=T0 + 4.123456789, step=3, values={"val_loss": 0.25}),
        Metrics(time=T0 + 5.9999996, step=3, values={"epoch": 7.0, "x": 1.0}, epoch=1),
        RunFinished(time=T0 + 6.0, status="completed", step=3),
    ]


@pytest.fixture
def set_tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Switch the process's local time zone (DLLogger writes local datetimes)."""

    def set_zone(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def context(run_dir: Path) -> SinkContext:
    return SinkContext(sink_id="dll", run_dir=run_dir, run_id="r")


def drive(sink: DLLoggerSink, run_dir: Path, events: Sequence[Event], *, start: float = T0,
          batches: int = 3) -> None:
    """open / write (in a few batches) / flush / close, with the start clock fixed."""
    sink._clock = lambda: start
    sink.open(context(run_dir))
    size = max(1, len(events) // batches)
    for i in range(0, len(events), size):
        sink.write(events[i : i + size])
    sink.flush()
    sink.close()


def oracle_bytes(path: Path, events: Sequence[Event], *, start: float = T0, verbose: bool = False) -> bytes:
    oracle = DLLoggerOracle(start, json_path=path, verbose=verbose)
    oracle.feed(events)
    oracle.close()
    return path.read_bytes()


# The lines DLLogger writes for run_events() in UTC (generated with the oracle above, then
# frozen here so that a change on either side shows up as a diff).
GOLDEN_UTC = [
    'DLLL {"timestamp": "1700000001.0", "datetime": "2023-11-14 22:13:21+00:00", "elapsedtime": "1.0", '
    '"type": "LOG", "step": "PARAMETER", "data": {"lr": 0.001, "model/hidden": 128, "model/layers": [64, 32], '
    '"model/act": "gelu", "model/dropout": null, "optim/0/name": "adam", "optim/1/name": "sgd", '
    '"optim/1/momentum": 0.9, "amp": true, "name": "r\\u00e9sum\\u00e9"}}',
    'DLLL {"timestamp": "1700000002.000001", "datetime": "2023-11-14 22:13:22.000001+00:00", '
    '"elapsedtime": "2.000001", "type": "LOG", "step": 1, "data": {"train_loss": 0.5, "lr": 0.001, "epoch": 0}}',
    'DLLL {"timestamp": "1700000003.25", "datetime": "2023-11-14 22:13:23.250000+00:00", "elapsedtime": "3.25", '
    '"type": "LOG", "step": 2, "data": {"train_loss": NaN, "grad_norm": Infinity, "neg": -Infinity, "epoch": 0}}',
    'DLLL {"timestamp": "1700000004.123457", "datetime": "2023-11-14 22:13:24.123457+00:00", '
    '"elapsedtime": "4.123457", "type": "LOG", "step": 3, "data": {"val_loss": 0.25}}',
    'DLLL {"timestamp": "1700000006.0", "datetime": "2023-11-14 22:13:26+00:00", "elapsedtime": "6.0", '
    '"type": "LOG", "step": 3, "data": {"epoch": 7.0, "x": 1.0}}',
]


def test_golden_lines_in_utc(tmp_path: Path, set_tz: Callable[[str], None]) -> None:
    set_tz("UTC0")
    sink = DLLoggerSink()
    drive(sink, tmp_path, run_events())
    assert sink.path == tmp_path / "dllogger.json"
    written = (tmp_path / "dllogger.json").read_text(encoding="ascii")
    assert written.splitlines() == GOLDEN_UTC
    assert written.endswith("\n")
    # ... and the real DLLogger writes exactly these lines too.
    assert oracle_bytes(tmp_path / "oracle.json", run_events()).decode().splitlines() == GOLDEN_UTC


@pytest.mark.parametrize("zone", ["UTC0", "IST-5:30", "EST5EDT,M3.2.0,M11.1.0", "America/Sao_Paulo"])
@pytest.mark.parametrize("verbose", [False, True])
def test_byte_for_byte_with_dllogger(tmp_path: Path, set_tz: Callable[[str], None], zone: str,
                                     verbose: bool) -> None:
    set_tz(zone)
    sink = DLLoggerSink(verbose=verbose)
    drive(sink, tmp_path, run_events(), start=T0 - 12.5)
    expected = oracle_bytes(tmp_path / "oracle.json", run_events(), start=T0 - 12.5, verbose=verbose)
    assert (tmp_path / "dllogger.json").read_bytes() == expected
    assert len(expected.splitlines()) == (6 if verbose else 5)


def test_lines_parse_back(tmp_path: Path, set_tz: Callable[[str], None]) -> None:
    set_tz("IST-5:30")
    drive(DLLoggerSink(json_file="logs/dll.json"), tmp_path, run_events())
    lines = (tmp_path / "logs" / "dll.json").read_text().splitlines()
    records = []
    for line in lines:
        prefix, _, payload = line.partition(" ")
        assert prefix == "DLLL"
        record = json.loads(payload)
        assert list(record) == ["timestamp", "datetime", "elapsedtime", "type", "step", "data"]
        assert record["type"] == "LOG"
        assert isinstance(record["timestamp"], str) and isinstance(record["elapsedtime"], str)
        records.append(record)
    assert [r["step"] for r in records] == ["PARAMETER", 1, 2, 3, 3]
    # Local datetimes, with the zone's offset, of the event times.
    assert records[0]["datetime"] == "2023-11-15 03:43:21+05:30"
    assert [float(r["timestamp"]) for r in records] == pytest.approx(
        [T0 + 1.0, T0 + 2.000001, T0 + 3.25, T0 + 4.123457, T0 + 6.0], abs=1e-6
    )
    assert [float(r["elapsedtime"]) for r in records] == pytest.approx([1.0, 2.000001, 3.25, 4.123457, 6.0])
    nonfinite = records[2]["data"]
    assert math.isnan(nonfinite["train_loss"])
    assert nonfinite["grad_norm"] == math.inf and nonfinite["neg"] == -math.inf
    assert nonfinite["epoch"] == 0 and isinstance(nonfinite["epoch"], int)
    assert "epoch" not in records[3]["data"]
    assert records[4]["data"] == {"epoch": 7.0, "x": 1.0}  # a logged "epoch" value wins
    assert records[0]["data"]["model/layers"] == [64, 32]
    assert "tags" not in records[0]["data"]


def test_stdout_matches_stdout_backend(tmp_path: Path, set_tz: Callable[[str], None],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    set_tz("EST5EDT,M3.2.0,M11.1.0")
    oracle = DLLoggerOracle(T0, json_path=None, stdout=True)
    oracle.feed(run_events())
    expected = capsys.readouterr().out
    sink = DLLoggerSink(json_file=None, stdout=True)
    drive(sink, tmp_path, run_events())
    assert capsys.readouterr().out == expected
    assert expected.splitlines()[2] == "DLL 2023-11-14 17:13:23.250000 - 2 train_loss : nan  grad_norm : inf  " \
                                       "neg : -inf  epoch : 0 "
    assert expected.splitlines()[0].startswith("DLL 2023-11-14 17:13:21 - PARAMETER lr : 0.001  model/hidden : 128 ")
    assert sink.path is None and list(tmp_path.iterdir()) == []  # no json_file: no file


def test_file_and_stdout_together(tmp_path: Path, set_tz: Callable[[str], None],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    set_tz("UTC0")
    drive(DLLoggerSink(stdout=True), tmp_path, run_events())
    out = capsys.readouterr().out.splitlines()
    assert (tmp_path / "dllogger.json").read_text().splitlines() == GOLDEN_UTC
    assert len(out) == 5 and all(line.startswith("DLL 2023-11-14 22:13:2") for line in out)


def test_append_continues_and_truncate_restarts(tmp_path: Path, set_tz: Callable[[str], None]) -> None:
    set_tz("UTC0")
    events = run_events()
    drive(DLLoggerSink(), tmp_path, events)
    # A resumed run opens a new sink: its elapsed time restarts from its own open, as
    # a new DLLogger process's would.
    resumed = [Metrics(time=T0 + 101.0, step=4, values={"train_loss": 0.125}, epoch=1)]
    drive(DLLoggerSink(), tmp_path, resumed, start=T0 + 100.0)
    lines = (tmp_path / "dllogger.json").read_text().splitlines()
    assert lines[:5] == GOLDEN_UTC
    assert lines[5] == (
        'DLLL {"timestamp": "1700000101.0", "datetime": "2023-11-14 22:15:01+00:00", "elapsedtime": "1.0", '
        '"type": "LOG", "step": 4, "data": {"train_loss": 0.125, "epoch": 1}}'
    )
    oracle = DLLoggerOracle(T0 + 100.0, json_path=tmp_path / "oracle.json")
    oracle.feed(resumed)
    oracle.close()
    assert lines[5] + "\n" == (tmp_path / "oracle.json").read_text()

    drive(DLLoggerSink(append=False), tmp_path, resumed, start=T0 + 100.0)
    assert (tmp_path / "dllogger.json").read_text().splitlines() == [lines[5]]


def test_replayed_events_never_get_a_negative_elapsed_time(tmp_path: Path, set_tz: Callable[[str], None]) -> None:
    set_tz("UTC0")
    # Opened after the events happened (a journal replayed into a new sink).
    drive(DLLoggerSink(), tmp_path, run_events(), start=T0 + 3600.0)
    elapsed = [float(json.loads(line[5:])["elapsedtime"]) for line in (tmp_path / "dllogger.json").open()]
    assert elapsed == pytest.approx([0.0, 1.000001, 2.25, 3.123457, 5.0])


def test_warns_when_it_has_nowhere_to_log(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    sink = DLLoggerSink(json_file="", stdout=False)
    with caplog.at_level(logging.WARNING, logger="expbus.sinks.dllogger"):
        drive(sink, tmp_path, run_events())
    assert "neither json_file nor stdout" in caplog.text
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


def test_options_are_nemos(tmp_path: Path) -> None:
    sink = DLLoggerSink()
    # NeMo's DLLoggerParams: verbose=False, stdout=False, json_file="./dllogger.json".
    assert (sink.json_file, sink.stdout, sink.verbose, sink.append) == ("./dllogger.json", False, False, True)
    built, _policy = create_sink(
        "dll", {"type": "dllogger", "json_file": None, "stdout": True, "verbose": True, "append": False}
    )
    assert isinstance(built, DLLoggerSink)
    assert (built.json_file, built.stdout, built.verbose, built.append) == (None, True, True, False)


def test_through_the_bus(run_dir: Path, set_tz: Callable[[str], None]) -> None:
    set_tz("IST-5:30")
    sink = DLLoggerSink(json_file="dll/out.json")
    sink._clock = lambda: T0
    events = run_events()
    with Bus(run_dir, run_id="r", sinks={"dll": sink}) as bus:
        for event in events[:5]:
            bus.publish(event)
        assert bus.flush()
        # Flushed: what was published so far is in the file already.
        assert len((run_dir / "dll" / "out.json").read_text().splitlines()) == 3
        for event in events[5:]:
            bus.publish(event)
    assert bus.stats()["dll"].state == "closed"
    written = (run_dir / "dll" / "out.json").read_bytes()
    assert written == oracle_bytes(run_dir / "oracle.json", events)
    assert [json.loads(line[5:])["step"] for line in written.decode().splitlines()] == ["PARAMETER", 1, 2, 3, 3]
