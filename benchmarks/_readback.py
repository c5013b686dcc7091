"""Read logged metrics back from every backend, so that a fast-but-lossy configuration cannot win.

Each reader returns a :class:`Counted`: ``rows`` is the number of logged records (steps)
that carry every expected metric name, ``values`` the number of values of those names
found in total. The backends' own readers are used where they exist (TensorBoard's
``EventAccumulator``, MLflow's metric history, expbus's W&B offline-run reader, the
journal reader); CSV, jsonl and DLLogger files are parsed directly.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

__all__ = [
    "Counted",
    "count_csv",
    "count_dllogger",
    "count_journal",
    "count_jsonl",
    "count_mlflow",
    "count_tensorboard",
    "count_tensorboard_records",
    "count_wandb",
]


@dataclass
class Counted:
    """What a backend holds of the expected metrics: complete records and values."""

    rows: int
    values: int
    detail: str = ""


def _complete(present: Iterable[Iterable[str]], names: list[str]) -> Counted:
    wanted = set(names)
    rows = values = 0
    for keys in present:
        hit = wanted.intersection(keys)
        values += len(hit)
        rows += len(hit) == len(wanted)
    return Counted(rows, values)


def count_csv(path: Path, names: list[str]) -> Counted:
    """Rows of a ``metrics.csv`` (Lightning's ``CSVLogger`` or the csv sink) with every name filled."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return _complete(([k for k, v in row.items() if v not in ("", None)] for row in rows), names)


def count_tensorboard(log_dir: Path, names: list[str]) -> Counted:
    """Steps with every name, read by TensorBoard's ``EventAccumulator`` (no sampling: ``scalars=0``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    per_step: dict[int, set[str]] = {}
    values = 0
    for name in names:
        if name not in tags:
            continue
        for point in acc.Scalars(name):
            per_step.setdefault(point.step, set()).add(name)
            values += 1
    counted = _complete(per_step.values(), names)
    counted.values = values
    return counted


def count_mlflow(db_path: Path, experiment: str, names: list[str]) -> Counted:
    """Points of each name in the experiment's run, from MLflow's metric history (and the sqlite table)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{db_path}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return Counted(0, 0, f"no experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id])
    if len(runs) != 1:
        return Counted(0, 0, f"{len(runs)} runs in experiment {experiment!r}")
    run_id = runs[0].info.run_id
    # One name through the client's metric history (what the MLflow UI reads), all through SQL
    # (a get_metric_history per name would take seconds at K=100).
    history = client.get_metric_history(run_id, names[0])
    with sqlite3.connect(str(db_path)) as db:
        rows = db.execute(
            "SELECT step, key FROM metrics WHERE run_uuid = ?", (run_id,)
        ).fetchall()
    per_step: dict[int, set[str]] = {}
    for step, key in rows:
        per_step.setdefault(step, set()).add(key)
    counted = _complete(per_step.values(), names)
    first = Counter(key for _, key in rows)[names[0]]
    counted.detail = f"history({names[0]})={len(history)} sql({names[0]})={first}"
    if len(history) != first:
        counted.rows = 0  # the client and the table disagree: do not trust either
    return counted


def count_wandb(save_dir: Path, names: list[str]) -> Counted:
    """History rows of every W&B offline run under ``save_dir`` with every name (expbus's reader)."""
    from expbus.sinks.wandb import read_offline_history

    return _complete((values for _step, values in read_offline_history(save_dir)), names)


class _KindValues(msgspec.Struct):
    kind: str
    values: dict[str, float] = {}


_kind_values = msgspec.json.Decoder(_KindValues)


def count_jsonl(path: Path, names: list[str]) -> Counted:
    """``metrics`` lines of a jsonl sink file with every name."""
    decode = _kind_values.decode
    with open(path, "rb") as fh:
        events = [decode(line) for line in fh if line.strip()]
    return _complete((e.values for e in events if e.kind == "metrics"), names)


def count_dllogger(path: Path, names: list[str]) -> Counted:
    """``DLLL`` lines with an integer step (metrics, not ``PARAMETER``) with every name."""
    present = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("DLLL "):
                continue
            record = json.loads(line[5:])
            if isinstance(record.get("step"), int):
                present.append(record.get("data", {}))
    return _complete(present, names)


def count_journal(run_dir: Path, names: list[str]) -> Counted:
    """``Metrics`` records of a run's journal with every name (and the reader's damage counters)."""
    from expbus.bus import JournalReader, Metrics

    reader = JournalReader(run_dir)
    counted = _complete((e.values for e in reader if isinstance(e, Metrics)), names)
    counted.detail = f"skipped_bytes={reader.skipped_bytes} unknown={reader.unknown}"
    if reader.skipped_bytes or reader.unknown:
        counted.rows = 0
    return counted


def count_tensorboard_records(log_dir: Path, names: list[str]) -> Counted:
    """Like :func:`count_tensorboard`, reading the event files' records directly (fast for large files).

    Uses TensorBoard's own record reader and ``Event`` proto; every ``simple_value`` of a
    summary counts at the event's step.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    wanted = set(names)
    per_step: dict[int, set[str]] = {}
    values = 0
    for path in sorted(log_dir.glob("*tfevents*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            if not event.HasField("summary"):
                continue
            tags = {v.tag for v in event.summary.value if v.tag in wanted}
            if tags:
                values += len(tags)
                per_step.setdefault(event.step, set()).update(tags)
    counted = _complete(per_step.values(), names)
    counted.values = values
    return counted
