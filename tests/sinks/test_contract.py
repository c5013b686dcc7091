"""Every built-in sink passes the public sink contract, read back from what it wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from expbus.bus import from_json
from expbus.sinks.contract import SinkContract, metric_points
from expbus.sinks.jsonl import JsonlSink
from expbus.sinks.testing import MemorySink


class TestJsonlContract(SinkContract):
    def make_sink(self, run_dir: Path) -> JsonlSink:
        return JsonlSink(path="events.jsonl")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        lines = (run_dir / "events.jsonl").read_bytes().splitlines()
        return metric_points([from_json(line) for line in lines])


class TestMemoryContract(SinkContract):
    def make_sink(self, run_dir: Path) -> MemorySink:
        self.sink = MemorySink()
        return self.sink

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        return metric_points(self.sink.events)


class TestDLLoggerContract(SinkContract):
    def make_sink(self, run_dir: Path) -> Any:
        from expbus.sinks.dllogger import DLLoggerSink

        return DLLoggerSink(json_file="dllogger.json")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        points = []
        for line in (run_dir / "dllogger.json").read_text().splitlines():
            record = json.loads(line.removeprefix("DLLL "))
            if record["type"] == "LOG" and isinstance(record["step"], int):
                values = {k: v for k, v in record["data"].items() if k != "epoch"}
                points.append((record["step"], values))
        return points


class TestCsvContract(SinkContract):
    def make_sink(self, run_dir: Path) -> Any:
        from expbus.sinks.csv import CsvSink

        return CsvSink(path="metrics.csv")

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        with open(run_dir / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [
            (int(row["step"]), {k: float(v) for k, v in row.items() if k not in ("step", "epoch") and v != ""})
            for row in rows
        ]
