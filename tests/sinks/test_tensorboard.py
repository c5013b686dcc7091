"""The tensorboard sink, read back with TensorBoard's own ``EventAccumulator`` and hparams plugin protos."""

from __future__ import annotations

import json
import math
import os
import random
import time
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
    SinkPolicy,
    Text,
    Timing,
)
from expbus.sinks import ConfigError, create_sink, load_config
from expbus.sinks.contract import SinkContract

pytest.importorskip("tensorboard")

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from expbus.sinks.tensorboard import TensorBoardSink, _Framer, _ScalarsEncoder

PARAMS: dict[str, Any] = {
    "model": {"hidden": 128, "act": "gelu", "dropout": 0.1},
    "optim": {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.999]},
    "data": [{"path": "a.bin"}, {"path": "b.bin"}],
    "seed": 7,
    "amp": True,
    "note": None,
}
# Lightning's flattening and sanitising of PARAMS, as the hparams plugin receives them.
FLAT = {
    "model/hidden": 128,
    "model/act": "gelu",
    "model/dropout": 0.1,
    "optim/name": "adamw",
    "optim/lr": 3e-4,
    "optim/betas": "[0.9, 0.999]",
    "data/0/path": "a.bin",
    "data/1/path": "b.bin",
    "seed": 7,
    "amp": True,
    "note": "None",
}


# -- reading back with TensorBoard's own reader ------------------------------------------
def accumulator(log_dir: Path) -> ea.EventAccumulator:
    """TensorBoard's reader over a run directory, keeping every point (no reservoir sampling)."""
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = accumulator(log_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def points(log_dir: Path, skip: tuple[str, ...] = ()) -> list[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` per step, in step order (every step holds one Metrics event here)."""
    by_step: dict[int, dict[str, float]] = {}
    for tag, series in scalars(log_dir).items():
        if tag in skip:
            continue
        for step, value in series:
            assert tag not in by_step.setdefault(step, {}), f"duplicate point {tag}@{step}"
            by_step[step][tag] = value
    return sorted(by_step.items())


def hparams_plugin(log_dir: Path) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    content = accumulator(log_dir).PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(data) for tag, data in content.items()}


def session_hparams(data: plugin_data_pb2.HParamsPluginData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind)
    return out


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def f32(value: float) -> float:
    """What TensorBoard keeps of a scalar: ``simple_value`` is a float32 (as ``add_scalar`` writes it)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def run_events(run_dir: Path, sink: TensorBoardSink, events: list[Event], **policy: Any) -> Bus:
    bus = Bus(run_dir, journal=False)
    bus.add_sink("tb", sink, SinkPolicy(batch_delay=0.01, **policy))
    bus.open()
    for event in events:
        bus.publish(event)
    assert bus.flush(30)
    assert bus.close(30)
    return bus


def metrics(steps: range, **extra: float) -> list[Event]:
    return [
        Metrics(time=time.time(), step=s, epoch=s // 10, values={"loss": 1.0 / (s + 1), "lr": s * 0.5, **extra})
        for s in steps
    ]


# -- (1) the public contract ---------------------------------------------------------------
class TestTensorBoardContract(SinkContract):
    def make_sink(self, run_dir: Path) -> TensorBoardSink:
        # No extra ``epoch``/``hp_metric`` points, so what the file holds is exactly the metrics.
        return TensorBoardSink(log_epoch=False, default_hp_metric=False)

    def read_back(self, run_dir: Path) -> list[tuple[int, dict[str, float]]]:
        assert len(event_files(run_dir)) == 1
        return points(run_dir)

    @staticmethod
    def _metrics(steps: range, names: Any = ("loss", "acc")) -> list[Event]:
        # TensorBoard stores scalars as float32 (``simple_value``): the contract's values are
        # chosen exactly representable in float32 (quarters), so read-back can compare exactly.
        return [
            Metrics(time=time.time(), step=s, epoch=0, values={n: s + i / 4 for i, n in enumerate(names)})
            for s in steps
        ]


# -- (2) a whole run through a real bus -----------------------------------------------------
def test_run_through_the_bus(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "epoch=0-step=10.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(os.urandom(1024))
    steps = range(300)
    specials = {5: math.nan, 6: math.inf, 7: -math.inf, 8: 1e300}
    events: list[Event] = [
        RunStarted(time=time.time(), run_id="r1", host="h", pid=1, run_dir=str(run_dir)),
        Hyperparams(time=time.time(), params=PARAMS),
    ]
    for s in steps:
        values = {"train/loss": 1.0 / (s + 1), "train/acc": s / 300, "grad_norm": specials.get(s, 0.25 * s)}
        if s % 50 == 49:
            values["val/loss"] = 0.5 - s / 1000
        events.append(Metrics(time=time.time(), step=s, epoch=s // 100, values=values))
        if s % 100 == 0:
            events.append(Timing(time=time.time(), step=s, durations={"train_step_timing": 0.125 + s}))
            events.append(Text(time=time.time(), step=s, name="samples", text=f"step {s}: héllo ✓"))
        if s == 10:
            events.append(CheckpointSaved(time=time.time(), path=str(ckpt), step=10, epoch=0, size_bytes=1024))
    events.append(RunFinished(time=time.time(), status="completed", step=299))

    bus = run_events(run_dir, TensorBoardSink(), events)
    health = bus.stats()["tb"]
    assert health.delivered == len(events) and health.errors == 0 and health.dropped == 0

    assert len(event_files(run_dir)) == 1
    got = scalars(run_dir)
    expected: dict[str, list[tuple[int, float]]] = {"hp_metric": [(0, -1.0)]}
    for event in events:
        if isinstance(event, Metrics):
            for name, value in {**event.values, "epoch": float(event.epoch or 0)}.items():
                expected.setdefault(name, []).append((event.step, f32(value)))
        elif isinstance(event, Timing):
            for name, value in event.durations.items():
                expected.setdefault(name, []).append((event.step, f32(value)))
    assert set(got) == set(expected)
    for tag, series in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
        assert all(same(a, b) for (_, a), (_, b) in zip(got[tag], series, strict=True)), tag
    # NaN and +-inf stay what they are; beyond float32 becomes inf, as add_scalar does.
    grad = dict(got["grad_norm"])
    assert math.isnan(grad[5]) and grad[6] == math.inf and grad[7] == -math.inf and grad[8] == math.inf

    # Text: the text plugin's summaries, under add_text's tag.
    acc = accumulator(run_dir)
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [0, 100, 200]
    assert [tensor_util.make_ndarray(t.tensor_proto)[0].decode() for t in texts] == [
        f"step {s}: héllo ✓" for s in (0, 100, 200)
    ]
    assert acc.SummaryMetadata("samples/text_summary").plugin_data.plugin_name == "text"

    # Hyperparameters: the hparams plugin's experiment, session start and (completed) end.
    plugin = hparams_plugin(run_dir)
    assert session_hparams(plugin["_hparams_/session_start_info"]) == FLAT
    experiment = plugin["_hparams_/experiment"].experiment
    assert {h.name for h in experiment.hparam_infos} == set(FLAT)
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric"]
    assert plugin["_hparams_/session_end_info"].session_end_info.status == api_pb2.Status.STATUS_SUCCESS
    # ... and the nested dict in hparams.yaml beside the events.
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text()) == PARAMS


def test_prefix_sub_dir_and_no_hp_metric(run_dir: Path) -> None:
    sink = TensorBoardSink(sub_dir="tb", prefix="pre", default_hp_metric=False, hparams_file="hp.yaml")
    events: list[Event] = [
        Hyperparams(time=time.time(), params={"a": 1}),
        *metrics(range(3)),
        Text(time=time.time(), step=1, name="note", text="hi"),
        RunFinished(time=time.time(), status="failed", error="boom", step=2),
    ]
    run_events(run_dir, sink, events)
    log_dir = run_dir / "tb"
    assert sink.log_dir == log_dir and len(event_files(log_dir)) == 1 and not event_files(run_dir)
    assert set(scalars(log_dir)) == {"pre-loss", "pre-lr", "pre-epoch"}
    assert accumulator(log_dir).Tags()["tensors"].count("pre-note/text_summary") == 1
    plugin = hparams_plugin(log_dir)
    assert session_hparams(plugin["_hparams_/session_start_info"]) == {"a": 1}
    assert list(plugin["_hparams_/experiment"].experiment.metric_infos) == []
    # A failed run writes no session end: TensorBoard would keep it even after a resume.
    assert "_hparams_/session_end_info" not in plugin
    assert yaml.safe_load((log_dir / "hp.yaml").read_text()) == {"a": 1}


def test_a_sub_dir_cannot_climb_out_of_the_run_directory(run_dir: Path) -> None:
    from expbus.bus import SinkContext, SinkPathError

    sink = TensorBoardSink(sub_dir="../../elsewhere")
    with pytest.raises(SinkPathError, match=r"sub_dir.*would leave the run directory"):
        sink.open(SinkContext(sink_id="tb", run_dir=run_dir, run_id="r"))
    assert not (run_dir.parent.parent / "elsewhere").exists()


def test_other_ranks_write_their_own_run(tmp_path: Path) -> None:
    sink = TensorBoardSink()
    sink.open(SinkContext(sink_id="tb", run_dir=tmp_path, run_id="r", global_rank=1, world_size=2))
    sink.write(metrics(range(2)))
    sink.close()
    assert sink.log_dir == tmp_path / "rank_1" and len(event_files(tmp_path / "rank_1")) == 1
    assert (tmp_path / ".expbus" / "sinks" / "tb.rank_1.json").is_file()


class _Buffer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


# -- (3) resume: the same event file, continued ---------------------------------------------
def test_resume_continues_the_same_event_file(run_dir: Path) -> None:
    first = metrics(range(0, 10))
    run_events(run_dir, TensorBoardSink(), [Hyperparams(time=time.time(), params=PARAMS), *first])
    (name,) = event_files(run_dir)
    second = metrics(range(10, 20))
    run_events(run_dir, TensorBoardSink(), [Hyperparams(time=time.time(), params=PARAMS), *second])

    assert event_files(run_dir) == [name]
    got = points(run_dir, skip=("hp_metric",))
    assert [s for s, _ in got] == list(range(20))
    assert got == [(e.step, {**{k: f32(v) for k, v in e.values.items()}, "epoch": float(e.epoch)})  # type: ignore[attr-defined]
                   for e in first + second]
    # One placeholder point, and the hyperparameters of the first attempt.
    assert scalars(run_dir)["hp_metric"] == [(0, -1.0)]
    assert session_hparams(hparams_plugin(run_dir)["_hparams_/session_start_info"]) == FLAT


def test_a_crash_between_state_saves_resumes_without_losing_records(run_dir: Path) -> None:
    # Batches of metrics only rewrite the state file every _STATE_EVERY seconds: the offset
    # it holds after a crash is older than the file's end, and the resume scans from there.
    from expbus.sinks._state import state_path

    context = SinkContext(sink_id="tb", run_dir=run_dir, run_id="r")
    sink = TensorBoardSink()
    sink.open(context)
    for step in range(0, 30, 10):
        sink.write(metrics(range(step, step + 10)))
    saved = json.loads(state_path(context).read_text())
    assert sink.event_file is not None and saved["offset"] < sink.event_file.stat().st_size
    # The process dies here: no close, no state saved. The OS closes its file (nothing is
    # buffered: every write reached the OS); the next attempt appends to the same file.
    assert sink._file is not None
    sink._file.close()
    run_events(run_dir, TensorBoardSink(), metrics(range(30, 40)))
    assert event_files(run_dir) == [sink.event_file]
    assert [s for s, _ in points(run_dir)] == list(range(40))
    assert json.loads(state_path(context).read_text())["offset"] == sink.event_file.stat().st_size


def test_resume_from_an_earlier_checkpoint_drops_the_repeated_steps(run_dir: Path) -> None:
    # The first attempt logged up to step 14, then died; its last checkpoint was at step 9.
    run_events(run_dir, TensorBoardSink(), metrics(range(0, 15), attempt=1.0))
    run_events(run_dir, TensorBoardSink(), metrics(range(10, 20), attempt=2.0))
    assert len(event_files(run_dir)) == 1
    got = points(run_dir)
    assert [s for s, _ in got] == list(range(20))
    assert [values["attempt"] for _, values in got] == [1.0] * 10 + [2.0] * 10


def test_explicit_purge_step(run_dir: Path) -> None:
    run_events(run_dir, TensorBoardSink(), metrics(range(0, 10)))
    run_events(run_dir, TensorBoardSink(purge_step=4), metrics(range(4, 6), attempt=2.0))
    got = points(run_dir)
    assert [s for s, _ in got] == list(range(6))
    assert [v.get("attempt") for _, v in got] == [None] * 4 + [2.0] * 2


def _framed(record: bytes) -> bytes:
    buffer = _Buffer()
    RecordWriter(buffer).write(record)
    return buffer.data


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02", id="half-a-header"),
        pytest.param(_framed(b"x" * 64)[:40], id="half-a-record"),
        pytest.param(bytes(64), id="zero-filled"),
        pytest.param(_framed(b"x" * 64)[:-5] + b"y" + _framed(b"x" * 64)[-4:], id="bad-data-crc"),
    ],
)
@pytest.mark.parametrize("forget_offset", [False, True], ids=["from-offset", "whole-file-scan"])
def test_resume_cuts_a_torn_record_off(run_dir: Path, tail: bytes, forget_offset: bool) -> None:
    run_events(run_dir, TensorBoardSink(), metrics(range(0, 10)))
    (path,) = event_files(run_dir)
    good = path.stat().st_size
    with open(path, "ab") as file:  # a crash in the middle of a record
        file.write(tail)
    if forget_offset:  # a crash before the first flush recorded how far the file was complete
        state = run_dir / ".expbus" / "sinks" / "tb.json"
        state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "offset"}))
    run_events(run_dir, TensorBoardSink(), metrics(range(10, 20)))
    assert event_files(run_dir) == [path]
    assert [s for s, _ in points(run_dir)] == list(range(20))
    assert path.stat().st_size > good


def test_a_lost_state_or_moved_log_dir_starts_a_new_file(run_dir: Path) -> None:
    run_events(run_dir, TensorBoardSink(), metrics(range(0, 3)))
    run_events(run_dir, TensorBoardSink(sub_dir="elsewhere"), metrics(range(3, 6)))
    assert len(event_files(run_dir)) == 1 and len(event_files(run_dir / "elsewhere")) == 1


# -- the framing: byte for byte what tensorboard's RecordWriter writes -----------------------
def test_bulk_framing_matches_tensorboards_record_writer() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import CRC_TABLE

    framer = _Framer(CRC_TABLE, masked_crc32c)
    rng = random.Random(0)
    for sizes in ([1], [3, 100, 7], [0, 700, 1], [rng.randint(1, 3000) for _ in range(300)], [20_000, 5, 40]):
        records = [rng.randbytes(n) for n in sizes]
        reference = _Buffer()
        writer = RecordWriter(reference)
        for record in records:
            writer.write(record)
        assert framer.frame(records) == reference.data


def test_the_crc_tables_grow_by_doubling_to_any_width() -> None:
    """The table grows one vectorised doubling at a time; every width, odd tails included, stays exact."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import CRC_TABLE

    rng = random.Random(1)
    framer = _Framer(CRC_TABLE, masked_crc32c)
    for width in [*range(1, 40), 63, 64, 65, 1000, 1537, 4097, 16384]:
        records = [rng.randbytes(n) for n in (width, max(1, width // 3), 1)]
        lengths = np.array([len(r) for r in records], dtype=np.int64)
        assert [int(c) for c in framer.masked_crcs(b"".join(records), lengths)] == [masked_crc32c(r) for r in records]
    # A fresh framer asked for a wide record at once builds the same tables.
    wide = _Framer(CRC_TABLE, masked_crc32c)
    wide._grow(16384)
    assert np.array_equal(wide._m, framer._m) and np.array_equal(wide._z, framer._z)


def _protobuf_scalars_event(values: list[tuple[str, float]], step: int, wall_time: float) -> bytes:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values])
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary).SerializeToString()


@pytest.mark.parametrize(
    ("values", "step", "wall_time"),
    [
        ([("loss", 0.5)], 0, 1.7e9),
        ([("a", math.nan), ("b", math.inf), ("c", -math.inf), ("d", -0.0), ("e", 0.0)], 1, 1e-300),
        ([("beyond float32", 1e300), ("below", -1e300), ("tiny", 1e-50), ("int", 3), ("bool", True)], 2**40, 1.0),
        ([("t" * 127, 1.0), ("u" * 128, 2.0), ("v" * 20_000, 3.0)], 127, 1.7e9),  # 1-, 2- and 3-byte lengths
        ([("ünïcødé/ß", 1.5), ("train/acc", -2.25)], 128, 123.456),
        ([(f"train/m{i:03d}", i / 7) for i in range(100)], 9_223_372_036_854_775_807, 1.7e9),
        ([("negative step", 1.0)], -1, 1.7e9),
        ([("min step", 1.0)], -9_223_372_036_854_775_808, 1.7e9),
    ],
)
def test_scalar_events_are_the_bytes_protobuf_writes(values: list[tuple[str, float]], step: int,
                                                     wall_time: float) -> None:
    assert _ScalarsEncoder().event(values, step, wall_time) == _protobuf_scalars_event(values, step, wall_time)


def test_scalar_events_match_protobuf_on_random_input() -> None:
    encoder = _ScalarsEncoder()
    rng = random.Random(1)
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4e38, 3.5e38, -3.5e38, 1e-45, 5e-324]
    for _ in range(500):
        tags = ["".join(rng.choice("abcé/_-.0123456789") for _ in range(rng.randint(1, 40)))
                for _ in range(rng.randint(1, 20))]
        values = [(tag, rng.choice(specials) if rng.random() < 0.2 else rng.uniform(-1e6, 1e6)) for tag in tags]
        step = rng.choice([0, 1, rng.randint(-(2**63), 2**63 - 1), rng.randint(0, 10**6)])
        wall_time = rng.choice([rng.uniform(1, 2e9), 1e-310, -5.0])
        assert encoder.event(values, step, wall_time) == _protobuf_scalars_event(values, step, wall_time)


# -- (4) no client ---------------------------------------------------------------------------
# -- (5) bad options -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"flush_secs": "soon"}, "sinks.x.flush_secs"),
        ({"max_queue": 1.5}, "sinks.x.max_queue"),
        ({"prefix": 3}, "sinks.x.prefix"),
        ({"log_dri": "tb"}, "sinks.x"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"sinks": {"x": {"type": "tensorboard", **options}}})
    assert where in str(info.value)


def test_typo_suggests_the_option() -> None:
    with pytest.raises(ConfigError, match="log_dir"):
        load_config({"sinks": {"x": {"type": "tensorboard", "log_dri": "tb"}}})


@pytest.mark.parametrize("options", [{"max_queue": 0}, {"flush_secs": -1}, {"purge_step": -3}])
def test_bad_values_are_config_errors_when_built(options: dict[str, Any]) -> None:
    config = load_config({"sinks": {"x": {"type": "tensorboard", **options}}})
    with pytest.raises(ConfigError, match=r"sinks\.x"):
        create_sink("x", config.sinks["x"])


def test_yaml_options_build_the_sink() -> None:
    config = load_config(
        {"sinks": {"tb": {"type": "tensorboard", "sub_dir": "tb", "prefix": "p", "flush_secs": 30, "max_queue": 100}}}
    )
    sink, _ = create_sink("tb", config.sinks["tb"])
    assert isinstance(sink, TensorBoardSink)
    assert (sink.sub_dir, sink.prefix, sink.flush_secs, sink.max_queue) == ("tb", "p", 30.0, 100)


# -- Lightning's own TensorBoardLogger, same metrics: same tags, steps and values --------------
@pytest.mark.timeout(120)
def test_same_as_lightnings_tensorboard_logger(tmp_path: Path) -> None:
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    logger = loggers.TensorBoardLogger(save_dir=str(tmp_path), name="", version="lightning")
    logger.log_hyperparams(PARAMS)
    events: list[Event] = [Hyperparams(time=time.time(), params=PARAMS)]
    for s in range(50):
        values = {"train/loss": 1.0 / (s + 1), "train/acc": math.nan if s == 3 else s / 50, "big": 1e300 * (s == 9)}
        # Lightning's logger connector adds ``epoch`` to every log_metrics call.
        logger.log_metrics({**values, "epoch": s // 10}, step=s)
        events.append(Metrics(time=time.time(), step=s, epoch=s // 10, values=values))
    logger.finalize("success")
    run_events(tmp_path / "expbus", TensorBoardSink(), events)

    theirs, ours = scalars(tmp_path / "lightning"), scalars(tmp_path / "expbus")
    assert set(theirs) == set(ours) == {"train/loss", "train/acc", "big", "epoch", "hp_metric"}
    for tag in theirs:
        assert [s for s, _ in theirs[tag]] == [s for s, _ in ours[tag]], tag
        assert all(same(a, b) for (_, a), (_, b) in zip(theirs[tag], ours[tag], strict=True)), tag
    their_hp, our_hp = hparams_plugin(tmp_path / "lightning"), hparams_plugin(tmp_path / "expbus")
    assert our_hp["_hparams_/session_start_info"] == their_hp["_hparams_/session_start_info"]
    assert our_hp["_hparams_/experiment"] == their_hp["_hparams_/experiment"]
    assert (tmp_path / "expbus" / "hparams.yaml").read_text() == (tmp_path / "lightning" / "hparams.yaml").read_text()
