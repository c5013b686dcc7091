"""The ``dllogger`` sink: NVIDIA DLLogger's ``DLLL {...}`` JSON-lines file, written as NeMo's ``DLLogger`` writes it."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from expbus.bus import Event, Hyperparams, Metrics, SinkContext, Timing

from ._files import naming_path
from ._flatten import flatten_params

__all__ = ["DLLoggerSink"]

log = logging.getLogger("expbus.sinks.dllogger")

# dllogger.Verbosity: a line is written when the backend's verbosity >= the line's.
_DEFAULT = 0
_VERBOSE = 1

# The step NeMo's ``DLLogger.log_hyperparams`` logs hyperparameters under.
PARAMETER_STEP = "PARAMETER"

Step = int | str | tuple[int, ...]


class DLLoggerSink:
    """Writes metrics and hyperparameters in DLLogger's format, as NeMo's ``DLLogger`` logs them.

    The file is byte-compatible with ``dllogger.JSONStreamBackend``: one
    ``DLLL {"timestamp": ..., "datetime": ..., "elapsedtime": ..., "type": "LOG", "step": ..., "data": {...}}``
    line per call, encoded by Python's ``json`` (so NaN and infinities are written ``NaN``,
    ``Infinity``, ``-Infinity``). Mapping (NeMo's): a ``Hyperparams`` event is one line with
    ``step: "PARAMETER"`` and the parameters flattened with ``/``; a ``Metrics`` event is one
    line with its integer step and its values, plus ``epoch`` when the event has one (as
    Lightning's logger connector adds it before ``log_metrics``). The timestamp of a line is the time of
    its event; ``elapsedtime`` counts from when the sink opened (DLLogger counts from its
    ``init``, which NeMo's ``exp_manager`` calls before training).

    Args:
        json_file: the DLLogger file; relative paths are inside the run directory. Empty or
            ``None`` writes no file (NeMo's ``DLLoggerParams.json_file``).
        stdout: also print every line to stdout as ``dllogger.StdOutBackend`` formats it
            (``DLL <datetime> - <step> <name> : <value> ...``).
        verbose: DLLogger's ``Verbosity.VERBOSE`` instead of ``DEFAULT``. Everything NeMo logs
            is at ``DEFAULT`` verbosity, so this adds only the VERBOSE-level lines: one per
            ``Timing`` event (its durations at its step).
        append: continue an existing file (resumed runs) instead of truncating it.
    """

    #: ``write`` hands everything to the OS before it returns, so the bus may advance this
    #: sink's delivery cursor as soon as a batch is acknowledged (see ``expbus.bus.Bus``).
    durable_writes = True

    def __init__(
        self,
        json_file: str | None = "./dllogger.json",
        stdout: bool = False,
        verbose: bool = False,
        append: bool = True,
    ) -> None:
        self.json_file = json_file
        self.stdout = stdout
        self.verbose = verbose
        self.append = append
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self._verbosity = _VERBOSE if verbose else _DEFAULT
        # Unix-seconds clock read once at open (DLLogger's start time); replaceable in tests.
        self._clock: Callable[[], float] = time.time
        self._opened_at: datetime | None = None
        self._start: datetime | None = None

    def open(self, context: SinkContext) -> None:
        """Open the file inside the run directory and start the elapsed-time clock."""
        # DLLogger keeps naive local datetimes (``datetime.now()``); so do we, so that the
        # timestamp, datetime and elapsed-time strings come out exactly as DLLogger's.
        self._opened_at = datetime.fromtimestamp(self._clock())
        self._start = None
        if self.json_file:
            self.path = context.resolve(self.json_file)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Text mode with the platform's newline, as JSONStreamBackend opens it; the
            # lines are ASCII (json.dumps escapes the rest) so the encoding never shows.
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
        elif not self.stdout:
            log.warning("dllogger sink %r: neither json_file nor stdout is set; it will log nothing",
                        context.sink_id)

    def write(self, batch: Sequence[Event]) -> None:
        """Write one DLLogger line per ``Metrics`` and ``Hyperparams`` event (and ``Timing`` when verbose).

        Raises:
            OSError: writing the file failed (disk full, ...); the error names the file.
        """
        with naming_path(self.path):
            for event in batch:
                if isinstance(event, Metrics):
                    self._log(event.time, event.step, _metrics_data(event), _DEFAULT)
                elif isinstance(event, Hyperparams):
                    self._log(event.time, PARAMETER_STEP, flatten_params(event.params), _DEFAULT)
                elif isinstance(event, Timing):
                    self._log(event.time, event.step, dict(event.durations), _VERBOSE)
            if self._file is not None:
                # One syscall per batch: a crash right after never loses a line the cursor counts.
                self._file.flush()

    def flush(self) -> None:
        """Hand the lines to the OS (and flush stdout when printing)."""
        if self._file is not None:
            with naming_path(self.path):
                self._file.flush()
        if self.stdout:
            sys.stdout.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _log(self, when: float, step: Step, data: dict[str, Any], verbosity: int) -> None:
        # dllogger.Logger.log: backends whose verbosity is below the line's skip it.
        if self._verbosity < verbosity:
            return
        timestamp = datetime.fromtimestamp(when)
        if self._start is None:
            assert self._opened_at is not None, "DLLoggerSink.write before open"
            # Events replayed from a journal may predate the open: never a negative elapsed time.
            self._start = min(self._opened_at, timestamp)
        elapsedtime = (timestamp - self._start).total_seconds()
        if self._file is not None:
            self._file.write(_json_line(timestamp, elapsedtime, step, data))
        if self.stdout:
            # One write per line (print() writes the newline separately), so that lines
            # from this worker thread do not interleave with other output mid-line.
            sys.stdout.write(_stdout_line(timestamp, step, data) + "\n")


def _json_line(timestamp: datetime, elapsedtime: float, step: Step, data: Mapping[str, Any]) -> str:
    """One ``JSONStreamBackend.log`` line: same keys, order, string conversions and json.dumps."""
    return "DLLL {}\n".format(
        json.dumps(
            dict(
                timestamp=str(timestamp.timestamp()),
                datetime=str(timestamp.astimezone()),
                elapsedtime=str(elapsedtime),
                type="LOG",
                step=step,
                data=data,
            ),
            # Only reached by values json cannot encode, where dllogger would raise.
            default=_json_default,
        )
    )


def _stdout_line(timestamp: datetime, step: Step, data: Mapping[str, Any]) -> str:
    """One ``StdOutBackend.log`` line (default step, metric and prefix formats, no metadata)."""
    # default_metric_format with empty metadata is "{} : {} {}".format(name, value, unit="");
    # default_prefix_format is "DLL {} - ".format(timestamp); default_step_format is str(step).
    metrics = " ".join(f"{name} : {value} " for name, value in data.items())
    return f"DLL {timestamp} - {step} {metrics}"


def _metrics_data(event: Metrics) -> dict[str, Any]:
    data: dict[str, Any] = dict(event.values)
    if event.epoch is not None:
        # Lightning's logger connector does ``metrics.setdefault("epoch", current_epoch)``
        # before every ``log_metrics``: an int, after the metric values.
        data.setdefault("epoch", event.epoch)
    return data


def _json_default(obj: Any) -> Any:
    # NeMo turns paths into str before logging; a tensor-like scalar becomes its number;
    # anything else is recorded by its text rather than failing the sink.
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)
