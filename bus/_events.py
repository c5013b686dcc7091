"""The typed events that travel on the bus: one tagged union of frozen msgspec Structs.

Schema evolution rules (the tag, not the class path, is the wire contract):

* ``SCHEMA_VERSION`` is written in every journal header.
* A new field is added at the end of its Struct **with a default**; readers of an older
  journal then get the default, and older readers ignore the unknown field.
* A field is never renamed, reordered, retyped or removed; a tag is never reused.
* A new event type gets a new tag; an older reader skips records whose tag it does not
  know (the journal reader reports them as ``unknown``).
* A change that cannot follow these rules bumps ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import time as _time
from typing import Any, ClassVar, Literal

import msgspec

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "RunStarted",
    "Hyperparams",
    "Metrics",
    "Text",
    "CheckpointSaved",
    "CheckpointRemoved",
    "Timing",
    "RunFinished",
    "AnyEvent",
    "EVENT_TYPES",
    "now",
]

SCHEMA_VERSION = 1

RunStatus = Literal["completed", "failed", "interrupted"]


def now() -> float:
    """Wall clock in Unix seconds, the ``time`` of every event."""
    return _time.time()


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every event. ``time`` is the wall clock (Unix seconds) when it happened.

    ``droppable`` says whether a full sink queue under ``when_full: drop_newest`` may drop
    it. Only high-volume telemetry (``Metrics``, ``Timing``) may be dropped; lifecycle,
    hyperparameter and checkpoint events never are.
    """

    droppable: ClassVar[bool] = False

    time: float


class RunStarted(Event, frozen=True, kw_only=True, tag="run_started"):
    """A run (one process of it) started. ``time`` is the wall time of the start."""

    run_id: str
    host: str
    pid: int
    global_rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    run_dir: str | None = None
    config: dict[str, Any] = {}


class Hyperparams(Event, frozen=True, kw_only=True, tag="hyperparams"):
    """Hyperparameters (nested mappings allowed) of the module and data module."""

    params: dict[str, Any]


class Metrics(Event, frozen=True, kw_only=True, tag="metrics"):
    """Metric values logged at one step.

    Until the bus resolves it, a value may be any object with an ``item()`` method (a
    detached tensor): the training thread never converts it. Sinks only ever see floats.
    """

    droppable: ClassVar[bool] = True

    step: int
    values: dict[str, float]
    epoch: int | None = None


class Text(Event, frozen=True, kw_only=True, tag="text"):
    """A piece of text (a note, a sample) attached to a step."""

    step: int
    name: str
    text: str


class CheckpointSaved(Event, frozen=True, kw_only=True, tag="checkpoint_saved"):
    """A checkpoint file (or directory) was written."""

    path: str
    step: int
    epoch: int | None = None
    monitor: str | None = None
    monitor_value: float | None = None
    is_last: bool = False
    is_best: bool = False
    size_bytes: int | None = None


class CheckpointRemoved(Event, frozen=True, kw_only=True, tag="checkpoint_removed"):
    """A checkpoint was removed (top-k pruning, replaced ``-last``)."""

    path: str
    step: int
    epoch: int | None = None
    monitor: str | None = None
    monitor_value: float | None = None
    is_last: bool = False
    is_best: bool = False


class Timing(Event, frozen=True, kw_only=True, tag="timing"):
    """Durations in seconds measured at one step (``train_step_timing`` and friends)."""

    droppable: ClassVar[bool] = True

    step: int
    durations: dict[str, float]


class RunFinished(Event, frozen=True, kw_only=True, tag="run_finished"):
    """The run ended: ``completed``, ``failed`` (with the error text) or ``interrupted``."""

    status: RunStatus
    error: str | None = None
    step: int | None = None


AnyEvent = (
    RunStarted | Hyperparams | Metrics | Text | CheckpointSaved | CheckpointRemoved | Timing | RunFinished
)

EVENT_TYPES: tuple[type[Event], ...] = (
    RunStarted,
    Hyperparams,
    Metrics,
    Text,
    CheckpointSaved,
    CheckpointRemoved,
    Timing,
    RunFinished,
)
