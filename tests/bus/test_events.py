"""Events: tagged union, drop policy per type, exact round trips through msgpack and JSON."""

from __future__ import annotations

import json
import math

import msgspec
import pytest

from expbus.bus import (
    EVENT_TYPES,
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    Text,
    Timing,
    from_json,
    from_msgpack,
    resolve_event,
    resolve_value,
    to_json,
    to_msgpack,
)

SAMPLES: list[Event] = [
    RunStarted(time=1.5, run_id="r1", host="h", pid=42, global_rank=1, local_rank=1, world_size=2,
               run_dir="/x", config={"a": {"b": [1, 2.5, "c"]}, "n": None}),
    Hyperparams(time=2.0, params={"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "name": "m", "flag": True}),
    Metrics(time=3.25, step=7, epoch=0, values={"loss": 0.125, "acc": 1.0}),
    Metrics(time=3.5, step=8, values={"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "zero": 0.0}),
    Text(time=4.0, step=1, name="sample", text="héllo\nworld"),
    CheckpointSaved(time=5.0, path="/c/a.ckpt", step=10, epoch=1, monitor="val_loss", monitor_value=0.5,
                    is_last=False, is_best=True, size_bytes=1234),
    CheckpointRemoved(time=6.0, path="/c/a.ckpt", step=20, epoch=2, monitor="val_loss", monitor_value=0.5),
    Timing(time=7.0, step=3, durations={"train_step_timing": 0.01}),
    RunFinished(time=8.0, status="failed", error="Traceback ...\nValueError: x", step=20),
]


def _same(a: Event, b: Event) -> bool:
    # NaN != NaN, so compare the encoded forms (which encode NaN identically).
    return to_msgpack(a) == to_msgpack(b) and type(a) is type(b)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_msgpack_round_trip_is_exact(event: Event) -> None:
    back = from_msgpack(to_msgpack(event))
    assert _same(back, event)
    if not isinstance(event, Metrics) or all(math.isfinite(v) for v in event.values.values()):
        assert back == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_json_round_trip_is_exact(event: Event) -> None:
    text = to_json(event)
    back = from_json(text)
    assert _same(back, event)
    # Every line is valid for Python's json (NaN/Infinity as Python writes them).
    decoded = json.loads(text)
    assert decoded["kind"] == type(event).__struct_config__.tag


def test_non_finite_values_survive_json() -> None:
    event = SAMPLES[3]
    assert isinstance(event, Metrics)
    back = from_json(to_json(event))
    assert isinstance(back, Metrics)
    assert math.isnan(back.values["nan"])
    assert back.values["inf"] == math.inf and back.values["ninf"] == -math.inf


def test_every_event_has_time_and_a_unique_tag() -> None:
    tags = [t.__struct_config__.tag for t in EVENT_TYPES]
    assert len(set(tags)) == len(tags)
    for event_type in EVENT_TYPES:
        assert "time" in event_type.__struct_fields__
        assert event_type.__struct_config__.frozen


def test_only_metrics_and_timing_are_droppable() -> None:
    droppable = {t.__name__ for t in EVENT_TYPES if t.droppable}
    assert droppable == {"Metrics", "Timing"}


def test_step_events_carry_step() -> None:
    for event_type in (Metrics, Text, CheckpointSaved, CheckpointRemoved, Timing):
        assert "step" in event_type.__struct_fields__


def test_events_are_frozen() -> None:
    event = Metrics(time=1.0, step=1, values={"a": 1.0})
    with pytest.raises(AttributeError):
        event.step = 2  # type: ignore[misc]


class FakeTensor:
    """A stand-in for a detached tensor: resolved through item()."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls = 0

    def item(self) -> float:
        self.calls += 1
        return self.value


def test_resolve_event_turns_tensor_like_values_into_floats() -> None:
    t = FakeTensor(0.25)
    event = Metrics(time=1.0, step=1, values={"loss": t, "lr": 0.1})  # type: ignore[dict-item]
    resolved = resolve_event(event)
    assert isinstance(resolved, Metrics)
    assert resolved.values == {"loss": 0.25, "lr": 0.1}
    assert t.calls == 1
    # An event with plain numbers is returned as is (no copy on the common path).
    plain = Metrics(time=1.0, step=1, values={"lr": 0.1})
    assert resolve_event(plain) is plain


def test_all_tensor_values_are_read_in_one_pass_with_the_same_result() -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    cases: list[dict[str, object]] = [
        {f"m{i}": torch.tensor(i / 3) for i in range(100)},  # the common case: one C-level pass
        {"a": torch.tensor(float("nan")), "b": torch.tensor(float("-inf")), "c": torch.tensor(-0.0)},
        {"i": torch.tensor(7), "j": torch.tensor(-(2**40))},  # integer tensors stay ints
        {"flag": torch.tensor(True), "off": torch.tensor(False)},  # bools become floats, value by value
        {"half": torch.tensor(0.1, dtype=torch.float16), "x": torch.tensor(2.5, dtype=torch.float64)},
        {"np": np.float32(0.5), "np2": np.float32(1.5)},
        {"mixed": torch.tensor(1.0), "plain": 2.0, "np": np.float64(3.0)},
    ]
    for values in cases:
        resolved = resolve_event(Metrics(time=1.0, step=1, values=values))  # type: ignore[arg-type]
        assert isinstance(resolved, Metrics)
        expected = {k: resolve_value(v) for k, v in values.items()}
        assert [(k, type(v)) for k, v in resolved.values.items()] == [(k, type(v)) for k, v in expected.items()]
        assert all(a == b or (math.isnan(a) and math.isnan(b))
                   for a, b in zip(resolved.values.values(), expected.values(), strict=True))
        assert all(type(v) in (float, int) for v in resolved.values.values())
    timing = resolve_event(Timing(time=1.0, step=1, durations={"step": torch.tensor(0.25)}))
    assert isinstance(timing, Timing) and timing.durations == {"step": 0.25}
    # A tensor of several values cannot be one metric: reported, as item() reports it.
    with pytest.raises((ValueError, RuntimeError)):
        resolve_event(Metrics(time=1.0, step=1, values={"v": torch.tensor([1.0, 2.0])}))  # type: ignore[dict-item]


def test_unknown_tag_is_a_validation_error() -> None:
    payload = msgspec.msgpack.encode({"kind": "from_the_future", "time": 1.0})
    with pytest.raises(msgspec.ValidationError):
        from_msgpack(payload)


def test_non_finite_checkpoint_score_survives_json() -> None:
    event = CheckpointSaved(time=1.0, path="x.ckpt", step=1, monitor="val_loss", monitor_value=math.inf)
    back = from_json(to_json(event))
    assert isinstance(back, CheckpointSaved) and back.monitor_value == math.inf
