"""Tests of the csv sink against Lightning's own ``CSVLogger`` fed the same metrics and hyperparameters."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

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
from expbus.sinks.csv import CsvSink

# The reference: Lightning's own CSVLogger (a dev dependency).
CSVLogger = pytest.importorskip("lightning.pytorch.loggers").CSVLogger

NAN = float("nan")
INF = float("inf")

# Delivered in three batches; new metric names appear in the second and third, so the
# header widens (and the file is rewritten) twice.
BATCHES: list[list[Event]] = [
    [
        RunStarted(time=1.0, run_id="r", host="h", pid=7),
        Metrics(time=2.0, step=0, values={"train_loss": 2.5, "lr": 0.001}, epoch=0),
        Metrics(time=3.0, step=1, values={"train_loss": 2.25, "lr": 0.001}, epoch=0),
        Timing(time=3.1, step=1, durations={"train_step_timing": 0.1}),
        Text(time=3.2, step=1, name="note", text="hi"),
    ],
    [
        Metrics(time=4.0, step=2, values={"train_loss": NAN, "grad_norm": INF}, epoch=0),
        # The same step twice (training, then validation): two rows, as CSVLogger writes.
        Metrics(time=5.0, step=2, values={"val_loss": 1.75, "val_acc": 0.5}, epoch=0),
        CheckpointSaved(time=5.1, step=2, path="/ckpt/a.ckpt"),
    ],
    [
        Metrics(time=6.0, step=3, values={"train_loss": 1.0 / 3.0, "neg": -INF}),  # no epoch
        Metrics(time=7.0, step=4, values={"a_first": 1e-12, "epoch": 9.0}, epoch=1),  # logged epoch wins
        RunFinished(time=8.0, status="completed", step=4),
    ],
]
HPARAMS = [
    Hyperparams(time=1.5, params={"lr": 0.001, "model": {"hidden": 128, "layers": [64, 32]}, "name": "run"}),
    Hyperparams(time=1.6, params={"batch_size": 32, "name": "run-2", "seed": None, "tags": []}),
]


def context(run_dir: Path) -> SinkContext:
    return SinkContext(sink_id="csv", run_dir=run_dir, run_id="r")


def lightning_csv(root: Path, batches: Sequence[Sequence[Event]], hparams: Sequence[Hyperparams] = ()) -> Path:
    """The directory Lightning's CSVLogger writes for the same events, saved at the same batch ends."""
    logger = CSVLogger(save_dir=root, name="", version="lightning", flush_logs_every_n_steps=10**9)
    for event in hparams:
        logger.log_hyperparams(dict(event.params))
    for batch in batches:
        for event in batch:
            if isinstance(event, Metrics):
                # What Lightning's logger connector passes: the values plus the epoch.
                metrics: dict[str, Any] = dict(event.values)
                if event.epoch is not None:
                    metrics.setdefault("epoch", event.epoch)
                logger.log_metrics(metrics, step=event.step)
        logger.save()
    logger.finalize("success")
    return Path(logger.log_dir)


def drive(sink: CsvSink, run_dir: Path, batches: Sequence[Sequence[Event]]) -> None:
    sink.open(context(run_dir))
    for batch in batches:
        sink.write(batch)
    sink.flush()
    sink.close()


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_metrics_csv_matches_csvlogger(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    drive(CsvSink(), run_dir, BATCHES)
    ours = run_dir / "metrics.csv"
    theirs = lightning_csv(tmp_path / "lightning", BATCHES) / "metrics.csv"
    assert read_rows(ours) == read_rows(theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def test_metrics_csv_content(tmp_path: Path) -> None:
    drive(CsvSink(), tmp_path, BATCHES)
    header, rows = read_rows(tmp_path / "metrics.csv")
    # Every key seen, sorted (CSVLogger's order), including step and epoch.
    assert header == ["a_first", "epoch", "grad_norm", "lr", "neg", "step", "train_loss", "val_acc", "val_loss"]
    assert [row["step"] for row in rows] == ["0", "1", "2", "2", "3", "4"]
    assert rows[0] == {"a_first": "", "epoch": "0", "grad_norm": "", "lr": "0.001", "neg": "", "step": "0",
                       "train_loss": "2.5", "val_acc": "", "val_loss": ""}
    assert math.isnan(float(rows[2]["train_loss"])) and float(rows[2]["grad_norm"]) == math.inf
    assert rows[3]["val_loss"] == "1.75" and rows[3]["train_loss"] == ""
    assert rows[4]["epoch"] == "" and float(rows[4]["neg"]) == -math.inf
    assert float(rows[4]["train_loss"]) == 1.0 / 3.0  # repr round-trips the float exactly
    assert rows[5]["epoch"] == "9.0" and rows[5]["a_first"] == "1e-12"


def test_one_batch_at_a_time_and_one_event_per_batch_agree(tmp_path: Path) -> None:
    events = [event for batch in BATCHES for event in batch]
    drive(CsvSink(), tmp_path / "one", [events])
    drive(CsvSink(), tmp_path / "many", [[event] for event in events])
    assert (tmp_path / "one" / "metrics.csv").read_bytes() == (tmp_path / "many" / "metrics.csv").read_bytes()
    theirs = lightning_csv(tmp_path / "lightning", [[event] for event in events]) / "metrics.csv"
    assert (tmp_path / "many" / "metrics.csv").read_bytes() == theirs.read_bytes()


def test_hparams_yaml_matches_csvlogger(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    drive(CsvSink(), run_dir, [HPARAMS[:1], [HPARAMS[1], *BATCHES[0]]])
    theirs = lightning_csv(tmp_path / "lightning", [], HPARAMS) / "hparams.yaml"
    ours = run_dir / "hparams.yaml"
    assert ours.read_text() == theirs.read_text()
    # Accumulated across events, later values winning, nesting kept (no flattening).
    assert yaml.safe_load(ours.read_text()) == {
        "lr": 0.001,
        "model": {"hidden": 128, "layers": [64, 32]},
        "name": "run-2",
        "batch_size": 32,
        "seed": None,
        "tags": [],
    }


def test_paths_and_no_hparams_file(tmp_path: Path) -> None:
    sink = CsvSink(path="logs/train.csv", hparams_file="params/hp.yaml")
    drive(sink, tmp_path, [HPARAMS[:1], BATCHES[0]])
    assert sink.path == tmp_path / "logs" / "train.csv"
    assert (tmp_path / "logs" / "params" / "hp.yaml").is_file()  # beside the CSV file
    assert read_rows(tmp_path / "logs" / "train.csv")[1][0]["train_loss"] == "2.5"

    drive(CsvSink(hparams_file=None), tmp_path / "bare", [HPARAMS, BATCHES[0]])
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["metrics.csv"]


def test_no_metrics_no_file(tmp_path: Path) -> None:
    drive(CsvSink(hparams_file=None), tmp_path, [[RunStarted(time=1.0, run_id="r", host="h", pid=1)]])
    assert list(tmp_path.iterdir()) == []


def test_resume_appends_and_widens(tmp_path: Path) -> None:
    drive(CsvSink(), tmp_path, BATCHES[:1])
    # A resumed run: the same columns continue, then a new one widens the old rows too.
    drive(CsvSink(), tmp_path, [[Metrics(time=9.0, step=2, values={"train_loss": 2.0}, epoch=0)],
                                [Metrics(time=9.5, step=3, values={"train_loss": 1.5, "val_loss": 1.25}, epoch=0)]])
    header, rows = read_rows(tmp_path / "metrics.csv")
    assert header == ["epoch", "lr", "step", "train_loss", "val_loss"]
    assert [(r["step"], r["train_loss"], r["lr"], r["val_loss"]) for r in rows] == [
        ("0", "2.5", "0.001", ""), ("1", "2.25", "0.001", ""), ("2", "2.0", "", ""), ("3", "1.5", "", "1.25")
    ]
    assert not list(tmp_path.glob("*.tmp"))  # the rewrite's temporary file is gone

    drive(CsvSink(append=False), tmp_path, [[Metrics(time=10.0, step=0, values={"x": 1.0})]])
    assert read_rows(tmp_path / "metrics.csv") == (["step", "x"], [{"step": "0", "x": "1.0"}])


def test_registry_builds_it(tmp_path: Path) -> None:
    sink, _policy = create_sink("csv", {"type": "csv", "path": "m.csv", "hparams_file": None, "append": False})
    assert isinstance(sink, CsvSink)
    assert (sink.path_option, sink.hparams_file, sink.append) == ("m.csv", None, False)


def test_through_the_bus(run_dir: Path, tmp_path: Path) -> None:
    sink = CsvSink()
    with Bus(run_dir, run_id="r", sinks={"csv": sink}) as bus:
        for event in HPARAMS:
            bus.publish(event)
        for event in BATCHES[0]:
            bus.publish(event)
        assert bus.flush()
        assert [r["step"] for r in read_rows(run_dir / "metrics.csv")[1]] == ["0", "1"]
        for batch in BATCHES[1:]:
            for event in batch:
                bus.publish(event)
    assert bus.stats()["csv"].state == "closed"
    # However the bus batched them, the rows, columns and hyperparameters are Lightning's.
    theirs = lightning_csv(tmp_path / "lightning", [[e for b in BATCHES for e in b]], HPARAMS)
    assert read_rows(run_dir / "metrics.csv") == read_rows(theirs / "metrics.csv")
    assert (run_dir / "hparams.yaml").read_text() == (theirs / "hparams.yaml").read_text()
