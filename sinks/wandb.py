"""The ``wandb`` sink: one Weights & Biases run per expbus run, logged as Lightning's ``WandbLogger`` logs it."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from expbus.bus import (
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    SinkContext,
    Timing,
)

from ._optional import require
from ._state import load_state, save_state

__all__ = ["WandbSink", "OfflineRun", "read_offline_run", "read_offline_runs", "read_offline_history", "STEP_METRIC"]

log = logging.getLogger("expbus.sinks.wandb")

#: The x-axis of every metric, as Lightning's ``WandbLogger`` defines it.
STEP_METRIC = "trainer/global_step"

# W&B run ids may not contain these (``wandb.Settings.validate_run_id``).
_RESERVED_ID_CHARS = re.compile(r"[:;,#?/'\s]")

# Seconds added to ``finish_timeout`` before the sink stops waiting on wandb-core and ends it.
_FINISH_GRACE = 5.0

# RunFinished status -> wandb exit code (wandb marks a non-zero exit as failed; 255 is what its
# own exit hook reports for Ctrl-C).
_EXIT_CODES = {"completed": 0, "failed": 1, "interrupted": 255}

ResumeMode = Literal["allow", "must", "never", "auto"]


class WandbSink:
    """Logs metrics, hyperparameters and checkpoints to a W&B run, as Lightning's ``WandbLogger`` does.

    Mapping: every ``Metrics`` (and ``Timing``) event becomes one ``run.log`` row holding its
    values plus ``trainer/global_step`` (the event's step) and ``epoch`` (when the event has
    one and no value is named so), and the run declares ``trainer/global_step`` the step metric
    of every key (``define_metric("*", step_metric="trainer/global_step", step_sync=True)``),
    exactly as ``WandbLogger`` does: W&B's own ``_step`` only counts rows, so a resumed run
    (whose ``_step`` may restart) loses no point and charts against the training step.
    Consecutive events of one step in a batch share a row unless a name repeats.
    ``Hyperparams`` update ``run.config`` (nested mappings kept). ``RunStarted`` names the run
    after the experiment (its ``config.name``) unless ``name`` is set. ``RunFinished`` sets
    the exit code (``failed``: 1, ``interrupted``: 255). ``Text`` events are not logged.

    Run identity: ``id`` (or its Lightning alias ``version``) wins; otherwise the id saved in
    the run directory by an earlier session (``.expbus/sinks/<sink_id>.json``) is reused, and
    on the first session it is derived from the expbus run id. With ``resume="allow"`` a
    resumed training run therefore continues the same W&B run.

    Checkpoints (``log_model``, Lightning's semantics): ``"all"`` logs each ``CheckpointSaved``
    as a ``model`` artifact when it arrives; ``True`` logs the checkpoints still on disk (not
    removed by top-k pruning) when the run finishes ``completed``. An artifact holds the file
    as ``model.ckpt`` (a directory checkpoint is added as a directory), with aliases
    ``latest`` (and ``best`` for the best one) and metadata ``score``, ``original_filename``,
    ``step``, ``epoch`` and ``ModelCheckpoint.monitor``. Unlike ``WandbLogger``, artifacts are
    allowed offline: they are recorded in the run file and uploaded by ``wandb sync``.

    Process side effects, chosen so that logging costs the training thread nothing: the run is
    created on the sink's own thread with ``reinit="create_new"`` (so it never becomes, or
    replaces, the global ``wandb.run``); console capture is off (``console="off"``: wandb's
    capture runs on every ``print`` of the training thread) and wandb prints nothing
    (``silent``), both overridable in ``settings``; W&B's error reporting (telemetry sent to
    api.wandb.ai) is off unless ``WANDB_ERROR_REPORTING`` is set; offline, machine-info
    probing (cloud metadata endpoints) is off too. System metrics stay on (wandb-core samples
    them in its own process); ``settings: {x_disable_stats: true}`` turns them off.
    ``close()`` finishes the run within ``finish_timeout`` (plus a few seconds), then shuts the
    wandb-core service down when no other run of the process uses it; a service that
    does not answer in time is killed, so it can never hold the process at exit.

    Args:
        name: display name of the run; default: the experiment name (from ``RunStarted``).
        project: W&B project; default ``$WANDB_PROJECT``, else ``lightning_logs`` (as Lightning).
        entity: W&B entity (user or team).
        save_dir: directory under which wandb writes ``wandb/``; relative paths are inside the
            run directory; default: the run directory.
        dir: same as ``save_dir`` (``save_dir`` wins).
        offline: run offline (``mode="offline"``): everything goes to
            ``<save_dir>/wandb/offline-run-*/run-<id>.wandb``, uploadable later with ``wandb sync``.
        mode: wandb's mode (``online``, ``offline``, ``disabled``, ``shared``); ``offline: true``
            means ``offline``.
        tags: run tags.
        group: run group.
        job_type: run job type.
        notes: run notes.
        id: W&B run id (must not contain ``:;,#?/'``); wins over the saved one.
        version: Lightning's alias of ``id``.
        resume: wandb's resume mode; ``allow`` (Lightning's default) continues an existing run.
        log_model: ``False``, ``True`` (checkpoints at the end) or ``"all"`` (every checkpoint).
        checkpoint_name: artifact name of the checkpoints; default ``model-<run id>``.
        add_file_policy: ``mutable`` copies a checkpoint to wandb's staging area before it is
            uploaded (safe if the file is later deleted); ``immutable`` references it in place.
        prefix: put ``<prefix>-`` before every metric name (Lightning's ``prefix``).
        finish_timeout: seconds ``run.finish()`` may spend uploading at close (wandb's
            ``finish_timeout`` setting); a few seconds later the sink stops waiting.
        settings: ``wandb.Settings`` fields (a mapping or a ``wandb.Settings``); they win over
            the sink's defaults (``console``, ``silent``, ...).
        **kwargs: any other ``wandb.init`` argument (``config``, ``reinit``, ``anonymous``, ...).
    """

    def __init__(
        self,
        name: str | None = None,
        project: str | None = None,
        entity: str | None = None,
        save_dir: str | None = None,
        dir: str | None = None,
        offline: bool = False,
        mode: Literal["online", "offline", "disabled", "shared"] | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        job_type: str | None = None,
        notes: str | None = None,
        id: str | None = None,
        version: str | None = None,
        resume: ResumeMode | bool | None = "allow",
        log_model: Literal["all"] | bool = False,
        checkpoint_name: str | None = None,
        add_file_policy: Literal["mutable", "immutable"] = "mutable",
        prefix: str = "",
        finish_timeout: float = 20.0,
        settings: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if offline and mode not in (None, "offline"):
            raise ValueError(f"offline=True contradicts mode={mode!r}")
        if id is not None and version is not None and id != version:
            raise ValueError(f"id={id!r} and version={version!r} disagree (version is an alias of id)")
        run_id = id if id is not None else version
        if run_id is not None:
            _check_run_id(run_id)
        if log_model not in (True, False, "all"):
            raise ValueError(f"log_model must be true, false or 'all', got {log_model!r}")
        if finish_timeout < 0:
            raise ValueError(f"finish_timeout must be >= 0 seconds, got {finish_timeout}")
        self.name = name
        self.project = project
        self.entity = entity
        self.save_dir = save_dir if save_dir is not None else dir
        self.mode = "offline" if offline else mode
        self.tags = list(tags) if tags is not None else None
        self.group = group
        self.job_type = job_type
        self.notes = notes
        self.id = run_id
        self.resume = resume
        self.log_model = log_model
        self.checkpoint_name = checkpoint_name
        self.add_file_policy = add_file_policy
        self.prefix = prefix
        self.finish_timeout = finish_timeout
        self.settings = settings
        self.init_kwargs = dict(kwargs)
        self.run: Any = None
        self.run_id: str | None = None
        self._wandb: Any = None
        self._context: SinkContext | None = None
        self._exit_code = 0
        self._service: Any = None  # this process's wandb-core Popen, when it can be found
        self._closed = threading.Event()
        # path -> event of checkpoints saved and not removed (log_model=True logs them at the end).
        self._checkpoints: dict[str, CheckpointSaved] = {}
        self._models_logged = False

    # -- lifecycle --------------------------------------------------------------------
    def open(self, context: SinkContext) -> None:
        """Start (or resume) the W&B run, on the sink's worker thread."""
        # Before wandb is imported: no error reports or telemetry sent to W&B's servers.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        wandb = require("wandb", sink="wandb", extra="wandb")
        self._wandb = wandb
        self._context = context
        state = load_state(context)
        self.run_id = self.id or state.get("id") or _derive_run_id(context)
        save_dir = context.resolve(self.save_dir) if self.save_dir else context.run_dir
        save_dir.mkdir(parents=True, exist_ok=True)
        init: dict[str, Any] = {
            "project": self.project or os.environ.get("WANDB_PROJECT", "lightning_logs"),
            "entity": self.entity,
            "name": self.name,
            "dir": os.fspath(save_dir),
            "id": self.run_id,
            "resume": self.resume,
            "tags": self.tags,
            "group": self.group,
            "job_type": self.job_type,
            "notes": self.notes,
            "mode": self.mode,
            # Our own run: never returned to (or finishing) a run the user started elsewhere.
            "reinit": "create_new",
        }
        init.update(self.init_kwargs)
        init["settings"] = wandb.Settings(**self._settings(wandb))
        # Saved first: a crash inside init still resumes the same W&B run next time.
        save_state(context, {"id": self.run_id, "project": init["project"], "entity": init["entity"]})
        try:
            self.run = wandb.init(**{k: v for k, v in init.items() if v is not None})
        except BaseException:
            if _no_active_runs(wandb):
                _quietly(wandb.teardown)  # do not leave a wandb-core behind a failed open
            raise
        if self.run.id != self.run_id:  # e.g. WANDB_RUN_ID, or an id inside settings
            self.run_id = self.run.id
            save_state(context, {"id": self.run_id, "project": init["project"], "entity": init["entity"]})
        self._service = _service_process(wandb)
        # Ours runs before wandb's own exit hook (registered earlier): a sink the bus never
        # closed still finishes within its deadline instead of letting wandb wait forever.
        atexit.register(self._close_at_exit)
        # Lightning's x-axis: every key charts against the training step, not W&B's _step.
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)

    def _settings(self, wandb: Any) -> dict[str, Any]:
        defaults: dict[str, Any] = {"console": "off", "silent": True, "finish_timeout": self.finish_timeout}
        if self.mode == "offline":
            defaults["x_disable_machine_info"] = True
        user: Mapping[str, Any]
        if self.settings is None:
            user = {}
        elif isinstance(self.settings, wandb.Settings):
            user = {k: getattr(self.settings, k) for k in self.settings.model_fields_set}
        else:
            user = self.settings
        return {**defaults, **user}

    def write(self, batch: Sequence[Event]) -> None:
        """One ``run.log`` per step of metrics; config, naming and checkpoints as they come."""
        run = self.run
        assert run is not None, "WandbSink.write before open"
        row: dict[str, Any] = {}
        row_step: int | None = None
        for event in batch:
            if isinstance(event, (Metrics, Timing)):
                values = event.values if isinstance(event, Metrics) else event.durations
                if row and (event.step != row_step or any(self._key(k) in row for k in values)):
                    run.log(row)
                    row = {}
                if not row:
                    row_step = event.step
                    row[STEP_METRIC] = event.step
                for key, value in values.items():
                    row[self._key(key)] = value
                if isinstance(event, Metrics) and event.epoch is not None:
                    # Lightning's logger connector: metrics.setdefault("epoch", current_epoch).
                    row.setdefault("epoch", event.epoch)
                continue
            if row:
                run.log(row)
                row = {}
            if isinstance(event, Hyperparams):
                run.config.update(event.params, allow_val_change=True)
            elif isinstance(event, RunStarted):
                experiment = event.config.get("name") if isinstance(event.config, Mapping) else None
                if self.name is None and isinstance(experiment, str) and experiment:
                    run.name = experiment
            elif isinstance(event, CheckpointSaved):
                self._checkpoint_saved(event)
            elif isinstance(event, CheckpointRemoved):
                self._checkpoints.pop(event.path, None)
            elif isinstance(event, RunFinished):
                self._exit_code = _EXIT_CODES.get(event.status, 1)
                if self.log_model is True and event.status == "completed":
                    self._log_remaining_checkpoints()
        if row:
            run.log(row)

    def flush(self) -> None:
        """Nothing to do: W&B has no flush; wandb-core writes the run file and uploads on its own."""

    def close(self) -> None:
        """Finish the run (bounded) and end wandb-core when no other run of the process uses it."""
        if self.run is None or self._closed.is_set():
            return
        self._closed.set()
        try:
            atexit.unregister(self._close_at_exit)
        except Exception:  # pragma: no cover - atexit.unregister does not raise in CPython
            pass
        self._finish(self.finish_timeout + _FINISH_GRACE)

    def _close_at_exit(self) -> None:
        # The only wandb call off the worker thread: at interpreter exit, for a sink never closed.
        if not self._closed.is_set() and self.run is not None:
            self._closed.set()
            self._finish(self.finish_timeout + _FINISH_GRACE)

    def _finish(self, deadline: float) -> None:
        """``run.finish`` then ``wandb.teardown``, with a watchdog that kills a hung wandb-core."""
        wandb, run = self._wandb, self.run
        killed = threading.Event()
        watchdog = threading.Timer(deadline, self._kill_service, args=(killed,))
        watchdog.daemon = True
        watchdog.start()
        error: Exception | None = None
        try:
            try:
                run.finish(exit_code=self._exit_code)
            except Exception as exc:
                error = exc
            # Ends this process's wandb-core (and unregisters wandb's exit hook, which would
            # otherwise wait on it without a limit), unless another run still uses it. A
            # service shared from outside (WANDB_SERVICE) is only disconnected from.
            if killed.is_set() or _no_active_runs(wandb):
                try:
                    wandb.teardown()
                except Exception as exc:
                    error = error or exc
        finally:
            watchdog.cancel()
            self.run = None
        if killed.is_set():
            log.error("wandb sink: wandb-core did not finish the run within %.0fs and was killed; "
                      "the run file keeps what it wrote (see `wandb sync`)", deadline)
        elif error is not None:
            raise error

    def _kill_service(self, killed: threading.Event) -> None:
        service = self._service
        if service is None or service.poll() is not None:
            log.error("wandb sink: the run did not finish in time and the wandb-core process "
                      "cannot be ended from here")
            return
        killed.set()
        service.kill()

    # -- checkpoints ------------------------------------------------------------------
    def _checkpoint_saved(self, event: CheckpointSaved) -> None:
        if not self.log_model:
            return
        self._checkpoints[event.path] = event
        if self.log_model == "all":
            self._log_checkpoint(event)

    def _log_remaining_checkpoints(self) -> None:
        if self._models_logged:
            return
        self._models_logged = True
        for event in sorted(self._checkpoints.values(), key=lambda e: (e.time, e.step)):
            self._log_checkpoint(event)

    def _log_checkpoint(self, event: CheckpointSaved) -> None:
        assert self._context is not None and self.run is not None
        if "://" in event.path and not event.path.startswith("file://"):
            log.warning("wandb sink: checkpoint %s is not a local file; not logged as an artifact", event.path)
            return
        # As the bridge reports it (relative to the working directory), else inside the run dir.
        path = Path(event.path.removeprefix("file://"))
        if not path.exists() and not path.is_absolute():
            # Reading a file the bridge reported: no containment check (that is for paths we write).
            path = self._context.run_dir / path
        if not path.exists():
            log.warning("wandb sink: checkpoint %s is gone; not logged as an artifact", path)
            return
        metadata = {
            "score": event.monitor_value,
            "original_filename": path.name,
            "step": event.step,
            "epoch": event.epoch,
            "ModelCheckpoint": {"monitor": event.monitor},
        }
        name = self.checkpoint_name or f"model-{self.run.id}"
        artifact = self._wandb.Artifact(name=name, type="model", metadata=metadata)
        if path.is_dir():
            artifact.add_dir(os.fspath(path), name="model.ckpt", policy=self.add_file_policy)
        else:
            artifact.add_file(os.fspath(path), name="model.ckpt", policy=self.add_file_policy)
        self.run.log_artifact(artifact, aliases=["latest", "best"] if event.is_best else ["latest"])

    def _key(self, name: str) -> str:
        return f"{self.prefix}-{name}" if self.prefix else name


def _check_run_id(run_id: str) -> None:
    if not run_id.strip() or _RESERVED_ID_CHARS.search(run_id):
        raise ValueError(f"invalid W&B run id {run_id!r}: it must not be empty nor contain :;,#?/' or spaces")


def _derive_run_id(context: SinkContext) -> str:
    """The expbus run id made a valid W&B id (one per rank when several ranks log)."""
    base = _RESERVED_ID_CHARS.sub("-", context.run_id).strip("-") or "expbus"
    if len(base) > 64:
        base = f"{base[:47]}-{zlib.crc32(base.encode()):08x}"
    return base if context.global_rank == 0 else f"{base}-rank{context.global_rank}"


def _setup_singleton(wandb: Any) -> Any:
    # Private, read defensively: the process-wide wandb state (service connection, active runs).
    return getattr(getattr(getattr(wandb, "sdk", None), "wandb_setup", None), "_singleton", None)


def _service_connection(wandb: Any) -> Any:
    return getattr(_setup_singleton(wandb), "_connection", None)


def _service_process(wandb: Any) -> Any:
    """The wandb-core ``subprocess.Popen`` this process started, or None."""
    proc = getattr(_service_connection(wandb), "_proc", None)
    popen = getattr(proc, "_process", None)
    return popen if callable(getattr(popen, "kill", None)) else None


def _quietly(fn: Any) -> None:
    try:
        fn()
    except Exception:
        log.debug("wandb sink: %s failed during cleanup", fn, exc_info=True)


def _no_active_runs(wandb: Any) -> bool:
    singleton = _setup_singleton(wandb)
    if singleton is None:
        return True
    latest = getattr(singleton, "most_recent_active_run", None)
    return not callable(latest) or latest() is None


# -- reading offline runs --------------------------------------------------------------
# wandb 0.31 has no Python reader of its run files (only wandb-core, in Go, reads them). The
# format is leveldb's log format with a 7-byte header and CRC-32 (IEEE) checksums
# (wandb/core/internal/transactionlog, core/pkg/leveldb); each record is a
# ``wandb.proto.wandb_internal_pb2.Record``.

_HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version 0
_CHUNK = struct.Struct("<IHB")  # crc32(type + payload), payload length, chunk type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_record_bytes(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        block = handle.read(_BLOCK)
        ident, magic, version = _HEADER.unpack_from(block) if len(block) >= _HEADER.size else (b"", 0, -1)
        if ident != b":W&B" or magic != 0xBEE1 or version != 0:
            raise ValueError(f"{path}: not a W&B run file (header {block[:_HEADER.size]!r})")
        start = _HEADER.size
        pending: bytearray | None = None
        while block:
            i = start
            while i + _CHUNK.size <= len(block):
                checksum, length, kind = _CHUNK.unpack_from(block, i)
                if checksum == 0 and length == 0 and kind == 0:
                    break  # zero padding: the rest of the block is unused
                end = i + _CHUNK.size + length
                if end > len(block) or zlib.crc32(block[i + 6 : end]) != checksum:
                    pending = None  # truncated or corrupt: skip to the next block, as wandb-core does
                    break
                payload = block[i + _CHUNK.size : end]
                if kind == _FULL:
                    yield bytes(payload)
                elif kind == _FIRST:
                    pending = bytearray(payload)
                elif kind in (_MIDDLE, _LAST) and pending is not None:
                    pending += payload
                    if kind == _LAST:
                        yield bytes(pending)
                        pending = None
                i = end
            block = handle.read(_BLOCK)
            start = 0


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _apply_config(config: dict[str, Any], record: Any) -> None:
    for item in record.update:
        config[_item_key(item)] = json.loads(item.value_json)
    for item in record.remove:
        config.pop(_item_key(item), None)


@dataclass
class OfflineRun:
    """What one W&B run file (``run-<id>.wandb``) holds, read with wandb's own record schema.

    Attributes:
        path: the ``.wandb`` file.
        run_id: the W&B run id.
        project: the project.
        name: the display name (the latest one set).
        tags: the run tags.
        group: the run group.
        start_time: when the run (this session of it) started, Unix seconds.
        config: the run config, every update applied (``_wandb`` internals left out).
        history: the logged rows in order, ``{key: value}`` (values JSON-decoded, so NaN and
            infinities come back as floats), including W&B's ``_step``, ``_runtime``, ``_timestamp``.
        artifacts: logged artifacts: ``name``, ``type``, ``aliases``, ``metadata`` and ``files``
            (``{name in artifact: {"digest", "size", "local_path"}}``).
        exit_code: the exit code the run finished with, or None when it did not finish.
    """

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    group: str = ""
    start_time: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def points(self) -> list[tuple[int, dict[str, Any]]]:
        """``(trainer/global_step, values)`` of each history row, W&B's ``_`` keys left out."""
        return [
            (int(row[STEP_METRIC]), {k: v for k, v in row.items() if k != STEP_METRIC and not k.startswith("_")})
            for row in self.history
            if STEP_METRIC in row
        ]


def read_offline_run(path: str | os.PathLike[str]) -> OfflineRun:
    """Read one ``run-<id>.wandb`` file (complete records only, so a live file reads too)."""
    pb = require("wandb.proto.wandb_internal_pb2", sink="wandb", extra="wandb")
    run = OfflineRun(path=Path(path))
    for raw in _iter_record_bytes(run.path):
        record = pb.Record.FromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item if i.value_json})
        elif kind == "run":
            r = record.run
            run.run_id, run.project = r.run_id, r.project
            run.name = r.display_name or run.name
            run.tags = list(r.tags) or run.tags
            run.group = r.run_group or run.group
            if r.HasField("start_time") and not run.start_time:
                run.start_time = r.start_time.seconds + r.start_time.nanos / 1e9
            _apply_config(run.config, r.config)
        elif kind == "config":
            _apply_config(run.config, record.config)
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({
                "name": a.name,
                "type": a.type,
                "aliases": list(a.aliases),
                "metadata": json.loads(a.metadata) if a.metadata else {},
                "files": {e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path}
                          for e in a.manifest.contents},
            })
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def read_offline_runs(directory: str | os.PathLike[str]) -> list[OfflineRun]:
    """Every offline run file under ``directory`` (a save dir, its ``wandb/`` or one run folder), oldest first.

    A resumed run has one ``offline-run-<time>-<id>`` folder per session, all with the same id;
    ``wandb sync`` uploads them into one W&B run.
    """
    root = Path(directory)
    files = sorted({*root.glob("run-*.wandb"), *root.glob("offline-run-*/run-*.wandb"),
                    *root.glob("wandb/offline-run-*/run-*.wandb"), *root.glob(".wandb/offline-run-*/run-*.wandb")})
    runs = [read_offline_run(path) for path in files]
    return sorted(runs, key=lambda r: (r.start_time, str(r.path)))


def read_offline_history(directory: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(trainer/global_step, values)`` of every row of every offline run under ``directory``, in order.

    This is what the sink logged, as W&B holds it: W&B's ``_step``/``_runtime``/``_timestamp``
    are left out; ``epoch`` (added as Lightning adds it) is kept.
    """
    return [point for run in read_offline_runs(directory) for point in run.points()]
