"""Helpers shared by the benchmarks: statistics, data-arrival checks, reading outputs back."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from expbus.bus import JournalReader

__all__ = [
    "Checks",
    "count_lines",
    "emit",
    "jsonl_steps",
    "journal_steps",
    "median",
    "percentile",
    "steps_in_order",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """The median (50th percentile)."""
    return percentile(values, 50.0)


class Checks:
    """Data-arrival checks of one benchmark: each has a name, a detail and a verdict."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        """Record one check and echo it to stderr (loudly when it failed)."""
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        mark = "ok" if ok else "FAILED (DATA DID NOT ARRIVE)"
        print(f"  check {name}: {detail} -> {mark}", file=sys.stderr, flush=True)
        return ok

    def expect_equal(self, name: str, got: int, expected: int, what: str) -> bool:
        """``got == expected``, described as ``what got/expected``."""
        return self.check(name, got == expected, f"{what} {got}/{expected}")

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(item["ok"] for item in self.items)


def count_lines(path: Path) -> int:
    """Number of newline-terminated lines in a file (read in 1 MiB chunks)."""
    count = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
    return count


class _Step(msgspec.Struct):
    """Only the ``step`` of a Metrics JSON line (the other fields are skipped)."""

    step: int


_step_decoder = msgspec.json.Decoder(_Step)


def jsonl_steps(path: Path) -> list[int]:
    """The ``step`` of every line of a jsonl file written by the jsonl sink."""
    decode = _step_decoder.decode
    with open(path, "rb") as fh:
        return [decode(line).step for line in fh]


def journal_steps(path: Path) -> tuple[list[int], int, int]:
    """(steps of every journal record, bytes skipped, unknown records) of a run's journal."""
    reader = JournalReader(path)
    steps = [event.step for event in reader]  # type: ignore[attr-defined]
    return steps, reader.skipped_bytes, reader.unknown


def steps_in_order(steps: Iterable[int], n: int) -> bool:
    """True when ``steps`` is exactly ``0, 1, ..., n-1``."""
    return list(steps) == list(range(n))


def emit(result: dict[str, Any], json_out: str | None) -> None:
    """Write a benchmark's result as JSON to ``json_out`` (or stdout)."""
    text = json.dumps(result, indent=2)
    if json_out:
        Path(json_out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)


def finish(name: str, result: dict[str, Any], json_out: str | None, failure: str = "DATA-ARRIVAL CHECK FAILED") -> int:
    """Emit a benchmark's result (see :func:`emit`) and return its exit status: 1 when a check failed."""
    emit(result, json_out)
    if not result["ok"]:
        print(f"{name}: {failure}", file=sys.stderr)
        return 1
    return 0
