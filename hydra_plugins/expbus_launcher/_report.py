"""What the launcher shows: a live status line while the sweep runs, a summary table, and a failed job's error."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ._jobs import Job

__all__ = ["JobFailedError", "StatusLine", "log_tail", "summary_table"]


class JobFailedError(RuntimeError):
    """A sweep job exited with a non-zero code; the message holds its overrides, exit code and log tail."""


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a job's log (empty when there is none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def failure(job: Job, tail_lines: int) -> JobFailedError:
    """The error a failed job raises, as NeMo's launcher reports it: arguments, return code, error trace."""
    return JobFailedError(
        f"sweep job #{job.num} failed\n"
        f"Hyperparameter Arguments : {job.shown_overrides}\n"
        f"Process Return code : {job.returncode}\n"
        f"Log : {job.log_path}\n"
        f"Error Trace (last {tail_lines} lines of the log) :\n{log_tail(job.log_path, tail_lines)}")


def status_of(job: Job) -> str:
    """``queued``, ``running``, ``done`` or ``failed``."""
    if job.returncode is None:
        return "running" if job.slot else "queued"
    return "done" if job.returncode == 0 else "failed"


def summary_table(jobs: Sequence[Job]) -> str:
    """One row per job: number, overrides, status, return code, duration, log path."""
    header = ("job", "overrides", "status", "rc", "duration", "log")
    rows = [header] + [
        (str(j.num), j.shown_overrides, status_of(j), "" if j.returncode is None else str(j.returncode),
         f"{j.seconds:.1f}s", str(j.log_path)) for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class StatusLine:
    """Counts of running / done / failed / queued jobs, redrawn in place on a terminal.

    Off a terminal (a log file, CI) nothing is redrawn: the launcher's per-job start and end
    lines carry the same information.

    Args:
        stream: where to draw (default ``sys.stderr``).
        interval: seconds between redraws.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._width = 0

    def text(self, jobs: Sequence[Job]) -> str:
        """The line: counts, then the running jobs' overrides."""
        counts = {s: 0 for s in ("running", "done", "failed", "queued")}
        for job in jobs:
            counts[status_of(job)] += 1
        running = "; ".join(f"#{j.num}@{j.slot} {j.shown_overrides}" for j in jobs if status_of(j) == "running")
        head = " | ".join(f"{k} {v}" for k, v in counts.items())
        return f"[expbus sweep] {head}" + (f" :: {running}" if running else "")

    def update(self, jobs: Sequence[Job], *, force: bool = False) -> None:
        """Redraw, at most once per ``interval`` unless ``force``."""
        now = time.monotonic()
        if not self.live or (not force and now - self._last < self.interval):
            return
        self._last = now
        line = self.text(jobs)[:200]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        """Erase the line (before a log line, and at the end)."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
