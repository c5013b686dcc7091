"""Every built-in sink passes the public sink contract, read back from what it wrote."""

from __future__ import annotations

from pathlib import Path

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
