"""The ``clearml`` sink: a run's scalars, hyperparameters and checkpoints in a ClearML task (offline or on a server)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from expbus.bus import CheckpointSaved, Event, Hyperparams, Metrics, RunFinished, SinkContext, Text, Timing

from ._optional import require
from ._scoped import run_bounded, scoped_environ
from ._state import load_state, save_state

__all__ = ["ClearMLSink", "OfflineSession", "read_offline_sessions", "split_title_series"]

log = logging.getLogger("expbus.sinks.clearml")

# Every key of ``Task.init(auto_connect_frameworks=...)``: a key missing from the dict means
# "patch it", so each one is named. ``detect_repository`` would start a thread that runs git
# and scans the script's imports (and phones ClearML's update server).
_FRAMEWORKS = (
    "matplotlib", "tensorflow", "tensorboard", "pytorch", "xgboost", "scikit", "fastai", "lightgbm",
    "hydra", "detect_repository", "tfdefines", "joblib", "megengine", "catboost", "gradio",
)

# Environment variables are process-wide: sinks opening in parallel take turns.


def split_title_series(name: str) -> tuple[str, str]:
    """ClearML's (title, series) of a metric name, as ClearML's own TensorBoard binding splits a tag.

    The series is the part after the last ``/`` and the title the parts before it, joined
    with ``_``; a name without ``/`` is both title and series::

        train/loss      -> ("train", "loss")
        val/ds1/loss    -> ("val_ds1", "loss")
        train_loss      -> ("train_loss", "train_loss")

    This is what a NeMo user saw when ClearML picked the same names up from TensorBoard.
    """
    parts = name.split("/")
    if len(parts) == 1:
        return name, name
    return "_".join(parts[:-1]) or name, parts[-1] or name


class ClearMLSink:
    """Reports metrics as ClearML scalars, hyperparameters as the task's ``hparams`` section and checkpoints as its
    output model, in one ClearML task per run (an offline session unless a server is configured).

    Mapping: every ``Metrics`` value (plus ``epoch`` when the event has one, as Lightning adds
    it) and every ``Timing`` duration is ``Logger.report_scalar(title, series, value,
    iteration=step)`` with ``(title, series)`` from :func:`split_title_series`. NaN and
    infinities are not reported (ClearML would store them as 0.0); the first one is logged.
    ``Hyperparams`` are merged (top-level keys, later events win) and connected with
    ``task.connect(params, name="hparams")`` (ClearML flattens nested keys with ``/``).
    ``Text`` goes to the task's console log. A ``CheckpointSaved`` with ``log_model`` updates the
    weights of the task's ``OutputModel`` (framework ``NeMo``; one upload per step: the
    ``-last`` copy saved at the same step as a top-k checkpoint is not uploaded twice).
    ``RunFinished`` sets the task's status when the sink closes: completed, failed (with the
    error) or stopped. ClearML's offline mode keeps no status.

    The task is opened with ClearML's side effects off: no framework patching unless
    ``connect_pytorch`` (so TensorBoard scalars are not reported twice), no repository
    detection (nor its update check), no argparse capture, no resource-monitor thread, no
    stdout/stderr capture, no re-seeding of the process's random generators, and ClearML's
    reporter runs in threads of this process instead of a forked subprocess (the
    ``sdk.development.report_use_subprocess: false`` setting; a fork of a training process is
    slow and unsafe; the global ``random``/numpy states are given back as they were). The
    ``Task.init`` ones can be turned back on through ``**kwargs``. ClearML itself still records
    its last task in ``~/.clearml/.session.json`` and patches ``os.fork`` while the task is open.
    If the process already has a ClearML task (the user called ``Task.init``), the sink reports
    into it and leaves closing it to its owner. ClearML allows one such task per process, so one
    ``clearml`` sink per run.

    Offline or online: ``offline: null`` (the default) means offline unless a ClearML server is
    configured (``CLEARML_API_HOST`` or a ``clearml.conf``) and ``CLEARML_OFFLINE_MODE`` is not
    set; an unconfigured client never falls back to a public server. Offline, the session is a
    folder ``<cache_dir>/offline/<task id>`` plus a zip of it written at close; upload it later
    with ``Task.import_offline_session("<...>.zip")``. Offline, checkpoints are copied into the
    session; online, ClearML uploads them in the background to the task's ``output_uri`` (NeMo's
    ``output_uri=True``: the files server), so a checkpoint pruned before its upload finished is lost.

    Resume: the task id is kept in the run directory; a resumed run (same run directory, same
    mode) continues that task with ``Task.init(reuse_last_task_id=<id>, continue_last_task=0)``:
    on a server the same task, offline the same session folder (its ``metrics.jsonl`` grows and
    the zip is rewritten). Steps are reported as they are, with no iteration offset.

    Args:
        project: ClearML project (NeMo's ``ClearMLParams.project``); default ``CLEARML_PROJECT``,
            else ``"NeMo"``.
        task: task name; default ``CLEARML_TASK``, else ``"Trainer <experiment name>"`` (the run
            directory's parent folder, NeMo's ``exp_dir/<name>/<version>`` layout), as NeMo names it.
        connect_pytorch: let ClearML patch ``torch.save``/``torch.load`` to register model files
            (NeMo's option; every other framework binding stays off).
        model_name: name of the output model; default the experiment name, else the task name.
        tags: task (and model) tags, after ``"NeMo"`` as NeMo adds it.
        log_model: upload checkpoints as the task's output model weights.
        log_cfg: with ``log_model``, store the hyperparameters as the model's configuration
            (NeMo's ``update_design``; offline, only those known when the first checkpoint is uploaded).
        log_metrics: with ``log_model``, attach the latest metrics to the model's metadata at
            each upload (NeMo's ``set_all_metadata``; a server feature, skipped offline).
        offline: ``true``/``false`` forces ClearML's offline mode on/off; ``null`` decides as above.
        cache_dir: ClearML's cache directory while the task opens, which holds offline sessions;
            relative paths are inside the run directory; ``null`` keeps ClearML's own
            (``CLEARML_CACHE_DIR``, else ``sdk.storage.cache.default_base_dir``).
        close_timeout: seconds ``close`` waits for ClearML to flush and close the task; past it
            ClearML finishes in a background thread and the sink reports a failed close.
        **kwargs: passed to ``Task.init`` (``task_type``, ``output_uri``, ``auto_connect_streams``,
            ``reuse_last_task_id``, ...), overriding the sink's choices.
    """

    def __init__(
        self,
        project: str | None = None,
        task: str | None = None,
        connect_pytorch: bool = False,
        model_name: str | None = None,
        tags: list[str] | None = None,
        log_model: bool = False,
        log_cfg: bool = False,
        log_metrics: bool = False,
        offline: bool | None = None,
        cache_dir: str | None = "clearml",
        close_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if close_timeout <= 0:
            raise ValueError(f"close_timeout must be > 0 seconds, got {close_timeout}")
        if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) for t in tags)):
            raise ValueError(f"tags must be a list of strings, got {tags!r}")
        self.project = project
        self.task = task
        self.connect_pytorch = connect_pytorch
        self.model_name = model_name
        self.tags = list(tags) if tags else []
        self.log_model = log_model
        self.log_cfg = log_cfg
        self.log_metrics = log_metrics
        self.offline = offline
        self.cache_dir = cache_dir
        self.close_timeout = close_timeout
        self.init_kwargs = kwargs
        # Filled by open():
        self.task_id: str | None = None
        self.offline_folder: Path | None = None
        self.is_offline = False
        self.continued = False
        self.nonfinite_skipped = 0
        self._task: Any = None
        self._logger: Any = None
        self._model: Any = None
        self._owns_task = True
        self._experiment = "default"
        self._hparams: dict[str, Any] = {}
        self._last_metrics: dict[str, float] = {}
        self._uploaded_step: int | None = None
        self._finished: RunFinished | None = None
        self._saved_globals: dict[str, Any] = {}
        self._warned: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------
    def open(self, context: SinkContext) -> None:
        """Open (or continue) the run's ClearML task."""
        os.environ.setdefault("CLEARML_NO_DEFAULT_SERVER", "1")  # never the public demo server
        clearml = require("clearml", sink="clearml", extra="clearml")
        Task = clearml.Task
        self._experiment = context.run_dir.parent.name or "default"
        project = self.project or os.environ.get("CLEARML_PROJECT") or "NeMo"
        task_name = self.task or os.environ.get("CLEARML_TASK") or f"Trainer {self._experiment}"

        # Not Task.current_task(): in a child of a process with a ClearML task it would call
        # Task.init with every default (framework patching included).
        existing = getattr(Task, "_Task__main_task", None)
        if existing is not None:
            # ClearML has one main task per process; the user's own Task.init owns it.
            log.info("clearml sink %r: the process already has ClearML task %s; reporting into it",
                     context.sink_id, existing.id)
            self._task, self._owns_task = existing, False
            self.is_offline = bool(Task.is_offline())
        else:
            self._task = self._init_task(Task, context, project, task_name)
        self._logger = self._task.get_logger()
        self.task_id = str(self._task.id)
        if self.is_offline:
            folder = self._task.get_offline_mode_folder()
            self.offline_folder = Path(folder) if folder else None
        save_state(context, {
            "task_id": self.task_id,
            "offline": self.is_offline,
            "offline_folder": str(self.offline_folder) if self.offline_folder else None,
            "project": project,
            "task": task_name,
        })

    def _init_task(self, Task: Any, context: SinkContext, project: str, task_name: str) -> Any:
        offline = self._resolve_offline()
        self.is_offline = offline
        frameworks: dict[str, Any] = {name: False for name in _FRAMEWORKS}
        frameworks["pytorch"] = bool(self.connect_pytorch)
        kwargs: dict[str, Any] = {
            "project_name": project,
            "task_name": task_name,
            "tags": ["NeMo", *self.tags],
            "auto_connect_frameworks": frameworks,
            "auto_connect_arg_parser": False,
            "auto_resource_monitoring": False,
            "auto_connect_streams": False,
            # Every run is a task of its own; a resume continues its task by id (below).
            "reuse_last_task_id": False,
        }
        if not offline:
            kwargs["output_uri"] = True  # NeMo's: model weights go to the files server
        cache_dir = str(context.resolve(self.cache_dir)) if self.cache_dir and offline else None
        earlier_models: list[Any] = []
        state = load_state(context)
        previous = state.get("task_id")
        user_chose = "reuse_last_task_id" in self.init_kwargs or "continue_last_task" in self.init_kwargs
        if previous and not user_chose:
            folder = state.get("offline_folder")
            if bool(state.get("offline")) != offline:
                log.warning("clearml sink %r: task %s was %s; this run is %s, so it starts a new task",
                            context.sink_id, previous, _mode(bool(state.get("offline"))), _mode(offline))
            elif offline and not (folder and Path(folder).is_dir()):
                log.warning("clearml sink %r: the offline session of task %s (%s) is gone; starting a new task",
                            context.sink_id, previous, folder)
            else:
                # continue_last_task=0: continue without ClearML's "last iteration + 1" offset,
                # since steps are reported as they are.
                kwargs.update(reuse_last_task_id=previous, continue_last_task=0)
                self.continued = True
                if offline and folder:
                    earlier_models = _offline_output_models(Path(folder))
        kwargs.update(self.init_kwargs)

        self._saved_globals = {
            "_report_subprocess_enabled": Task.__dict__.get("_report_subprocess_enabled", _MISSING),
        }
        # A fork of the training process for ClearML's reporter: slow, and unsafe with CUDA/threads.
        Task._report_subprocess_enabled = False
        previous_seed = getattr(Task, "_random_seed", None)
        env = {"CLEARML_CACHE_DIR": cache_dir} if cache_dir else {}
        try:
            with scoped_environ(env), _random_state_kept():
                Task.set_offline(offline_mode=offline)
                # Task.init re-seeds random/numpy/torch with its seed; a logging sink must not.
                Task.set_random_seed(None)
                try:
                    task = Task.init(**kwargs)
                finally:
                    Task.set_random_seed(previous_seed)
                # The offline folder is resolved (and cached on the task) while CLEARML_CACHE_DIR is ours.
                if offline:
                    task.get_offline_mode_folder()
        except BaseException:
            self._restore_globals()  # close() is not called for a sink that failed to open
            raise
        models = getattr(task, "_offline_output_models", None)
        if earlier_models and isinstance(models, list):
            # A continued offline task reloads task.json but starts its list of output models
            # empty, and rewrites task.json with it: the earlier sessions' models would be lost
            # to Task.import_offline_session. Put them back, first.
            models[:0] = [m for m in earlier_models if m not in models]
        return task

    def _resolve_offline(self) -> bool:
        if self.offline is not None:
            return bool(self.offline)
        from clearml.backend_api.session.defs import ENV_HOST, ENV_OFFLINE_MODE
        from clearml.backend_config.defs import get_active_config_file

        if ENV_OFFLINE_MODE.get(default=False):
            return True
        configured = bool(ENV_HOST.get(default=None)) or bool(get_active_config_file())
        if not configured:
            log.info("clearml sink: no ClearML server configured (CLEARML_API_HOST or clearml.conf); "
                     "recording an offline session")
        return not configured

    def write(self, batch: Sequence[Event]) -> None:
        """Report the batch's scalars, hyperparameters, text and checkpoints."""
        assert self._task is not None, "ClearMLSink.write before open"
        for event in batch:
            if isinstance(event, Metrics):
                values: dict[str, float] = dict(event.values)
                if event.epoch is not None:
                    # Lightning's logger connector adds the epoch to every log_metrics call.
                    values.setdefault("epoch", float(event.epoch))
                self._report(values, event.step)
                self._last_metrics.update(values)
            elif isinstance(event, Timing):
                self._report(event.durations, event.step)
            elif isinstance(event, Hyperparams):
                self._hparams.update(event.params)
                # ClearML keeps (and may wrap) what it is given: hand it a copy.
                self._task.connect(copy.deepcopy(self._hparams), name="hparams")
                if self._model is not None and self.log_cfg and not self.is_offline:
                    self._model.update_design(config_dict=copy.deepcopy(self._hparams))
            elif isinstance(event, Text):
                self._logger.report_text(f"{event.name} (step {event.step}): {event.text}", print_console=False)
            elif isinstance(event, CheckpointSaved):
                if self.log_model:
                    self._upload(event)
            elif isinstance(event, RunFinished):
                self._finished = event

    def flush(self) -> None:
        """Hand the reported events to ClearML's reporter; offline, wait until they are on disk.

        Online it does not wait: a checkpoint upload in progress could outlast the bus's
        ``write_timeout``. ``close`` waits for everything.
        """
        if self._task is not None:
            self._task.flush(wait_for_uploads=self.is_offline)

    def close(self) -> None:
        """Flush, set the task's final status and close it, within ``close_timeout`` seconds."""
        task, self._task = self._task, None
        if task is None:
            return
        owns, finished = self._owns_task, self._finished

        def finish() -> None:
            task.flush(wait_for_uploads=True)
            if not owns:
                return
            task.close()  # marks the task completed
            if finished is not None and finished.status == "failed":
                task.mark_failed(status_reason="expbus: run failed", status_message=(finished.error or "")[:1024],
                                 force=True)
            elif finished is not None and finished.status == "interrupted":
                # Not Task.mark_stopped: that asks ClearML's watchdog to kill this process.
                task.stopped(force=True, status_reason="expbus: run interrupted")

        try:
            done = run_bounded(finish, self.close_timeout, "expbus-clearml-close")
        finally:
            self._restore_globals()
        if not done:
            raise TimeoutError(f"ClearML did not close task {self.task_id} within {self.close_timeout}s "
                               "(it goes on in the background)")
        if self.nonfinite_skipped:
            log.warning("clearml sink: %d NaN/infinite values were not reported (ClearML stores them as 0.0)",
                        self.nonfinite_skipped)
        if self.is_offline and self.offline_folder is not None and owns:
            log.info("clearml sink: offline session of task %s in %s.zip (upload it with "
                     "Task.import_offline_session)", self.task_id, self.offline_folder)

    # -- helpers ----------------------------------------------------------------------
    def _report(self, values: Mapping[str, float], step: int) -> None:
        report = self._logger.report_scalar
        for name, value in values.items():
            value = float(value)
            if not math.isfinite(value):
                self._skip_nonfinite(name, value, step)
                continue
            title, series = split_title_series(name)
            report(title, series, value, iteration=step)

    def _skip_nonfinite(self, name: str, value: float, step: int) -> None:
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped == 1:
            log.warning("clearml sink: %s=%s at step %d is not reported (ClearML would store it as 0.0); "
                        "further NaN/infinite values are counted", name, value, step)

    def _output_model(self) -> Any:
        if self._model is None:
            from clearml import OutputModel

            # A dict, not NeMo's YAML text: ClearML parses design text as HOCON, which YAML
            # lists are not; from a dict it writes the HOCON itself.
            config = copy.deepcopy(self._hparams) if self.log_cfg and self._hparams else None
            self._model = OutputModel(
                task=self._task,
                name=self.model_name or self._experiment or self._task.name,
                tags=["NeMo", *self.tags],
                framework="NeMo",
                config_dict=config,
            )
        return self._model

    def _upload(self, event: CheckpointSaved) -> None:
        path = Path(event.path)
        if not path.exists():
            log.warning("clearml sink: checkpoint %s is gone; not uploaded", path)
            return
        if event.step == self._uploaded_step:
            return  # the same weights as the checkpoint just uploaded (top-k file and its -last copy)
        if self.is_offline and path.is_dir():
            # ClearML's offline model path takes single files; a directory goes in as an artifact.
            self._task.upload_artifact(f"checkpoint-{path.name}", artifact_object=str(path), wait_on_upload=True)
            self._uploaded_step = event.step
            return
        model = self._output_model()
        options: dict[str, Any] = {"iteration": event.step, "is_package": path.suffix == ".nemo"}
        try:
            model.update_weights(weights_filename=str(path), auto_delete_file=False, **options)
        except AttributeError:
            # clearml 2.1 offline: update_weights fails on its offline model stub
            # ("'DummyModel' object has no attribute 'locked'") before reaching its own offline
            # path, which copies the file into the session; call that path directly.
            offline_update: Callable[..., Any] | None = getattr(model, "_update_weights_offline", None)
            if not self.is_offline or offline_update is None:
                raise
            offline_update(weights_filename=str(path), **options)
        self._uploaded_step = event.step
        if self.log_metrics and self._last_metrics:
            if self.is_offline:
                self._warn_once("metadata", "clearml sink: log_metrics needs a ClearML server "
                                "(offline sessions keep no model metadata); skipped")
            else:
                # NeMo's ClearMLLogger format: {name: {"value": str, "type": str}}.
                model.set_all_metadata({k: {"value": str(v), "type": str(type(v))}
                                        for k, v in self._last_metrics.items()})

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _restore_globals(self) -> None:
        if not self._saved_globals:
            return
        from clearml import Task

        saved = self._saved_globals.pop("_report_subprocess_enabled", _MISSING)
        if saved is _MISSING:
            try:
                del Task._report_subprocess_enabled
            except AttributeError:
                pass
        else:
            Task._report_subprocess_enabled = saved


_MISSING: Any = object()


def _mode(offline: bool) -> str:
    return "offline" if offline else "on a server"


def _offline_output_models(folder: Path) -> list[Any]:
    """The ``offline_output_models`` an offline session's ``task.json`` lists (none if unreadable)."""
    try:
        models = json.loads((folder / "task.json").read_text()).get("offline_output_models")
    except (OSError, ValueError, AttributeError):
        return []
    return list(models) if isinstance(models, list) else []


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Give the global ``random`` (and numpy) generators back as they were: the run's randomness is not ours.

    ``Task.init`` draws from the global ``random`` (ids of its model-file callbacks). The
    training thread waits for the bus to open meanwhile, so nothing else draws in between.
    """
    import random

    saved = random.getstate()
    numpy_random = getattr(sys.modules.get("numpy"), "random", None)
    numpy_saved = numpy_random.get_state() if numpy_random is not None else None
    try:
        yield
    finally:
        random.setstate(saved)
        if numpy_random is not None:
            numpy_random.set_state(numpy_saved)


class OfflineSession:
    """One ClearML offline session zip, read the way ``Task.import_offline_session`` reads it.

    ``task.json`` holds the task, its hyperparameters and ``offline_output_models``;
    ``metrics.jsonl`` holds one JSON list of event requests per line (those of this task's
    id are kept, as ``Metrics.report_offline_session(only_with_id=...)`` does).

    Attributes:
        path: the zip file.
        task: the task dict from ``task.json``.
        events: the metric event requests of this task, in order.
        log: the console log requests.
        files: the model files in the zip (name -> bytes).
    """

    def __init__(self, zip_path: Path) -> None:
        self.path = zip_path
        with zipfile.ZipFile(zip_path) as archive:
            self.names = set(archive.namelist())
            self.task = json.loads(archive.read("task.json"))
            self.events = [request for line in self._lines(archive, "metrics.jsonl")
                           for request in json.loads(line) if request.get("task") == self.task["id"]]
            self.log = [request for line in self._lines(archive, "log.jsonl") for request in json.loads(line)]
            self.files = {name: archive.read(name) for name in self.names if name.startswith("models/")}

    @staticmethod
    def _lines(archive: zipfile.ZipFile, name: str) -> list[str]:
        if name not in archive.namelist():
            return []
        return [line for line in archive.read(name).decode().splitlines() if line.strip()]

    def scalars(self) -> dict[tuple[str, str], list[tuple[int, float]]]:
        """(title, series) -> [(iteration, value), ...] in the order reported."""
        out: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for event in self.events:
            if event["type"] == "training_stats_scalar":
                out[(event["metric"], event["variant"])].append((event["iter"], event["value"]))
        return dict(out)

    def hyperparams(self) -> dict[str, str]:
        """The connected hyperparameters (flattened names -> values as ClearML stores them)."""
        return {name: entry["value"] for name, entry in self.task["hyperparams"].get("hparams", {}).items()}

    def points(self) -> list[tuple[int, dict[str, float]]]:
        """Metric points by step, ``{name: value}`` with names joined back from title/series (no ``epoch``)."""
        by_step: dict[int, dict[str, float]] = defaultdict(dict)
        for (title, series), points in self.scalars().items():
            if (title, series) == ("epoch", "epoch"):
                continue  # Lightning's epoch, added by the sink
            for step, value in points:
                by_step[step][title if title == series else f"{title}/{series}"] = value
        return sorted(by_step.items())


def read_offline_sessions(run_dir: str | os.PathLike[str], cache_dir: str = "clearml") -> list[OfflineSession]:
    """Every offline session the clearml sink wrote under a run directory, oldest first."""
    folder = Path(run_dir) / cache_dir / "offline"
    return [OfflineSession(z) for z in sorted(folder.glob("*.zip"), key=lambda p: p.stat().st_mtime)]
