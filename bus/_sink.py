"""What the bus needs from a sink: the protocol, the context it opens with, and its policy."""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import msgspec

from ._events import Event

__all__ = [
    "Sink",
    "SinkContext",
    "SinkPolicy",
    "TransientSinkError",
    "SinkOpenError",
    "SinkPathError",
    "POLICY_KEYS",
]

WhenFull = Literal["drop_newest", "block"]


@runtime_checkable
class Sink(Protocol):
    """**Protocol:** something that receives batches of events.

    Only ``write`` is mandatory. Each method may be a plain function or a coroutine
    function: a plain (sync) sink runs in a worker thread of its own, so it never blocks
    the bus loop or another sink; an async sink runs in the bus loop.

    Optional methods, called when present:

    * ``open(context)`` (or ``open()``): once, before the first write, in the sink's worker.
      An exception here fails :meth:`Bus.open` with the sink's id.
    * ``flush()``: make everything written so far durable (called on ``Bus.flush`` and
      before ``close``).
    * ``close()``: release resources; called once.
    * ``is_transient(exc) -> bool``: whether a failed write may be retried. By default
      :class:`TransientSinkError`, ``ConnectionError`` and ``TimeoutError`` are transient.
    """

    def write(self, batch: Sequence[Event]) -> Awaitable[None] | None:
        """Deliver a batch of events, in order."""


class SinkContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a sink learns about the run when it opens.

    Attributes:
        sink_id: the sink's key in the ``sinks:`` map.
        run_dir: the run directory; relative sink paths resolve inside it.
        run_id: a stable id of the run (kept across resumes by the bridge).
        global_rank: this process's global rank.
        world_size: number of processes in the run.
    """

    sink_id: str
    run_dir: Path
    run_id: str
    global_rank: int = 0
    world_size: int = 1

    def resolve(self, path: str | Path, *, key: str | None = None) -> Path:
        """A sink path: absolute as given (the user's choice), otherwise inside the run directory.

        Args:
            path: the path from the sink's options (``~`` is expanded).
            key: the option it came from, named in the error.

        Raises:
            SinkPathError: a relative path that would leave the run directory (``../x``).
                The check is lexical: a symlink inside the run directory is followed as the
                user made it.
        """
        candidate = Path(path).expanduser()
        if candidate.is_absolute():
            return candidate
        if ".." in candidate.parts and os.path.normpath(candidate).split(os.sep)[0] == "..":
            option = f"option {key!r}: " if key else ""
            raise SinkPathError(
                f"sink {self.sink_id!r}: {option}relative path {str(path)!r} would leave the run directory "
                f"{str(self.run_dir)!r}; use a path inside the run directory (without '..'), or an absolute "
                "path to write elsewhere on purpose")
        return self.run_dir / candidate


class SinkPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the bus treats one sink (the keys beside ``type:`` in a sink's YAML block).

    Attributes:
        when_full: ``drop_newest`` drops (and counts) metrics/timings that arrive while the
            sink's queue is full; ``block`` makes the bus's fan-out wait for room instead
            (lossless for this sink, but every sink then waits behind it). Lifecycle,
            hyperparameter and checkpoint events are never dropped.
        queue_size: bound of the sink's queue, in events.
        batch_size: most events in one ``write``.
        batch_delay: seconds the first event of a batch may wait for more.
        max_retries: retries of a batch that failed with a transient error.
        retry_backoff: first retry delay in seconds; doubles each time, with jitter.
        retry_backoff_max: cap of the retry delay.
        write_timeout: a ``write``/``flush`` taking longer counts as hung: the sink is
            disabled and the rest of its queue counted as dropped.
        max_consecutive_failures: failed batches in a row after which the sink is disabled.
        rank_zero_only: under several processes, only global rank 0 delivers to this sink.
        catch_up: when a bus opens on a run directory whose journal holds events this sink
            has not acknowledged (a resumed run after a crash), deliver them first. ``None``
            follows the sink's own ``catch_up`` attribute (True unless the sink says
            otherwise, as the console does: old lines on a terminal help nobody).
    """

    when_full: WhenFull = "drop_newest"
    queue_size: int = 100_000
    batch_size: int = 1024
    batch_delay: float = 2.0
    max_retries: int = 5
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    write_timeout: float = 60.0
    max_consecutive_failures: int = 10
    rank_zero_only: bool = True
    catch_up: bool | None = None

    def __post_init__(self) -> None:
        for name in ("queue_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_delay", "retry_backoff", "retry_backoff_max", "write_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


POLICY_KEYS: frozenset[str] = frozenset(SinkPolicy.__struct_fields__)


class TransientSinkError(Exception):
    """Raise (or chain) this from a sink's ``write`` when a retry may succeed."""


class SinkPathError(ValueError):
    """A sink's relative path would leave the run directory; the message names the sink, option and fix."""


class SinkOpenError(RuntimeError):
    """A sink failed to open; the message names the sink id and the cause."""

    def __init__(self, sink_id: str, cause: BaseException | str) -> None:
        self.sink_id = sink_id
        self.cause = cause
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"sink {sink_id!r} failed to open: {detail}")


def open_args(opener: Callable[..., object], context: SinkContext) -> tuple[SinkContext, ...]:
    """The arguments to call a sink's ``open`` with: ``(context,)``, or ``()`` for an ``open()`` without parameters."""
    try:
        params = inspect.signature(opener).parameters
    except (TypeError, ValueError):
        return ()
    return (context,) if params else ()
