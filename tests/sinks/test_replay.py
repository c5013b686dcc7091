"""``expbus replay``: a journal recorded with the jsonl sink only, pushed into TensorBoard and MLflow."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from expbus._cli import main
from expbus.bus import Bus, Event, Hyperparams, Metrics, SinkPolicy, from_json, read_journal
from expbus.sinks import replay_journal
from expbus.sinks.testing import MemorySink

Series = dict[str, list[tuple[int, float]]]


def series(events: Sequence[Event]) -> Series:
    out: Series = {}
    for event in events:
        if isinstance(event, Metrics):
            for name, value in event.values.items():
                out.setdefault(name, []).append((event.step, float(value)))
    return out


def tensorboard_series(log_dir: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(s.step, s.value) for s in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"] if tag != "hp_metric"}


def mlflow_series(db: Path, names: set[str]) -> tuple[Series, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("replayed").experiment_id])
    return {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            for name in names}, run


def same(want: Series, got: Series, rel: float = 1e-6) -> None:
    assert set(got) >= set(want), sorted(set(want) - set(got))
    for name, points in want.items():
        have = got[name]
        assert [s for s, _ in have] == [s for s, _ in points], f"{name}: steps differ (or duplicated)"
        assert [v for _, v in have] == pytest.approx([v for _, v in points], rel=rel), name


@pytest.fixture
def trained_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real Lightning run whose only sink is jsonl (plus the journal)."""
    import lightning.pytorch as pl

    from expbus.trainer_bridge import BridgeCallback
    from expbus.trainer_bridge.demo import DemoRegressor, SyntheticRegression

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "offline"
    bridge = BridgeCallback({"run_dir": str(run_dir), "sinks": {"events": {"type": "jsonl"}}})
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, log_every_n_steps=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         val_check_interval=20, num_sanity_val_steps=0, callbacks=[bridge])
    trainer.fit(DemoRegressor(lr=0.02), datamodule=SyntheticRegression(batch_size=16, train_size=320, val_size=32))
    return run_dir


@pytest.fixture
def replay_config(tmp_path: Path) -> Path:
    path = tmp_path / "replay.yaml"
    path.write_text(
        "sinks:\n"
        "  tb:\n"
        "    type: tensorboard\n"
        "    log_dir: tb_replayed\n"
        "  mlflow:\n"
        f"    type: mlflow\n    tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n"
        "    experiment_name: replayed\n"
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_replay_into_tensorboard_and_mlflow_is_complete_and_idempotent(
    trained_run: Path, replay_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = read_journal(trained_run)
    want = series(journal)
    assert {"train_loss_step", "val_loss"} <= set(want) and len(want["train_loss_step"]) == 40

    for sink_id in ("tb", "mlflow"):
        assert main(["replay", str(trained_run), "--config", str(replay_config), "--to", sink_id]) == 0
        out, err = capsys.readouterr()
        assert f"{sink_id}: replayed {len(journal)} of {len(journal)} journal records (0 already delivered)" in out
        assert f"replay {sink_id}: {len(journal)}/{len(journal)} events" in err  # the progress line

    tb_dir = trained_run / "tb_replayed"
    same(want, tensorboard_series(tb_dir))
    ml, run = mlflow_series(tmp_path / "mlflow.db", set(want))
    same(want, ml, rel=1e-9)
    assert run.data.params["lr"] == "0.02" and run.info.status == "FINISHED"
    assert run.data.tags["expbus.run_id"] == (trained_run / ".expbus" / "run_id").read_text().strip()

    # Again: nothing new anywhere.
    sizes = {p: p.stat().st_size for p in tb_dir.rglob("events.out.tfevents*")}
    for sink_id in ("tb", "mlflow"):
        assert main(["replay", str(trained_run), "--config", str(replay_config), "--to", sink_id]) == 0
        out, _ = capsys.readouterr()
        assert f"{sink_id}: replayed 0 of {len(journal)} journal records ({len(journal)} already delivered)" in out
    assert {p: p.stat().st_size for p in tb_dir.rglob("events.out.tfevents*")} == sizes
    same(want, tensorboard_series(tb_dir))
    ml_again, run_again = mlflow_series(tmp_path / "mlflow.db", set(want))
    assert ml_again == ml and run_again.info.run_id == run.info.run_id


class HangingSink:
    """Never returns from a write (a hung backend); released at teardown."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def write(self, batch: Sequence[Event]) -> None:
        self.release.wait(60)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.mark.timeout(60)
def test_what_a_hung_sink_missed_is_replayed_later(tmp_path: Path, release: threading.Event,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bus = Bus(tmp_path)
    bus.add_sink("backend", HangingSink(release), SinkPolicy(write_timeout=0.5, batch_delay=0.01))
    with bus:
        bus.publish(Hyperparams(time=1.0, params={"lr": 0.1}))
        for step in range(500):
            bus.publish(Metrics(time=2.0 + step, step=step, values={"loss": 1.0 / (step + 1)}))
    health = bus.stats()["backend"]
    assert health.delivered == 0 and health.failed + health.dropped == 501

    assert main(["replay", str(tmp_path), "--to", "jsonl", "--id", "backend", "--set", "path=backend.jsonl",
                 "--quiet"]) == 0
    assert "backend: replayed 501 of 501 journal records" in capsys.readouterr().out
    lines = (tmp_path / "backend.jsonl").read_bytes().splitlines()
    assert [from_json(line) for line in lines] == read_journal(tmp_path)


@pytest.mark.timeout(60)
def test_replay_of_a_damaged_journal_delivers_every_intact_record(tmp_path: Path) -> None:
    with Bus(tmp_path) as bus:
        for step in range(300):
            bus.publish(Metrics(time=float(step), step=step, values={"loss": float(step)}))
    journal = tmp_path / "journal.msgpack"
    data = bytearray(journal.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF  # a flipped bit inside one record
    journal.write_bytes(bytes(data[:-7]))  # and a torn tail
    intact = read_journal(tmp_path)
    assert 295 <= len(intact) < 300

    memory = MemorySink()
    (result,) = replay_journal(tmp_path, {"again": (memory, SinkPolicy())})
    assert memory.events == intact
    assert result.replayed == len(intact) and result.complete


def test_replay_errors_name_the_problem(tmp_path: Path, replay_config: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "nowhere"), "--to", "jsonl"]) == 2
    assert "no journal" in capsys.readouterr().err
    with Bus(tmp_path):
        pass
    assert main(["replay", str(tmp_path), "--config", str(replay_config), "--to", "mlfow"]) == 2
    err = capsys.readouterr().err
    assert "'mlfow'" in err and "did you mean 'mlflow'" in err
    assert main(["replay", str(tmp_path), "--to", "tensorbord"]) == 2
    assert "tensorbord" in capsys.readouterr().err
    assert os.listdir(tmp_path)  # nothing was removed
