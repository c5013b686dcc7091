"""``workers: process``: a sink that runs in a child interpreter, fed through a pipe.

Why. A sync sink's ``write`` runs on its own daemon thread of the training process, which
keeps it from ever blocking the training step on I/O, but not from competing for the GIL:
a client that spends its time in Python (MLflow's SQLAlchemy, about 100 µs of GIL per
metric value) steals that time from a Python-bound training step. :class:`ProcessSink` runs
the real sink in a child process instead; what the training process still pays per batch
is one msgpack encode (C, fast) and a pipe write, on the sink's own thread as before.

How. :class:`ProcessSink` implements the ordinary sink protocol (``open``, ``write``,
``flush``, ``close``, all sync), so the bus's sink worker (queue, batching, retries,
deadlines, health) treats it like any sink and needs no change. ``open`` starts::

    [sys.executable, "-m", "expbus.sinks._process_worker", "--priority", "idle" | "normal"]

(``idle``, the default: the child puts itself, before the sink's open and so what the sink
starts too, under Linux's ``SCHED_IDLE``, and every thread of it back under the normal policy
for its close; see ``_process_worker._set_priority``) with ``stdin``/``stdout`` pipes (not
``multiprocessing``: ``fork`` is unsafe once torch has started threads, and ``spawn``
re-imports the user's ``__main__``), sends the sink's spec (its ``type:`` and options as
YAML gives them, the :class:`~expbus.bus.SinkContext`, the parent's ``sys.path``) and waits
for the child to build the sink through the registry and open it. Then each call is one
request frame and one reply frame::

    request: u32 payload length (big-endian), u8 op, payload   (op: O open, W write,
             R retry the last batch, F flush, C close; a W payload is the batch as a
             msgpack array of events)
    reply:   u32 payload length, payload = msgpack Reply {error, logs}

A reply's ``error`` carries the exception's type name, message, traceback text and whether
it is transient (the child asks the sink's ``is_transient`` when it has one, as the bus
would): the adapter raises :class:`~expbus.bus.TransientSinkError` (retried by the bus) or
:class:`ChildSinkError` (a ``RuntimeError`` naming the sink), chained to a
:class:`RemoteTraceback` holding the child's traceback, so the bus's retry/disable logic and
its log line (with the child's traceback) are what they are in process. Log records the
child's sink emits at a level the parent logs travel back with the replies and are
re-emitted under their own logger names. A retry of a failed batch sends only ``R``: the
child calls ``write`` again with the same batch object, as the bus does in process (the
MLflow sink resumes a partly sent batch by identity).

Deadlines. Every call waits for its reply with a deadline (``call_timeout``, a little longer
than the sink's ``write_timeout`` so that the bus's own hang detection fires first); a child
that misses it is killed and the call fails. ``close`` waits at most ``close_timeout`` for
the child's sink to close, then closes the pipe; the child's own exit (interpreter teardown)
is reaped by a daemon thread, which kills it if it outlives the deadline. A child that dies
(a crash, ``SIGKILL``, the OOM killer) fails the call in progress and every later one with
:class:`WorkerDiedError`, naming the sink, the exit code (and signal) and the tail of the
child's stderr; the bus counts and reports it, disables the sink after
``max_consecutive_failures``, and training goes on (no restart: the journal and the sink's
delivery cursor hold what it missed, for a later catch-up or ``expbus replay``). The
child's stderr goes to ``run_dir/.expbus/workers/<sink id>.stderr``.

Signals. The child runs in a session of its own (``start_new_session=True``), so a Ctrl-C
on the terminal or a signal sent to the training job's process group does not reach it;
and it handles (and ignores) ``SIGINT``, ``SIGTERM``, ``SIGHUP``, ``SIGUSR1`` and ``SIGUSR2``,
because a scheduler may signal every process of a job step regardless of groups (SLURM's
``scancel``/preemption does): the training process's preemption handler must still be able
to flush the sink through the child after the signal. (A Python handler, not ``SIG_IGN``:
an ignored disposition would be inherited by programs the sink starts, such as wandb-core.)
The child exits when its stdin closes: after ``close``, or when the training process dies
(``SIGKILL`` included), in which case it first flushes and closes its sink, bounded by
``close_timeout``. ``SIGKILL`` still ends it at once.

Limits. Only a sink built from its spec (``type`` + options, as in YAML) can run in a
process: an object built in Python cannot be sent. Build one with
``ProcessSink.from_spec("mlflow", tracking_uri=...)`` and pass it to ``Bus.add_sink`` (with
its policy). The child writes to the training process's stdout file descriptor (the
``console`` sink's lines still reach the terminal) but not through a replaced
``sys.stdout`` (a notebook's). A sink that keeps what it receives in Python memory
(``memory``, test doubles) is of no use there. Values the journal would turn into text
(an object in hyperparameters) reach the child as that text. POSIX only (pipes are waited
on with ``selectors``; sessions).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from expbus.bus import Event, SinkContext, TransientSinkError, resolve_value

__all__ = [
    "ProcessSink",
    "ChildSinkError",
    "WorkerDiedError",
    "RemoteTraceback",
    "WORKER_MODULE",
    "CALL_TIMEOUT_GRACE",
    "wait_for_workers",
]

log = logging.getLogger("expbus.sinks.process")

WORKER_MODULE = "expbus.sinks._process_worker"

#: Seconds a call waits beyond the sink's ``write_timeout`` before it kills the child: the
#: bus's hang detection (at ``write_timeout``) acts first, then the child is ended.
CALL_TIMEOUT_GRACE = 2.0

# -- the wire protocol (shared with _process_worker) ------------------------------------------
REQUEST_HEADER = struct.Struct(">IB")  # payload length, op
REPLY_HEADER = struct.Struct(">I")  # payload length
OP_OPEN, OP_WRITE, OP_RETRY, OP_FLUSH, OP_CLOSE = (ord(c) for c in "OWRFC")
OP_NAMES = {OP_OPEN: "open", OP_WRITE: "write", OP_RETRY: "write", OP_FLUSH: "flush", OP_CLOSE: "close"}
# Sink attributes the bus reads (see bus/_runner.py and bus/_bus.py) that a ProcessSink
# mirrors from the sink it runs, so the bus treats both alike. (``default_policy`` is read
# off the class by ``Bus.add_sink`` when no policy is given: give a ProcessSink its policy.)
MIRRORED_ATTRIBUTES = ("durable_writes", "catch_up", "default_policy")


class OpenRequest(msgspec.Struct, kw_only=True):
    """The first frame: what the child needs to build and open the sink."""

    type: str
    options: dict[str, Any]
    context: dict[str, Any]
    sys_path: list[str]
    log_level: int
    close_timeout: float
    parent_pid: int


class RemoteError(msgspec.Struct, kw_only=True):
    """An exception raised by the sink in the child."""

    type: str
    message: str
    traceback: str
    transient: bool


class RemoteLog(msgspec.Struct, kw_only=True, array_like=True):
    """A log record emitted in the child, re-emitted in the parent."""

    name: str
    levelno: int
    message: str
    created: float
    pathname: str
    lineno: int
    func: str
    thread_name: str
    exc_text: str | None = None


class Reply(msgspec.Struct, kw_only=True):
    """The child's answer to one request."""

    error: RemoteError | None = None
    logs: list[RemoteLog] = msgspec.field(default_factory=list)
    dropped_logs: int = 0


def _enc_hook(obj: Any) -> Any:
    # As the journal's encoder: tensors/numpy scalars as numbers, paths and the rest as text.
    if hasattr(obj, "item"):
        return resolve_value(obj)
    return str(obj)


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
# Options and the open request: plain data only, never turned into text behind the user's back.
_strict_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(Reply)


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a sink's worker process.

    Set as the ``__cause__`` of the error raised in the training process, so that the bus's
    log line shows where the child failed (as ``concurrent.futures`` does for its workers).
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class ChildSinkError(RuntimeError):
    """A sink running in a worker process failed (not transient: the bus does not retry it).

    Attributes:
        sink_id: the sink's id.
        sink_type: its ``type:``.
        remote_type: the exception's type name in the child (``""`` when the child itself failed).
        pid: the child's process id.
    """

    def __init__(self, message: str, *, sink_id: str, sink_type: str, remote_type: str = "",
                 pid: int | None = None) -> None:
        super().__init__(message)
        self.sink_id = sink_id
        self.sink_type = sink_type
        self.remote_type = remote_type
        self.pid = pid


class WorkerDiedError(ChildSinkError):
    """A sink's worker process exited (or was killed) while the sink was open.

    Attributes:
        returncode: the exit status (negative: killed by that signal).
        stderr_tail: the last lines the child wrote to its stderr file.
    """

    def __init__(self, message: str, *, sink_id: str, sink_type: str, pid: int | None,
                 returncode: int | None, stderr_tail: str) -> None:
        super().__init__(message, sink_id=sink_id, sink_type=sink_type, pid=pid)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class _Timeout(Exception):
    """A pipe operation missed its deadline."""


class _Channel:
    """The two pipes to a child, read and written with deadlines (non-blocking + selectors)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._out = proc.stdin
        self._in = proc.stdout
        self._wfd = self._out.fileno()
        self._rfd = self._in.fileno()
        os.set_blocking(self._wfd, False)
        os.set_blocking(self._rfd, False)
        self._selector = selectors.DefaultSelector()

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        self._selector.register(fd, event)
        try:
            ready = self._selector.select(remaining)
        finally:
            self._selector.unregister(fd)
        if not ready:
            raise _Timeout

    def send(self, parts: Sequence[bytes], deadline: float) -> None:
        for part in parts:
            view = memoryview(part)
            while view:
                try:
                    written = os.write(self._wfd, view)
                except BlockingIOError:
                    self._wait(self._wfd, selectors.EVENT_WRITE, deadline)
                    continue
                view = view[written:]

    def _read_exact(self, size: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        needed = size
        while needed:
            try:
                chunk = os.read(self._rfd, min(needed, 1 << 20))
            except BlockingIOError:
                self._wait(self._rfd, selectors.EVENT_READ, deadline)
                continue
            if not chunk:
                raise EOFError("the worker process closed its end of the pipe")
            chunks.append(chunk)
            needed -= len(chunk)
        return b"".join(chunks)

    def recv(self, deadline: float) -> bytes:
        (size,) = REPLY_HEADER.unpack(self._read_exact(REPLY_HEADER.size, deadline))
        return self._read_exact(size, deadline)

    def close(self) -> None:
        self._selector.close()
        for stream in (self._out, self._in):
            try:
                stream.close()
            except OSError:
                pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


def _tail(path: Path | None, start: int, limit: int = 2000) -> str:
    """The last ``limit`` bytes (whole lines) this child wrote to its stderr file."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            begin = max(start, end - limit)
            fh.seek(begin)
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if begin > start and "\n" in text:
        text = text.split("\n", 1)[1]  # a whole first line
    return text.strip()


# Reaper threads of children whose sink has closed and which are still exiting.
_reapers: set[threading.Thread] = set()
_reapers_lock = threading.Lock()


def wait_for_workers(timeout: float = 30.0) -> bool:
    """Wait until every closed ProcessSink's worker process has exited; True if all did in time.

    ``close`` returns once the child's sink has closed, before the child has exited; call this
    where the exit matters (a test counting processes, a benchmark reading their CPU time).
    """
    deadline = time.monotonic() + timeout
    with _reapers_lock:
        pending = list(_reapers)
    for thread in pending:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in pending)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child (it ignores SIGTERM by design, see the module docstring) and reap it."""
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
        pass


def _log_threshold() -> int:
    # The lowest level the parent would log for the child's records: the root's, or expbus's.
    return min(logging.getLogger().getEffectiveLevel(), logging.getLogger("expbus").getEffectiveLevel())


class ProcessSink:
    """Runs a sink, built from its type and options, in a child process (``workers: process``).

    The bus treats it as any sync sink (its own thread in the training process, queue,
    batching, retries, deadlines); the sink's own work, and its GIL, are in the child.
    See the module docstring for the protocol, signals and limits.

    Args:
        type: the sink's ``type:``: a registered name (``mlflow``) or ``package.module:Class``.
        options: the sink's options, as its YAML block gives them (plain data).
        sink_id: the sink id used in errors until ``open`` names it (default: ``type``).
        call_timeout: seconds a ``write``/``flush`` may wait for the child's reply before the
            child is killed (``build_bus`` uses the sink's ``write_timeout`` +
            :data:`CALL_TIMEOUT_GRACE`).
        open_timeout: seconds ``open`` may take (child start, imports, the sink's ``open``).
        close_timeout: seconds ``close`` may take before the child is killed; also the child's
            own bound for closing its sink when the training process dies.
        priority: ``idle`` (the default): on Linux the child, and what it starts, runs under
            ``SCHED_IDLE``, so it never preempts the training process and takes only CPU time
            nothing else wants; it closes under the normal policy. ``normal``: scheduled like
            any process (where a saturated machine would starve an idle child for longer
            than ``write_timeout``).

    Raises:
        ConfigError: the type is unknown or the options are not the sink's (checked here,
            by building the sink once in this process: constructors only check and store).
        TypeError: an option is not plain data (msgpack cannot encode it).

    Attributes:
        pid: the child's process id while it runs.
        returncode: the child's exit status once it has exited.
        stderr_path: the child's stderr file (``run_dir/.expbus/workers/<sink id>.stderr``).
    """

    def __init__(
        self,
        type: str,
        options: Mapping[str, Any] | None = None,
        *,
        sink_id: str | None = None,
        call_timeout: float = 60.0 + CALL_TIMEOUT_GRACE,
        open_timeout: float = 120.0,
        close_timeout: float = 30.0,
        priority: str = "idle",
    ) -> None:
        from ._registry import check_worker_priority, create_sink

        if os.name != "posix":
            from ._errors import ConfigError

            raise ConfigError(f"sinks.{sink_id or type}.workers: 'process' needs a POSIX system (pipes waited on "
                              "with selectors, sessions); use workers: thread here", path="workers", value="process")
        self.type = type
        self.options: dict[str, Any] = dict(options or {})
        self.sink_id = sink_id or str(type)
        for label, value in (("call_timeout", call_timeout), ("open_timeout", open_timeout),
                             ("close_timeout", close_timeout)):
            if value <= 0:
                raise ValueError(f"{label} must be > 0 seconds, got {value}")
        check_worker_priority(priority, f"sinks.{self.sink_id}.worker_priority")
        self.priority = priority
        self.call_timeout = call_timeout
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        probe, _policy = create_sink(self.sink_id, {"type": type, **self.options})
        try:
            _strict_encoder.encode(self.options)
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(f"sinks.{self.sink_id}: options of a sink in a worker process must be plain data "
                            f"(YAML values): {exc}") from None
        for name in MIRRORED_ATTRIBUTES:
            if hasattr(probe, name):
                setattr(self, name, getattr(probe, name))
        if not callable(getattr(probe, "flush", None)):
            # In process, the bus counts a sink without flush as durable on write; so here.
            self.durable_writes = True
        self.stderr_path: Path | None = None
        self._stderr_start = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: _Channel | None = None
        self._lock = threading.Lock()
        self._last_batch: Sequence[Event] | None = None
        self._failure: ChildSinkError | None = None
        self._failure_raised = False
        self._closed = False

    @classmethod
    def from_spec(cls, type: str, /, **options: Any) -> ProcessSink:
        """A sink of ``type`` with ``options`` (as its YAML block would give them), to run in a process.

        For a sink built in Python rather than from YAML; add it with its policy::

            bus.add_sink("mlflow", ProcessSink.from_spec("mlflow", tracking_uri="sqlite:///m.db"),
                         SinkPolicy(write_timeout=300))

        Raises:
            ConfigError: unknown type or option, or a bus policy key among the options.
        """
        from ._errors import ConfigError
        from ._registry import RESERVED_KEYS

        reserved = sorted(set(options) & RESERVED_KEYS)
        if reserved:
            raise ConfigError(f"ProcessSink.from_spec({type!r}): {', '.join(reserved)} are not sink options; "
                              "give the bus policy to Bus.add_sink(sink_id, sink, SinkPolicy(...))",
                              path=reserved[0], value=options[reserved[0]])
        return cls(type, options)

    # -- state -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The child's process id (``None`` before ``open``)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The child's exit status, once it has exited."""
        return self._proc.poll() if self._proc is not None else None

    def __repr__(self) -> str:
        return f"ProcessSink(type={self.type!r}, sink_id={self.sink_id!r}, pid={self.pid})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a ProcessSink cannot be pickled; build it from its spec in the process that uses it")

    # -- the sink protocol -----------------------------------------------------------------
    def open(self, context: SinkContext) -> None:
        """Start the worker process, build the sink there and open it (within ``open_timeout``).

        Raises:
            ChildSinkError: the child could not build or open the sink (with its traceback).
            TransientSinkError: the sink's ``open`` failed with a transient error.
            WorkerDiedError: the child exited before it answered.
        """
        if self._proc is not None and not self._closed:
            raise RuntimeError(f"ProcessSink {self.sink_id!r} is already open")
        self._last_batch = None
        self.sink_id = context.sink_id
        deadline = time.monotonic() + self.open_timeout
        self._start(context.run_dir)
        request = OpenRequest(
            type=self.type,
            options=self.options,
            context=msgspec.to_builtins(context, enc_hook=str),
            sys_path=[str(p) for p in sys.path],
            log_level=_log_threshold(),
            close_timeout=self.close_timeout,
            parent_pid=os.getpid(),
        )
        try:
            self._call(OP_OPEN, _strict_encoder.encode(request), deadline)
        except BaseException:
            self._stop(time.monotonic() + 1.0)
            raise

    def write(self, batch: Sequence[Event]) -> None:
        """Send the batch to the child and wait until its sink's ``write`` returned.

        Raises:
            TransientSinkError: the sink's ``write`` failed with a transient error.
            ChildSinkError: it failed otherwise, or the child missed ``call_timeout``.
            WorkerDiedError: the child is gone.
        """
        deadline = time.monotonic() + self.call_timeout
        if batch is self._last_batch:
            # The bus retries a failed batch with the same list: the child retries its copy.
            self._call(OP_RETRY, b"", deadline)
        else:
            self._last_batch = batch
            self._call(OP_WRITE, _encoder.encode(batch), deadline)
        self._last_batch = None

    def flush(self) -> None:
        """Ask the child to flush its sink (a no-op when the sink has no ``flush``)."""
        self._call(OP_FLUSH, b"", time.monotonic() + self.call_timeout)

    def close(self) -> None:
        """Close the sink in the child, then end the child; bounded by ``close_timeout``.

        Returns as soon as the child's sink has closed: the child's own exit (interpreter
        teardown, a second with MLflow loaded) is waited for by a reaper thread, which kills it
        at the deadline (:func:`wait_for_workers` waits for them).

        Raises:
            ChildSinkError: the sink's ``close`` failed, or the child had to be killed.
            WorkerDiedError: the child died before (reported once).
        """
        if self._closed or self._proc is None:
            return
        deadline = time.monotonic() + self.close_timeout
        closed = False
        try:
            if self._failure is not None:
                if not self._failure_raised:
                    self._failure_raised = True
                    raise self._copy(self._failure)
                return
            self._call(OP_CLOSE, b"", deadline)
            closed = True
        finally:
            self._closed = True
            if closed:
                self._stop_later(deadline)
            else:
                self._stop(deadline)

    # -- the child -------------------------------------------------------------------------
    def _start(self, run_dir: Path) -> None:
        stderr_file: Any
        try:
            folder = Path(run_dir) / ".expbus" / "workers"
            folder.mkdir(parents=True, exist_ok=True)
            self.stderr_path = folder / f"{self.sink_id}.stderr"
            stderr_file = open(self.stderr_path, "ab")
            self._stderr_start = stderr_file.tell()
        except OSError as exc:
            log.warning("expbus sink %r: cannot write its worker's stderr under %s (%s); it goes to this "
                        "process's stderr", self.sink_id, run_dir, exc)
            self.stderr_path = None
            stderr_file = None
        cmd = [sys.executable, "-m", WORKER_MODULE, "--priority", self.priority]
        pass_fds: tuple[int, ...] = ()
        stdout_fd: int | None = None
        try:
            # The child's own stdout (the protocol's pipe aside) is this process's fd 1, so a
            # sink that prints (console, dllogger with stdout) prints where it would in process.
            stdout_fd = os.dup(1)
            pass_fds = (stdout_fd,)
            cmd += ["--stdout-fd", str(stdout_fd)]
        except OSError:
            stdout_fd = None
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                pass_fds=pass_fds,
                close_fds=True,
                # Out of the training job's process group: a Ctrl-C or a group-wide signal
                # must not end the child before the parent's preemption handler flushed it.
                start_new_session=True,
            )
        finally:
            if stdout_fd is not None:
                os.close(stdout_fd)
            if stderr_file is not None:
                stderr_file.close()
        self._channel = _Channel(self._proc)
        self._failure = None
        self._failure_raised = False
        self._closed = False

    def _stop(self, deadline: float, proc: subprocess.Popen[bytes] | None = None,
              channel: _Channel | None = None) -> None:
        """Close the pipes (the child exits on EOF), wait until ``deadline``, then kill it."""
        if proc is None:
            proc, channel = self._proc, self._channel
        if proc is None:
            return
        if channel is not None:
            channel.close()
        try:
            proc.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("expbus sink %r: its worker process (pid %d) did not exit within its close deadline; "
                      "killed", self.sink_id, proc.pid)
            _kill(proc)

    def _stop_later(self, deadline: float) -> None:
        """:meth:`_stop` on a daemon thread (the sink has closed: nothing is lost by not waiting)."""
        # This child and its pipes, not whatever ``self`` holds later (the sink may be reopened).
        proc, channel = self._proc, self._channel

        def reap() -> None:
            try:
                self._stop(deadline, proc, channel)
            finally:
                with _reapers_lock:
                    _reapers.discard(thread)

        thread = threading.Thread(target=reap, name=f"expbus-reap-{self.sink_id}", daemon=True)
        with _reapers_lock:
            _reapers.add(thread)
        thread.start()

    def _kill(self) -> None:
        if self._proc is not None:
            _kill(self._proc)

    def _call(self, op: int, payload: bytes, deadline: float) -> None:
        what = OP_NAMES[op]
        with self._lock:
            if self._failure is not None:
                self._failure_raised = True
                raise self._copy(self._failure)
            if self._closed or self._channel is None or self._proc is None:
                raise ChildSinkError(f"sink {self.sink_id!r} ({self.type}): {what} on a closed worker process",
                                     sink_id=self.sink_id, sink_type=self.type)
            channel = self._channel
            try:
                channel.send((REQUEST_HEADER.pack(len(payload), op), payload), deadline)
                data = channel.recv(deadline)
            except _Timeout:
                raise self._fail(self._hung(what, deadline)) from None
            except (EOFError, OSError):
                raise self._fail(self._died(what)) from None
            reply = _reply_decoder.decode(data)
        self._emit_logs(reply)
        if reply.error is not None:
            raise self._remote(what, reply.error)

    def _fail(self, error: ChildSinkError) -> ChildSinkError:
        self._failure = error
        self._failure_raised = True
        return self._copy(error)

    @staticmethod
    def _copy(error: ChildSinkError) -> ChildSinkError:
        # A fresh exception each time: re-raising one object would pile up tracebacks.
        if isinstance(error, WorkerDiedError):
            return WorkerDiedError(str(error), sink_id=error.sink_id, sink_type=error.sink_type, pid=error.pid,
                                   returncode=error.returncode, stderr_tail=error.stderr_tail)
        return ChildSinkError(str(error), sink_id=error.sink_id, sink_type=error.sink_type,
                              remote_type=error.remote_type, pid=error.pid)

    def _died(self, what: str) -> WorkerDiedError:
        proc = self._proc
        assert proc is not None
        try:
            code: int | None = proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            # It closed its pipe but lives on: it is of no use any more.
            self._kill()
            code = proc.poll()
        tail = _tail(self.stderr_path, self._stderr_start)
        where = f" (stderr: {self.stderr_path})" if self.stderr_path is not None else ""
        message = (f"sink {self.sink_id!r} ({self.type}): its worker process (pid {proc.pid}) exited during "
                   f"{what}, {_describe_exit(code)}{where}")
        if tail:
            message += "; stderr tail:\n" + tail
        return WorkerDiedError(message, sink_id=self.sink_id, sink_type=self.type, pid=proc.pid, returncode=code,
                               stderr_tail=tail)

    def _hung(self, what: str, deadline: float) -> ChildSinkError:
        proc = self._proc
        assert proc is not None
        self._kill()
        return ChildSinkError(
            f"sink {self.sink_id!r} ({self.type}): its worker process (pid {proc.pid}) did not answer {what} "
            f"within its deadline; killed ({_describe_exit(proc.poll())})",
            sink_id=self.sink_id, sink_type=self.type, pid=proc.pid,
        )

    def _remote(self, what: str, error: RemoteError) -> Exception:
        pid = self.pid
        message = (f"sink {self.sink_id!r} ({self.type}) in its worker process (pid {pid}): {what} failed: "
                   f"{error.type}: {error.message}")
        exc: Exception
        if error.transient:
            exc = TransientSinkError(message)
        else:
            exc = ChildSinkError(message, sink_id=self.sink_id, sink_type=self.type, remote_type=error.type, pid=pid)
        exc.__cause__ = RemoteTraceback(error.traceback)
        return exc

    def _emit_logs(self, reply: Reply) -> None:
        pid = self.pid
        for item in reply.logs:
            logger = logging.getLogger(item.name)
            if not logger.isEnabledFor(item.levelno):
                continue
            record = logging.makeLogRecord({
                "name": item.name, "levelno": item.levelno, "levelname": logging.getLevelName(item.levelno),
                "msg": item.message, "args": None, "created": item.created,
                "msecs": (item.created - int(item.created)) * 1000.0, "pathname": item.pathname,
                "filename": os.path.basename(item.pathname), "module": Path(item.pathname).stem,
                "lineno": item.lineno, "funcName": item.func, "exc_text": item.exc_text,
                "threadName": item.thread_name, "process": pid, "processName": f"expbus-worker-{self.sink_id}",
            })
            logger.handle(record)
        if reply.dropped_logs:
            log.warning("expbus sink %r: its worker process dropped %d log records (too many between two calls)",
                        self.sink_id, reply.dropped_logs)
