"""The ``neptune`` sink: a run's metric series, hyperparameters and checkpoints in a Neptune run (neptune 1.x)."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from expbus.bus import (
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    SinkContext,
    Text,
    Timing,
    TransientSinkError,
)

from ._optional import require
from ._scoped import run_bounded, scoped_environ
from ._state import load_state, save_state

__all__ = [
    "NeptuneSink",
    "is_transient_error",
    "read_offline_runs",
    "offline_series",
    "offline_points_by_step",
]

log = logging.getLogger("expbus.sinks.neptune")

Mode = Literal["offline", "debug", "async", "sync"]
_MODES: tuple[str, ...] = ("offline", "debug", "async", "sync")
_ONLINE = ("async", "sync")

# Lightning's NeptuneLogger finalize(status) vocabulary for the ``<prefix>/status`` field.
_STATUS = {"completed": "success", "failed": "failed", "interrupted": "interrupted"}

# Environment variables are process-wide: sinks opening in parallel take turns.


def is_transient_error(exc: BaseException) -> bool:
    """Whether a failed write may succeed when retried: a lost connection to the Neptune server."""
    if isinstance(exc, (TransientSinkError, ConnectionError, TimeoutError)):
        return True
    try:
        from neptune.exceptions import NeptuneConnectionLostException
    except ImportError:  # pragma: no cover - the client is there whenever the sink wrote
        return False
    return isinstance(exc, NeptuneConnectionLostException)


class NeptuneSink:
    """Appends metrics to Neptune float series, and logs hyperparameters and checkpoints, as Lightning's
    ``NeptuneLogger`` did, with the neptune 1.x client.

    Service status: Neptune's hosted service (app.neptune.ai) closed in 2026 and Lightning
    removed its ``NeptuneLogger``; this sink serves self-hosted Neptune servers and offline use
    (``neptune sync`` uploads an offline run to a server later). It refuses an API token that
    points at ``*.neptune.ai``, and never goes online unless told to.

    Mapping (Lightning's ``NeptuneLogger``): every ``Metrics`` value (plus ``epoch`` when the
    event has one, as Lightning adds it) and every ``Timing`` duration is appended to the float
    series ``<prefix>/<name>`` with its step and the event's time, one ``extend`` call per
    series and batch. Neptune needs strictly increasing steps in a series and cannot hold NaN
    or infinities: a point whose step is not above the series' last step (the same step logged
    twice, as Lightning's ``epoch`` at a validation step, or a resumed run going back) and a
    non-finite value are skipped (counted; the first one of a kind is logged) instead of
    failing on the server. ``Hyperparams`` go to ``<prefix>/hyperparams`` as nested namespaces,
    with ``neptune.utils.stringify_unsupported`` (lists and ``None`` become text), as Lightning
    logged them. ``Text`` is appended to the string series ``<prefix>/<name>``. With
    ``log_model_checkpoints``, a ``CheckpointSaved`` is uploaded to
    ``<prefix>/model/checkpoints/<file name without extension>`` (a directory as a file set),
    a best one also sets ``<prefix>/model/best_model_path`` and ``best_model_score``, and a
    ``CheckpointRemoved`` deletes its upload, as Lightning mirrored the top-k. ``RunFinished``
    sets ``<prefix>/status`` (``success``, ``failed``, ``interrupted``) and, for a failure,
    ``sys/failed`` and ``<prefix>/error_message``.

    The run is opened without Neptune's background capture: no hardware metrics, stdout,
    stderr or traceback threads, no git or source-code snapshot (each can be turned back on
    through ``**kwargs``). In offline mode an upload only records the checkpoint's path: keep
    the file until the run is synced.

    Mode: ``mode`` wins, else ``NEPTUNE_MODE``, else ``async`` when both a project and an API
    token are configured (options or ``NEPTUNE_PROJECT`` / ``NEPTUNE_API_TOKEN``) and
    ``offline`` otherwise, so an unconfigured sink never reaches for a server. Neptune's
    ``read-only`` mode is not offered (a sink writes).

    Resume: the run's id is kept in the run directory. Online, a resumed run (same project)
    reopens the same Neptune run (``with_id=<sys/id>``) and skips the steps each series already
    holds. Offline,
    Neptune cannot reopen a run (``with_id`` needs a server), so each process writes a new
    offline run; the state lists them in order (``offline_runs``) and ``neptune sync`` uploads
    each as a run of its own.

    Args:
        project: ``workspace/project`` on the server; default ``NEPTUNE_PROJECT``.
        api_token: the API token; default ``NEPTUNE_API_TOKEN``. Never logged.
        api_key: the same token under Lightning's/NeMo's name (``neptune_logger_kwargs.api_key``).
        name: the run's name (``sys/name``).
        tags: the run's tags (``sys/tags``).
        description: the run's description.
        prefix: root namespace of everything the sink logs (Lightning's ``"training"``); empty
            logs at the run's root.
        log_model_checkpoints: upload checkpoints (Lightning's default ``True``).
        mode: ``offline``, ``debug`` (in memory, nothing kept), ``async`` or ``sync``; see above.
        with_id: the ``sys/id`` of an existing run to continue (needs a server).
        data_dir: Neptune's data directory (``NEPTUNE_DATA_DIRECTORY``): offline runs and the
            async queue; relative paths are inside the run directory (sync it with
            ``neptune sync --path <run dir>``); ``None`` keeps Neptune's (``./.neptune``).
        stop_timeout: seconds ``close`` lets ``run.stop`` wait for queued operations (``close``
            gives up after twice that, at most ``stop_timeout + 10``).
        **kwargs: passed to ``neptune.init_run`` (``capture_hardware_metrics``, ``flush_period``,
            ``custom_run_id``, ``proxies``, ...), overriding the sink's choices.
    """

    def __init__(
        self,
        project: str | None = None,
        api_token: str | None = None,
        api_key: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        description: str | None = None,
        prefix: str = "training",
        log_model_checkpoints: bool = True,
        mode: Mode | None = None,
        with_id: str | None = None,
        data_dir: str | None = ".neptune",
        stop_timeout: float = 20.0,
        **kwargs: Any,
    ) -> None:
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)} (a sink cannot log in read-only mode), "
                             f"got {mode!r}")
        if api_token and api_key and api_token != api_key:
            raise ValueError("api_token and api_key are the same setting; give one")
        if with_id and mode in ("offline", "debug"):
            raise ValueError(f"with_id needs a Neptune server; mode {mode!r} cannot reopen run {with_id!r}")
        if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) for t in tags)):
            raise ValueError(f"tags must be a list of strings, got {tags!r}")
        if stop_timeout <= 0:
            raise ValueError(f"stop_timeout must be > 0 seconds, got {stop_timeout}")
        self.project = project
        self._api_token = api_token or api_key  # kept out of repr and logs
        self.name = name
        self.tags = list(tags) if tags else None
        self.description = description
        self.prefix = prefix.strip("/")
        self.log_model_checkpoints = log_model_checkpoints
        self.mode = mode
        self.with_id = with_id
        self.data_dir = data_dir
        self.stop_timeout = stop_timeout
        self.init_kwargs = kwargs
        # Filled by open():
        self.resolved_mode: str | None = None
        self.run_ref: str | None = None  # sys/id online, "offline/<uuid>" offline
        self.continued = False
        self.skipped_steps = 0
        self.skipped_nonfinite = 0
        self._run: Any = None
        self._context: SinkContext | None = None
        self._last_step: dict[str, float] = {}
        self._state: dict[str, Any] = {}
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (f"NeptuneSink(project={self.project!r}, name={self.name!r}, mode={self.mode!r}, "
                f"prefix={self.prefix!r}, api_token={'***' if self._api_token else None})")

    # -- lifecycle --------------------------------------------------------------------
    def open(self, context: SinkContext) -> None:
        """Start (or reopen) the Neptune run."""
        neptune = require("neptune", sink="neptune", extra="neptune")
        self._context = context
        mode = self._resolve_mode()
        self.resolved_mode = mode
        state = load_state(context)
        init: dict[str, Any] = {
            "mode": mode,
            "name": self.name,
            "description": self.description,
            "tags": self.tags,
            # Neptune's background capture competes with training for the GIL; off.
            "capture_hardware_metrics": False,
            "capture_stdout": False,
            "capture_stderr": False,
            "capture_traceback": False,
            "git_ref": False,
            "source_files": [],
        }
        if self.project:
            init["project"] = self.project
        if self._api_token:
            init["api_token"] = self._api_token
        project = self.project or os.environ.get("NEPTUNE_PROJECT")
        with_id = self.with_id
        if with_id is None and mode in _ONLINE and "custom_run_id" not in self.init_kwargs:
            if state.get("sys_id") and state.get("mode") in _ONLINE and state.get("project") == project:
                with_id = state["sys_id"]
        if with_id:
            if mode not in _ONLINE:
                raise ValueError(f"with_id needs a Neptune server; mode {mode!r} cannot reopen run {with_id!r}")
            init["with_id"] = with_id
            self.continued = True
            if state.get("sys_id") == with_id:
                self._last_step = {k: float(v) for k, v in state.get("last_steps", {}).items()}
        elif state.get("mode") in ("offline", "debug") or (state and mode not in _ONLINE):
            log.warning("neptune sink %r: Neptune's %s mode cannot reopen a run; this process writes a new "
                        "one (the run directory's state lists every offline run, in order)",
                        context.sink_id, mode)
        init.update(self.init_kwargs)

        env: dict[str, str] = {}
        if self.data_dir:
            data_dir = context.resolve(self.data_dir)
            data_dir.mkdir(parents=True, exist_ok=True)
            env["NEPTUNE_DATA_DIRECTORY"] = str(data_dir)
        with scoped_environ(env):
            # The data directory is read while the run's operation processor is built, in here.
            self._run = neptune.init_run(**init)
        self.run_ref = self._reference(self._run, mode)
        offline_runs = list(state.get("offline_runs", [])) if state.get("mode") in ("offline", "debug") else []
        if mode == "offline":
            offline_runs.append(self.run_ref)
        self._state = {
            "mode": mode,
            "sys_id": self.run_ref if mode in _ONLINE else None,
            "project": project,
            "offline_runs": offline_runs,
        }
        self._save()

    def _resolve_mode(self) -> str:
        mode = self.mode or os.environ.get("NEPTUNE_MODE") or None
        token = self._api_token or os.environ.get("NEPTUNE_API_TOKEN")
        project = self.project or os.environ.get("NEPTUNE_PROJECT")
        if mode is None:
            mode = "async" if token and project else "offline"
        if mode not in _MODES:
            raise ValueError(f"Neptune mode {mode!r} (from NEPTUNE_MODE) is not one of {', '.join(_MODES)}")
        if mode in _ONLINE:
            _refuse_hosted_service(token)
        return mode

    @staticmethod
    def _reference(run: Any, mode: str) -> str:
        if mode in _ONLINE:
            return str(run["sys/id"].fetch())
        # Offline runs have no sys/id; Neptune names them "offline/<uuid>" (neptune sync --object ...).
        return str(run.get_url())

    def write(self, batch: Sequence[Event]) -> None:
        """Append the batch's series (one ``extend`` per series) and log its other events."""
        run = self._run
        assert run is not None, "NeptuneSink.write before open"
        floats: dict[str, tuple[list[float], list[float], list[float]]] = {}
        texts: dict[str, tuple[list[str], list[float], list[float]]] = {}
        for event in batch:
            if isinstance(event, Metrics):
                values: dict[str, float] = dict(event.values)
                if event.epoch is not None:
                    # Lightning's logger connector adds the epoch to every log_metrics call.
                    values.setdefault("epoch", float(event.epoch))
                self._collect_floats(floats, values, event.step, event.time)
            elif isinstance(event, Timing):
                self._collect_floats(floats, event.durations, event.step, event.time)
            elif isinstance(event, Text):
                key = self._key(event.name)
                if self._admit(key, event.step):
                    entry = texts.setdefault(key, ([], [], []))
                    entry[0].append(event.text)
                    entry[1].append(event.step)
                    entry[2].append(event.time)
            else:
                # Keep the order of series and the rest: flush the series gathered so far.
                self._extend(floats)
                self._extend(texts)
                floats, texts = {}, {}
                self._log_other(run, event)
        self._extend(floats)
        self._extend(texts)

    def flush(self) -> None:
        """Write Neptune's queued operations to disk (not to the server) and save the run's state."""
        if self._run is not None:
            self._run.wait(disk_only=True)
            self._save()

    def close(self) -> None:
        """Flush, save the state and stop the run within ``stop_timeout`` (plus a margin)."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.wait(disk_only=True)
        finally:
            self._save()
        # run.stop(seconds=...) bounds its waits, not its bookkeeping: a margin on top, then give up.
        deadline = self.stop_timeout + min(10.0, self.stop_timeout)
        if not run_bounded(lambda: run.stop(seconds=self.stop_timeout), deadline, "expbus-neptune-stop"):
            raise TimeoutError(f"neptune run {self.run_ref} did not stop within {deadline}s")
        if self.skipped_steps or self.skipped_nonfinite:
            log.info("neptune sink: skipped %d points whose step was not above their series' last step and "
                     "%d NaN/infinite values", self.skipped_steps, self.skipped_nonfinite)

    def is_transient(self, exc: BaseException) -> bool:
        """See :func:`is_transient_error`."""
        return is_transient_error(exc)

    # -- helpers ----------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _admit(self, key: str, step: float) -> bool:
        """Whether a point at ``step`` may go to series ``key`` (Neptune: strictly increasing steps)."""
        last = self._last_step.get(key)
        if last is None or step > last:
            self._last_step[key] = step
            return True
        self.skipped_steps += 1
        if step < last:
            self._warn_once("step", f"neptune sink: {key} at step {step} is below the series' last step {last}; "
                                    "Neptune needs increasing steps, so it is skipped (further ones are counted)")
        return False

    def _collect_floats(self, out: dict[str, tuple[list[float], list[float], list[float]]],
                        values: Mapping[str, float], step: int, when: float) -> None:
        for name, value in values.items():
            value = float(value)
            key = self._key(name)
            if not math.isfinite(value):
                self.skipped_nonfinite += 1
                self._warn_once("nonfinite", f"neptune sink: {key}={value} at step {step} is skipped (Neptune's "
                                             "float series cannot hold NaN or infinities; further ones are counted)")
                continue
            if self._admit(key, step):
                entry = out.setdefault(key, ([], [], []))
                entry[0].append(value)
                entry[1].append(step)
                entry[2].append(when)

    def _extend(self, series: Mapping[str, tuple[list[Any], list[float], list[float]]]) -> None:
        run = self._run
        for key, (values, steps, times) in series.items():
            try:
                run[key].extend(values, steps=steps, timestamps=times)
            except BaseException:
                # Not written: a retry of the batch must not skip these points as already sent.
                self._forget(key, steps[0])
                raise

    def _forget(self, key: str, first_step: float) -> None:
        last = self._last_step.get(key)
        if last is not None and last >= first_step:
            # The points before this batch were sent; the step just below the batch's first is a
            # safe lower bound for what the series holds.
            self._last_step[key] = math.nextafter(first_step, -math.inf)

    def _log_other(self, run: Any, event: Event) -> None:
        if isinstance(event, Hyperparams):
            from neptune.utils import stringify_unsupported

            run[self._key("hyperparams")] = stringify_unsupported(dict(event.params))
        elif isinstance(event, CheckpointSaved):
            if self.log_model_checkpoints:
                self._upload(run, event)
        elif isinstance(event, CheckpointRemoved):
            if self.log_model_checkpoints:
                key = self._key(f"model/checkpoints/{_checkpoint_name(event.path)}")
                if run.exists(key):
                    del run[key]
        elif isinstance(event, RunFinished):
            run[self._key("status")] = _STATUS.get(event.status, event.status)
            if event.status == "failed":
                run["sys/failed"] = True
                if event.error:
                    run[self._key("error_message")] = event.error[:16_000]

    def _upload(self, run: Any, event: CheckpointSaved) -> None:
        path = Path(event.path)
        if not path.exists():
            log.warning("neptune sink: checkpoint %s is gone; not uploaded", path)
            return
        key = self._key(f"model/checkpoints/{_checkpoint_name(event.path)}")
        if path.is_dir():
            run[key].upload_files(str(path))
        else:
            run[key].upload(str(path))
        if event.is_best:
            run[self._key("model/best_model_path")] = str(path)
            if event.monitor_value is not None and math.isfinite(event.monitor_value):
                run[self._key("model/best_model_score")] = float(event.monitor_value)

    def _save(self) -> None:
        if self._context is None or not self._state:
            return
        save_state(self._context, {**self._state, "last_steps": dict(self._last_step)})

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _checkpoint_name(path: str) -> str:
    """A checkpoint's name in the run: its file name without the extension (a directory's name)."""
    candidate = Path(path)
    if candidate.suffix and not candidate.is_dir():
        return candidate.stem
    return candidate.name


def _refuse_hosted_service(token: str | None) -> None:
    """Raise for a token of the closed hosted service; a missing or odd token is Neptune's to report."""
    if not token:
        return
    from neptune.internal.credentials import Credentials

    try:
        credentials = Credentials.from_token(token)
    except Exception:
        return  # neptune.init_run names the problem
    address = credentials.api_url_opt or credentials.token_origin_address
    host = (urlsplit(address if "//" in address else f"//{address}").hostname or "").lower()
    if host == "neptune.ai" or host.endswith(".neptune.ai"):
        raise ValueError(
            f"the Neptune API token points at {host}: Neptune's hosted service closed in 2026. Use a token of a "
            "self-hosted Neptune server, or mode: offline and `neptune sync` to a server later"
        )


def read_offline_runs(data_dir: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Every offline run under a Neptune data directory: its id -> its operations, in order.

    ``neptune sync`` finds the runs with ``collect_offline_containers`` and reads each
    execution directory's ``DiskQueue`` of serialized operations; so does this (with
    Neptune's own classes). ``data_dir`` is the sink's ``data_dir`` (``run_dir/.neptune``).
    """
    require("neptune", sink="neptune", extra="neptune")
    from neptune.cli.collect import collect_offline_containers
    from neptune.core.components.queue.disk_queue import DiskQueue
    from neptune.internal.operation import Operation

    runs: dict[str, list[Any]] = {}
    for container in collect_offline_containers(path=Path(data_dir)):
        operations: list[Any] = []
        for execution_dir in container.execution_dirs:
            queue: Any = DiskQueue(
                data_path=execution_dir.path,
                to_dict=lambda op: op.to_dict(),
                from_dict=Operation.from_dict,
                lock=threading.RLock(),
            )
            try:
                while batch := queue.get_batch(1000):
                    operations.extend(element.obj for element in batch)
            finally:
                queue.close()
        runs[str(container.container_id)] = operations
    return runs


def offline_series(operations: list[Any], kind: Any = None) -> dict[str, list[tuple[float, Any]]]:
    """path -> [(step, value), ...] of every float series (or of ``kind``'s operations) in a run."""
    if kind is None:
        from neptune.internal.operation import LogFloats

        kind = LogFloats
    out: dict[str, list[tuple[float, Any]]] = defaultdict(list)
    for op in operations:
        if isinstance(op, kind):
            out["/".join(op.path)].extend((v.step, v.value) for v in op.values)
    return dict(out)


def offline_points_by_step(operations: list[Any], prefix: str = "training") -> list[tuple[int, dict[str, float]]]:
    """Metric points of a run as ``(step, {name: value})`` by step (Lightning's ``epoch`` left out)."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for path, points in offline_series(operations).items():
        name = path[len(prefix) + 1:] if prefix else path
        if name == "epoch":
            continue
        for step, value in points:
            by_step[int(step)][name] = value
    return sorted(by_step.items())
