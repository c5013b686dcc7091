"""The ``mlflow`` sink: a run's metrics, hyperparameters, tags, status and checkpoints in an MLflow tracking store."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlparse

from expbus.bus import (
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    SinkContext,
    TransientSinkError,
    redact_text,
)

from ._flatten import flatten_params
from ._mlflow_sql import SqliteMetricWriter
from ._optional import require
from ._state import load_state, save_state

__all__ = ["MlflowSink", "sanitize_name"]

log = logging.getLogger("expbus.sinks.mlflow")

# MLflow's per-request limits (``mlflow.utils.validation``); read from the installed MLflow
# at open, these are the values of MLflow 2.x/3.x, used when a constant is missing.
_LIMITS_DEFAULT = {
    "MAX_METRICS_PER_BATCH": 1000,
    "MAX_PARAMS_TAGS_PER_BATCH": 100,
    "MAX_ENTITIES_PER_BATCH": 1000,
    "MAX_BATCH_LOG_REQUEST_SIZE": 1_000_000,
    "MAX_PARAM_VAL_LENGTH": 6000,
    "MAX_TAG_VAL_LENGTH": 8000,
    "MAX_ENTITY_KEY_LENGTH": 250,
}
# Headroom under MAX_BATCH_LOG_REQUEST_SIZE for the JSON framing our size estimate ignores.
_REQUEST_SIZE_MARGIN = 0.9

# Against an HTTP server, the client's own retries are set low so that the bus's retries
# (with backoff, counted in the sink's health) govern, and one request can never outlast
# the bus's ``write_timeout`` (60 s by default): requests' timeout applies to the connect
# and to each read, so a request waits at most about twice this long.
HTTP_REQUEST_MAX_RETRIES = "0"
HTTP_REQUEST_TIMEOUT = "20"

# MLflow run statuses of the bus's RunFinished statuses.
_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

# Characters MLflow accepts in a metric, param or tag name on every platform: word
# characters, ``.``, ``/``, ``-`` and space (a POSIX server also takes ``:``, Windows not).
_DISALLOWED = re.compile(r"[^\w./\- ]")

# Lightning's ``MLFlowLogger.LOGGER_JOIN_CHAR``: ``prefix-name``.
_PREFIX_JOIN = "-"


def sanitize_name(name: str, max_length: int = 250) -> str:
    """The name MLflow stores for a metric (or param) called ``name``: the sink's renaming rule.

    1. every character other than a word character (letters, digits, ``_``, Unicode
       letters included), ``.``, ``/``, ``-`` and space becomes ``_`` (``val@loss`` ->
       ``val_loss``, ``a:b`` -> ``a_b``);
    2. the name is cut to ``max_length`` characters (MLflow's key limit, 250);
    3. MLflow treats names as paths and rejects one that a path normalisation would change,
       so empty path segments are dropped (``/a//b/`` -> ``a/b``) and ``.``/``..``
       segments become ``_``/``__``;
    4. an empty result is ``_``.
    """
    cleaned = _DISALLOWED.sub("_", name)[:max_length]
    parts = [part if part not in (".", "..") else "_" * len(part) for part in cleaned.split("/") if part]
    return "/".join(parts) or "_"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# MLflow error codes (databricks_pb2) a later attempt may not get.
_TRANSIENT_CODES = frozenset({
    "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED",
})
# Exception class names of the HTTP stack (requests / urllib3) that mean "the server could
# not be reached or did not answer in time", matched by name so no import is needed.
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ChunkedEncodingError", "RetryError",
    "MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeoutError", "ConnectTimeoutError",
    "RemoteDisconnected", "IncompleteRead",
})


def is_transient_error(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed when retried.

    True when anything in the exception's cause/context chain is a connection failure or a
    timeout (``ConnectionRefusedError`` under MLflow's ``API request ... failed``), an MLflow
    error code such as ``TEMPORARILY_UNAVAILABLE``, an HTTP 429/502/503/504 answer, or a busy
    SQLite database (``database is locked``).
    """
    for item in _exception_chain(exc):
        if isinstance(item, (ConnectionError, TimeoutError, TransientSinkError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(item).__mro__ if cls.__module__ != "builtins"):
            return True
        if getattr(item, "error_code", None) in _TRANSIENT_CODES:
            return True
        status = getattr(item, "get_http_status_code", None)
        if callable(status):
            try:
                if status() in (429, 502, 503, 504):
                    return True
            except Exception:  # a classifier must never raise
                pass
        if type(item).__name__ == "OperationalError" and ("locked" in str(item) or "busy" in str(item)):
            return True
    return False


class _Op:
    """One backend call of a planned batch; ``done`` runs after it succeeded."""

    __slots__ = ("call", "describe", "done")

    def __init__(self, call: Callable[[], None], describe: str, done: Callable[[], None] | None = None) -> None:
        self.call = call
        self.describe = describe
        self.done = done


class MlflowSink:
    """Logs a run to MLflow (a tracking server, a database or a file store), as Lightning's ``MLFlowLogger`` does.

    **Run.** At open, the sink finds or creates the experiment ``experiment_name`` and
    creates a run named ``run_name`` (tags: ``tags``, MLflow's context tags such as
    ``mlflow.user`` and ``mlflow.source.name``, ``mlflow.runName`` and ``expbus.run_id``).
    The MLflow run id is kept in the run directory (``.expbus/sinks/<sink id>.json``), so a
    resumed run (same run directory, same tracking URI) continues the same MLflow run and
    sets it back to ``RUNNING``; an explicit ``run_id`` wins over that. If the server
    cannot be reached at open, the run is set up at the first write instead (which fails
    as transient, and is retried by the bus, until the server answers).

    **Where.** The tracking URI is the first of: ``tracking_uri``; the
    ``MLFLOW_TRACKING_URI`` environment variable; ``save_dir`` (a SQLite database
    ``<save_dir>/mlflow.db``, relative to the run directory); otherwise
    ``sqlite:///<exp_dir>/mlflow.db``, one database for every experiment under ``exp_dir``
    (the run directory being ``exp_dir/<name>/<version>``; with a verbatim ``run_dir``, set
    ``tracking_uri``). Unlike Lightning, ``save_dir`` is not a ``file:`` store, because
    MLflow 3 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; a
    ``tracking_uri: file:/path`` still selects one (with that variable set). With a SQLite
    database, artifacts of a new experiment go to ``mlartifacts/`` beside the database
    unless ``artifact_location`` says otherwise (MLflow's own default is ``./mlruns`` in the
    current directory).

    **Metrics.** Every ``Metrics`` event's values are logged at its step, with the event's
    time as the MLflow timestamp, plus ``epoch`` when the event has one (Lightning adds it
    to every ``log_metrics`` call). Names get ``prefix`` as ``<prefix>-<name>`` (Lightning's
    join), then the renaming rule of :func:`sanitize_name` (characters MLflow rejects
    become ``_``; Lightning deletes them instead), with a log warning once per renamed
    name. NaN is stored and read back as NaN. MLflow's database stores cannot hold
    infinities: ``+inf``/``-inf`` are stored, and read back, as ``±1.7976931348623157e308``
    (the largest float), by the SQLite store and by a server over one alike (a ``file:``
    store keeps them).

    **Hyperparameters.** ``Hyperparams`` are flattened as Lightning flattens them
    (``{"optim": {"lr": 0.1}}`` -> param ``optim/lr``), values logged as ``str(value)``;
    a value longer than MLflow's limit (6000 characters in MLflow 3) is cut to it, with a
    log warning (Lightning cuts at 250). MLflow params cannot change: a param already
    logged with another value keeps its first value, with a log warning.

    **Batching.** Everything of one bus batch is sent with as few ``log_batch`` requests
    as MLflow's per-request limits allow (1000 metrics, 100 params, 100 tags, 1000
    entities, 1 MB; read from ``mlflow.utils.validation``): 2500 metric values take 3
    requests. The bus retries a batch that failed with a transient error (server
    unreachable, timeout, HTTP 429/5xx, a locked SQLite database), by default up to 20
    times over about 4 to 7.5 minutes (``default_policy``); the retry resumes
    with the first request that did not succeed, so requests that did are not sent again.
    Points sent twice anyway (a request that timed out after the server stored it, a
    journal replayed into a resumed run) are not duplicated by MLflow's database stores:
    they keep one point per (name, step, timestamp, value), and the timestamp is the
    event's own time (a ``file:`` store appends them again).

    **SQLite.** With a ``sqlite:///`` tracking URI the MLflow client does the database work
    in the logging process, and its ``log_batch`` costs about 130 µs of CPU per metric
    point (one ORM object each). The sink writes metric points itself instead, into
    MLflow's own ``metrics`` and ``latest_metrics`` tables with one ``executemany`` per
    request (about 10 µs a point), storing exactly what ``log_batch`` stores (see
    ``expbus.sinks._mlflow_sql``); runs, params, tags, status and artifacts still go
    through the client. ``sqlite_bulk_metrics: false`` turns this off; it is off by itself
    for any other store, or an MLflow whose metric tables have other columns.

    **Checkpoints.** With ``log_model: all``, every ``CheckpointSaved`` file is uploaded as
    it arrives (in the sink's worker, never in the training step). With ``log_model: true``,
    the checkpoints that still exist at the end of the run (the top-k, best and last that
    ``ModelCheckpoint`` kept; removed ones are forgotten) are uploaded when ``RunFinished``
    arrives (or at close without one), as Lightning does at ``finalize``. As in Lightning,
    a checkpoint ``<dir>/<stem>.ckpt`` goes to artifact folder ``<stem>/`` with a
    ``metadata.yaml`` (score, original file name, monitor, step, epoch) and ``aliases.txt``
    (``['latest', 'best']`` for the best, else ``['latest']``); a file already uploaded
    and not modified since is not uploaded again. With large checkpoints over HTTP, raise
    the sink's ``write_timeout``.

    **End.** ``RunFinished`` sets the run's status (``completed`` -> ``FINISHED``,
    ``failed`` -> ``FAILED``, ``interrupted`` -> ``KILLED``) and end time, and its error text
    as tag ``expbus.error``. A sink closed without one leaves the run ``RUNNING``, as
    MLflow shows a run that crashed.

    ``Text``, ``Timing`` and ``RunStarted`` events are not logged.

    **Environment.** The sink sets ``MLFLOW_DISABLE_TELEMETRY=true`` before importing
    MLflow. For an ``http(s)`` tracking URI it sets, unless already set,
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=20`` (these are
    process-wide: they apply to other MLflow clients of the process too), so that the bus
    retries with backoff rather than MLflow's internal retries (7 tries with exponential
    backoff by default) stalling the sink for minutes.

    Args:
        experiment_name: MLflow experiment; default: the experiment name, i.e. the name of
            the run directory's parent (``exp_dir/<name>/<version>``), as NeMo passes
            ``${name}``.
        run_name: MLflow run name; default: the run directory's name (the version).
        tracking_uri: tracking server or store: ``http(s)://host:port``,
            ``sqlite:////abs/path/mlflow.db`` (or any SQLAlchemy URI), ``file:/abs/path``;
            default: see **Where** above.
        tags: tags of a new run (values are turned into strings); set again on a resumed run.
        save_dir: directory of a SQLite database ``mlflow.db`` (and ``mlartifacts/``) when
            no ``tracking_uri`` is given; relative paths are inside the run directory.
        log_model: ``false`` (default), ``true`` (the kept checkpoints at the end) or
            ``"all"`` (every checkpoint when saved).
        prefix: put before every metric name, joined with ``-``.
        artifact_location: artifact location of an experiment the sink creates (a path
            or URI); default: the store's choice (see **Where**).
        run_id: an existing MLflow run to log into (a resumed run), overriding the one kept
            in the run directory.
        synchronous: accepted for compatibility with Lightning's ``MLFlowLogger``; ignored
            (the sink always logs from its own worker, never blocking training).
        sqlite_bulk_metrics: write metric points straight into a SQLite store's tables
            (see **SQLite** above); ``false`` sends them with ``log_batch``.
        **kwargs: passed to ``mlflow.MlflowClient`` (``registry_uri``, ...).
    """

    #: ``write`` returns once MLflow's store has the batch, so the bus may advance this
    #: sink's delivery cursor as soon as a batch is acknowledged (see ``expbus.bus.Bus``).
    durable_writes = True

    #: The bus policy of this sink where its YAML block does not say otherwise: a tracking
    #: server that restarts, or a network that drops, for a few minutes must not cost a batch.
    #: With the bus's backoff (0.5 s doubling, capped at ``retry_backoff_max`` 30 s, jitter
    #: 0.5-1x), 20 retries wait about 4 to 7.5 minutes before a batch fails for good (each
    #: attempt itself fails fast: see **Environment**); training never waits meanwhile.
    default_policy: ClassVar[Mapping[str, Any]] = {"max_retries": 20}

    def __init__(
        self,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | None = None,
        log_model: bool | Literal["all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
        sqlite_bulk_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        if log_model not in (True, False, "all"):
            raise ValueError(f"log_model must be true, false or 'all', got {log_model!r}")
        for label, value in (("experiment_name", experiment_name), ("run_name", run_name),
                             ("tracking_uri", tracking_uri), ("run_id", run_id)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{label} must be a non-empty string or null, got {value!r}")
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.tags: dict[str, Any] = dict(tags or {})
        self.save_dir = save_dir
        self.log_model = log_model
        self.prefix = prefix
        self.artifact_location = artifact_location
        self.run_id = run_id
        self.synchronous = synchronous
        self.sqlite_bulk_metrics = sqlite_bulk_metrics
        self.client_kwargs = kwargs
        # Set at open / first write.
        self.resolved_uri: str | None = None
        self.experiment_id: str | None = None
        self._context: SinkContext | None = None
        self._client: Any = None
        self._sqlite_metrics: SqliteMetricWriter | None = None
        self._mlflow: dict[str, Any] = {}
        self._limits = dict(_LIMITS_DEFAULT)
        self._run_ready = False
        self._finished = False
        self._names: dict[str, str] = {}
        self._params: dict[str, str] = {}  # params the run holds (key -> value)
        self._checkpoints: dict[str, CheckpointSaved] = {}  # kept checkpoints, for log_model=True
        self._uploaded: dict[str, float] = {}  # checkpoint path -> mtime when uploaded
        self._retry: tuple[Sequence[Event], list[_Op]] | None = None

    # -- lifecycle --------------------------------------------------------------------
    def open(self, context: SinkContext) -> None:
        """Import MLflow, resolve the tracking URI and set up the run (deferred if the server is unreachable)."""
        self._context = context
        # Set before MLflow is imported (and read again at every event): no telemetry.
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        self.resolved_uri = self._resolve_uri(context)
        if urlparse(self.resolved_uri).scheme in ("http", "https"):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_REQUEST_MAX_RETRIES)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_REQUEST_TIMEOUT)
        require("mlflow", sink="mlflow", extra="mlflow")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._mlflow = {"Metric": Metric, "Param": Param, "RunTag": RunTag}
        try:
            from mlflow.utils import validation
        except ImportError:  # pragma: no cover - every MLflow since 1.x has it
            validation = None  # type: ignore[assignment]
        for name in self._limits:
            value = getattr(validation, name, None)
            if isinstance(value, int) and value > 0:
                self._limits[name] = value
        sqlite_path = _sqlite_path(self.resolved_uri)
        if sqlite_path is not None:
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MlflowClient(self.resolved_uri, **self.client_kwargs)
        except TypeError as exc:
            raise ValueError(f"mlflow sink: an option is not MlflowClient's: {exc}") from exc
        self._sqlite_metrics = SqliteMetricWriter.for_client(self._client) if self.sqlite_bulk_metrics else None
        try:
            self._ensure_run()
        except TransientSinkError as exc:
            log.warning("mlflow sink %r: %s is not reachable (%s); the run is set up at the first write",
                        context.sink_id, self.resolved_uri, exc.__cause__ or exc)

    def write(self, batch: Sequence[Event]) -> None:
        """Log a batch: its metrics, params and tags in as few requests as MLflow allows, then checkpoints and status.

        Raises:
            TransientSinkError: the backend could not be reached (the bus retries the batch;
                the retry resumes at the first request that did not succeed).
        """
        assert self._client is not None, "MlflowSink.write before open"
        self._ensure_run()
        if self._retry is None or self._retry[0] is not batch:
            self._retry = (batch, self._plan(batch))
        self._execute(self._retry[1])
        self._retry = None

    def flush(self) -> None:
        """Nothing to do: every ``write`` has reached MLflow when it returns."""

    def close(self) -> None:
        """Upload the kept checkpoints (``log_model: true``) if no ``RunFinished`` came; release the client."""
        if self._client is None:
            return
        try:
            if self.log_model is True and not self._finished and self._run_ready and self._checkpoints:
                self._execute(self._checkpoint_ops(list(self._checkpoints.values())))
        finally:
            self._client = None
            self._sqlite_metrics = None
            self._retry = None

    # -- setting up the run -----------------------------------------------------------
    def _resolve_uri(self, context: SinkContext) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.save_dir:
            directory = context.resolve(self.save_dir).absolute()
        else:
            directory = context.run_dir.absolute().parent.parent
        return f"sqlite:///{directory / 'mlflow.db'}"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A client call whose transient failures become ``TransientSinkError``."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if is_transient_error(exc):
                raise TransientSinkError(f"mlflow {what} at {self.resolved_uri} failed: {exc}") from exc
            raise

    def _ensure_run(self) -> None:
        if self._run_ready:
            return
        context = self._context
        assert context is not None and self._client is not None
        client = self._client
        state = load_state(context)
        run = None
        if self.run_id:
            run = self._call("get_run", client.get_run, self.run_id)
            if run.info.lifecycle_stage == "deleted":
                raise ValueError(f"mlflow sink: run_id {self.run_id!r} is a deleted run; restore it or drop run_id")
        elif state.get("run_id") and state.get("tracking_uri") == self.resolved_uri:
            run = self._find_run(state["run_id"])
        if run is None:
            run = self._create_run(context)
        else:
            self._resume(run)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        save_state(context, {"run_id": self.run_id, "experiment_id": self.experiment_id,
                             "tracking_uri": self.resolved_uri})
        self._run_ready = True

    def _find_run(self, run_id: str) -> Any:
        try:
            run = self._call("get_run", self._client.get_run, run_id)
        except TransientSinkError:
            raise
        except Exception as exc:
            log.warning("mlflow sink: the run %s kept in the run directory is not in %s (%s); starting a new run",
                        run_id, self.resolved_uri, exc)
            return None
        if run.info.lifecycle_stage == "deleted":
            log.warning("mlflow sink: the run %s kept in the run directory was deleted; starting a new run", run_id)
            return None
        return run

    def _resume(self, run: Any) -> None:
        client = self._client
        run_id = run.info.run_id
        self._params = dict(run.data.params)
        if run.info.status != "RUNNING":
            self._call("update_run", client.update_run, run_id, status="RUNNING")
        if self.tags:
            tags = [self._mlflow["RunTag"](k, self._tag_value(v)) for k, v in self.tags.items()]
            for start in range(0, len(tags), self._limits["MAX_PARAMS_TAGS_PER_BATCH"]):
                chunk = tags[start : start + self._limits["MAX_PARAMS_TAGS_PER_BATCH"]]
                self._call("log_batch", client.log_batch, run_id, tags=chunk)

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        client = self._client
        experiment = self._call("get_experiment_by_name", client.get_experiment_by_name, name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(f"mlflow sink: experiment {name!r} is deleted in {self.resolved_uri}; restore it "
                                 f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                                 "or choose another experiment_name")
            return str(experiment.experiment_id)
        log.info("mlflow sink: creating experiment %r in %s", name, redact_text(self.resolved_uri))
        try:
            return str(self._call("create_experiment", client.create_experiment, name,
                                  artifact_location=artifact_location))
        except TransientSinkError:
            raise
        except Exception:
            # Another process (a parallel run) created it in between.
            experiment = self._call("get_experiment_by_name", client.get_experiment_by_name, name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def _create_run(self, context: SinkContext) -> Any:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        name = self.experiment_name or context.run_dir.absolute().parent.name or "default"
        artifact_location = self.artifact_location
        sqlite_path = _sqlite_path(self.resolved_uri or "")
        if artifact_location is None and sqlite_path is not None:
            artifact_location = (sqlite_path.parent / "mlartifacts").as_uri()
        experiment_id = self._experiment_id(name, artifact_location)
        run_name = self.run_name or context.run_dir.absolute().name
        tags = {k: self._tag_value(v) for k, v in self.tags.items()}
        if MLFLOW_RUN_NAME in tags:
            log.warning("mlflow sink: tag %s is replaced by run_name %r", MLFLOW_RUN_NAME, run_name)
        tags[MLFLOW_RUN_NAME] = run_name
        tags.setdefault("expbus.run_id", context.run_id)
        run = self._call("create_run", self._client.create_run, experiment_id, tags=resolve_tags(tags),
                         run_name=run_name)
        self._params = {}
        return run

    def _tag_value(self, value: Any) -> str:
        text = str(value)
        limit = self._limits["MAX_TAG_VAL_LENGTH"]
        if len(text) > limit:
            log.warning("mlflow sink: a tag value of %d characters is cut to MLflow's limit of %d", len(text), limit)
            text = text[:limit]
        return text

    # -- planning a batch -------------------------------------------------------------
    def _metric_name(self, name: str) -> str:
        cached = self._names.get(name)
        if cached is None:
            full = f"{self.prefix}{_PREFIX_JOIN}{name}" if self.prefix else name
            cached = sanitize_name(full, self._limits["MAX_ENTITY_KEY_LENGTH"])
            if cached != full:
                log.warning("mlflow sink: metric %r is logged as %r (MLflow names allow only letters, digits, "
                            "'_', '-', '.', '/' and ' ')", full, cached)
            self._names[name] = cached
        return cached

    def _plan(self, batch: Sequence[Event]) -> list[_Op]:
        Metric, Param = self._mlflow["Metric"], self._mlflow["Param"]
        ops: list[_Op] = []
        metrics: list[Any] = []
        params: dict[str, str] = {}
        tags: dict[str, str] = {}

        def close_run_of_data() -> None:
            if metrics or params or tags:
                ops.extend(self._batch_ops(list(metrics), [Param(k, v) for k, v in params.items()],
                                           [self._mlflow["RunTag"](k, v) for k, v in tags.items()]))
                metrics.clear()
                params.clear()
                tags.clear()

        for event in batch:
            if isinstance(event, Metrics):
                timestamp = max(0, int(event.time * 1000))
                values: dict[str, Any] = dict(event.values)
                if event.epoch is not None:
                    values.setdefault("epoch", event.epoch)
                for name, value in values.items():
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        log.warning("mlflow sink: metric %r has a non-numeric value %r; not logged", name, value)
                        continue
                    metrics.append(Metric(self._metric_name(name), float(value), timestamp, event.step))
            elif isinstance(event, Hyperparams):
                for key, value in self._new_params(event.params, params).items():
                    params[key] = value
            elif isinstance(event, CheckpointSaved):
                self._checkpoints[event.path] = event
                if self.log_model == "all":
                    close_run_of_data()
                    ops.extend(self._checkpoint_ops([event]))
            elif isinstance(event, CheckpointRemoved):
                self._checkpoints.pop(event.path, None)
            elif isinstance(event, RunFinished):
                if event.error:
                    tags["expbus.error"] = self._tag_value(event.error)
                close_run_of_data()
                if self.log_model is True:
                    ops.extend(self._checkpoint_ops(list(self._checkpoints.values())))
                ops.append(self._terminate_op(event))
        close_run_of_data()
        return ops

    def _new_params(self, nested: Mapping[str, Any], pending: Mapping[str, str]) -> dict[str, str]:
        """The flattened params not yet logged; a changed value keeps the first one (MLflow params are immutable)."""
        limit = self._limits["MAX_PARAM_VAL_LENGTH"]
        key_limit = self._limits["MAX_ENTITY_KEY_LENGTH"]
        fresh: dict[str, str] = {}
        for raw_key, raw_value in flatten_params(nested).items():
            key = sanitize_name(raw_key, key_limit)
            value = str(raw_value)
            if len(value) > limit:
                log.warning("mlflow sink: param %r has %d characters; cut to MLflow's limit of %d",
                            key, len(value), limit)
                value = value[:limit]
            known = self._params.get(key, pending.get(key, fresh.get(key)))
            if known is None:
                fresh[key] = value
            elif known != value:
                log.warning("mlflow sink: param %r was logged as %r; MLflow params cannot change, so the new "
                            "value %r is not logged", key, known[:200], value[:200])
        return fresh

    def _batch_ops(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> list[_Op]:
        """``log_batch`` requests within MLflow's per-request limits, as few as possible."""
        limits = self._limits
        max_metrics, max_pt = limits["MAX_METRICS_PER_BATCH"], limits["MAX_PARAMS_TAGS_PER_BATCH"]
        max_entities = limits["MAX_ENTITIES_PER_BATCH"]
        max_bytes = int(limits["MAX_BATCH_LOG_REQUEST_SIZE"] * _REQUEST_SIZE_MARGIN)
        requests: list[tuple[list[Any], list[Any], list[Any]]] = []
        sources = (metrics, params, tags)
        position = [0, 0, 0]
        while any(position[kind] < len(sources[kind]) for kind in range(3)):
            request: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
            size = 0
            # Params and tags first (at most 100 each a request), then as many metrics as
            # the entity, count and size limits leave room for; like MLflow's own client.
            for kind, cap in ((1, max_pt), (2, max_pt), (0, max_metrics)):
                source = sources[kind]
                while position[kind] < len(source) and len(request[kind]) < cap:
                    if sum(len(part) for part in request) >= max_entities:
                        break
                    cost = _json_size(source[position[kind]], kind)
                    if size + cost > max_bytes and any(request):
                        break
                    request[kind].append(source[position[kind]])
                    position[kind] += 1
                    size += cost
            requests.append(request)
        return [self._log_batch_op(m, p, t) for m, p, t in requests]

    def _log_batch_op(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> _Op:
        def call() -> None:
            writer = self._sqlite_metrics
            if writer is None:
                self._call("log_batch", self._client.log_batch, self.run_id, metrics=metrics, params=params, tags=tags)
                return
            # Params and tags first, as log_batch stores them; a retry after the metrics
            # failed sends them again, which MLflow accepts (same values).
            if params or tags:
                self._call("log_batch", self._client.log_batch, self.run_id, params=params, tags=tags)
            self._call("log_batch", writer.log_metrics, self.run_id, metrics)

        def done() -> None:
            # Known to the run from now on: a later Hyperparams with the same value is not resent.
            self._params.update({param.key: param.value for param in params})

        return _Op(call, f"log_batch({len(metrics)} metrics, {len(params)} params, {len(tags)} tags)", done)

    def _checkpoint_ops(self, events: list[CheckpointSaved]) -> list[_Op]:
        return [_Op(functools.partial(self._upload, event), f"upload {event.path}") for event in events]

    def _terminate_op(self, event: RunFinished) -> _Op:
        status = _STATUS.get(event.status, "FINISHED")

        def terminate() -> None:
            self._call("set_terminated", self._client.set_terminated, self.run_id, status,
                       end_time=max(0, int(event.time * 1000)))

        def done() -> None:
            self._finished = True

        return _Op(terminate, f"set_terminated({status})", done)

    # -- executing --------------------------------------------------------------------
    def _execute(self, ops: list[_Op]) -> None:
        """Run the ops in order, removing each that succeeded; a transient failure stops (the retry resumes there)."""
        first_error: Exception | None = None
        while ops:
            op = ops[0]
            try:
                op.call()
            except TransientSinkError:
                raise
            except Exception as exc:
                # Not retryable: skip this call, still deliver the rest of the batch
                # (a later status or checkpoint), then report the first failure.
                ops.pop(0)
                if first_error is None:
                    first_error = exc
                else:
                    log.warning("mlflow sink: %s failed: %s", op.describe, exc)
                continue
            ops.pop(0)
            if op.done is not None:
                op.done()
        if first_error is not None:
            raise first_error

    def _upload(self, event: CheckpointSaved) -> None:
        path = event.path[len("file://"):] if event.path.startswith("file://") else event.path
        if "://" in path:
            log.warning("mlflow sink: checkpoint %s is not a local file; not uploaded", event.path)
            return
        local = Path(path)
        try:
            mtime = local.stat().st_mtime
        except OSError:
            log.warning("mlflow sink: checkpoint %s no longer exists; not uploaded", path)
            return
        if self._uploaded.get(path) == mtime:
            return
        client = self._client
        artifact_path = local.stem
        if local.is_dir():
            self._call("log_artifacts", client.log_artifacts, self.run_id, str(local), f"{artifact_path}/{local.name}")
        else:
            self._call("log_artifact", client.log_artifact, self.run_id, str(local), artifact_path)
        metadata = {
            "score": event.monitor_value,
            "original_filename": local.name,
            "Checkpoint": {"monitor": event.monitor},
            "step": event.step,
            "epoch": event.epoch,
        }
        aliases = ["latest", "best"] if event.is_best else ["latest"]
        import yaml

        with tempfile.TemporaryDirectory(prefix="expbus-mlflow-") as tmp:
            with open(os.path.join(tmp, "metadata.yaml"), "w", encoding="utf-8") as handle:
                yaml.safe_dump(metadata, handle, default_flow_style=False)
            with open(os.path.join(tmp, "aliases.txt"), "w", encoding="utf-8") as handle:
                handle.write(str(aliases))
            self._call("log_artifacts", client.log_artifacts, self.run_id, tmp, artifact_path)
        self._uploaded[path] = mtime


def _json_size(item: Any, kind: int) -> int:
    """An upper estimate of one entity's bytes in a ``log_batch`` request body."""
    if kind == 0:
        return len(json.dumps(item.key)) + 96
    return len(json.dumps(item.key)) + len(json.dumps(item.value)) + 32


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path)
