"""The child side of ``workers: process``: ``python -m expbus.sinks._process_worker``.

Started by :class:`expbus.sinks._process.ProcessSink` (see that module for the protocol).
It reads request frames on stdin, runs them against the one sink it builds, and answers
each on stdout. Before anything else it moves the protocol's pipes off fds 0 and 1 (fd 1
becomes the training process's stdout, passed as ``--stdout-fd``, so that a sink that
prints cannot corrupt a frame), and installs do-nothing handlers for the signals a job
scheduler sends to every process of a job: the training process decides when this child
stops, by closing its stdin. On EOF without a close request (the training process died) it
flushes and closes its sink, bounded by the ``close_timeout`` it was given, then exits.

Importing ``expbus.sinks`` (which ``-m`` does first) prints nothing; the sink's own module
and client are imported only after the pipes have moved.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from expbus.bus import AnyEvent, SinkContext, TransientSinkError
from expbus.bus._sink import open_args

from ._process import (
    OP_CLOSE,
    OP_FLUSH,
    OP_OPEN,
    OP_RETRY,
    OP_WRITE,
    REPLY_HEADER,
    REQUEST_HEADER,
    OpenRequest,
    RemoteError,
    RemoteLog,
    Reply,
)
from ._registry import WORKER_PRIORITIES

__all__ = ["main"]

log = logging.getLogger("expbus.sinks.process")

# Most log records kept between two replies (a chatty client must not grow memory unbounded).
_MAX_LOGS = 1000
# The exit status when the EOF-time close of the sink outlived close_timeout.
_EXIT_CLOSE_TIMEOUT = 3

_batch_decoder = msgspec.msgpack.Decoder(list[AnyEvent])  # type: ignore[valid-type]
_open_decoder = msgspec.msgpack.Decoder(OpenRequest)
_reply_encoder = msgspec.msgpack.Encoder()


def _move_fds(stdout_fd: int | None) -> tuple[int, int]:
    """Duplicate the protocol pipes away from fds 0/1; 0 then reads /dev/null, 1 is the parent's stdout."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if stdout_fd is not None:
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    else:
        os.dup2(2, 1)
    return proto_in, proto_out


def _ignore_job_signals() -> None:
    import signal

    def ignore(signum: int, frame: object) -> None:
        # A Python handler rather than SIG_IGN: programs the sink starts (wandb-core) get the
        # default dispositions back on exec instead of inheriting "ignored".
        return None

    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, ignore)


class _Forward(logging.Handler):
    """Keeps the records emitted between two replies, to send back with the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[RemoteLog] = []
        self.dropped = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            exc_text = record.exc_text
            if record.exc_info and not exc_text:
                exc_text = logging.Formatter().formatException(record.exc_info)
            item = RemoteLog(name=record.name, levelno=record.levelno, message=message, created=record.created,
                             pathname=record.pathname, lineno=record.lineno, func=record.funcName or "",
                             thread_name=record.threadName or "", exc_text=exc_text)
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            if len(self.records) >= _MAX_LOGS:
                self.dropped += 1
            else:
                self.records.append(item)

    def take(self) -> tuple[list[RemoteLog], int]:
        with self._guard:
            records, dropped = self.records, self.dropped
            self.records, self.dropped = [], 0
        return records, dropped


class _Worker:
    """One sink, served over two pipe fds."""

    def __init__(self, proto_in: int, proto_out: int) -> None:
        self._in = open(proto_in, "rb", buffering=1 << 16)  # lives as long as the process
        self._out = open(proto_out, "wb", buffering=0)
        self.sink: Any = None
        self.sink_id = "?"
        self.opened = False
        self.closed = False
        self.close_timeout = 30.0
        self._last_batch: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forward = _Forward()
        root = logging.getLogger()
        root.addHandler(self._forward)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)

    # -- frames -------------------------------------------------------------------------------
    def _read_exact(self, size: int) -> bytes:
        data = self._in.read(size)
        if data is None or len(data) < size:
            raise EOFError
        return data

    def _read_request(self) -> tuple[int, bytes]:
        size, op = REQUEST_HEADER.unpack(self._read_exact(REQUEST_HEADER.size))
        return op, self._read_exact(size) if size else b""

    def _reply(self, error: RemoteError | None) -> None:
        records, dropped = self._forward.take()
        payload = _reply_encoder.encode(Reply(error=error, logs=records, dropped_logs=dropped))
        self._out.write(REPLY_HEADER.pack(len(payload)) + payload)

    # -- calling the sink ---------------------------------------------------------------------
    def _invoke(self, fn: Callable[..., Any], *args: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(fn(*args))
        return fn(*args)

    def _is_transient(self, exc: BaseException) -> bool:
        custom = getattr(self.sink, "is_transient", None)
        if callable(custom):
            try:
                return bool(custom(exc))
            except Exception:
                return False
        return isinstance(exc, (TransientSinkError, ConnectionError, TimeoutError))

    def _error(self, exc: BaseException) -> RemoteError:
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        return RemoteError(type=name, message=str(exc), transient=self._is_transient(exc),
                           traceback="".join(traceback.format_exception(kind, exc, exc.__traceback__)))

    def _open(self, payload: bytes) -> None:
        from ._registry import create_sink

        request = _open_decoder.decode(payload)
        # The parent's import path first: a sink found there (a test's tmp module, a path
        # added at run time, an entry point in an added site dir) is found here too.
        sys.path[:] = [*request.sys_path, *(p for p in sys.path if p not in request.sys_path)]
        import importlib

        importlib.invalidate_caches()
        root = logging.getLogger()
        root.setLevel(request.log_level)
        self.close_timeout = request.close_timeout
        context = msgspec.convert(request.context, SinkContext,
                                  dec_hook=lambda kind, value: Path(value) if kind is Path else value)
        self.sink_id = context.sink_id
        print(f"expbus worker pid {os.getpid()}: sink {self.sink_id!r} ({request.type}) for training process "
              f"pid {request.parent_pid}", file=sys.stderr, flush=True)
        self.sink, _policy = create_sink(self.sink_id, {"type": request.type, **request.options})
        opener = getattr(self.sink, "open", None)
        if opener is not None:
            self._invoke(opener, *open_args(opener, context))
        self.opened = True

    def _handle(self, op: int, payload: bytes) -> None:
        if op == OP_OPEN:
            self._open(payload)
        elif op == OP_WRITE:
            self._last_batch = _batch_decoder.decode(payload)
            self._invoke(self.sink.write, self._last_batch)
            self._last_batch = []
        elif op == OP_RETRY:
            # The same list object as the failed attempt, as the bus retries in process.
            self._invoke(self.sink.write, self._last_batch)
            self._last_batch = []
        elif op == OP_FLUSH:
            flusher = getattr(self.sink, "flush", None)
            if flusher is not None:
                self._invoke(flusher)
        elif op == OP_CLOSE:
            self.closed = True
            # Training is over: close at the priority of a normal process, within its deadline.
            _set_priority("normal")
            closer = getattr(self.sink, "close", None)
            if closer is not None:
                self._invoke(closer)
        else:
            raise ValueError(f"unknown request op {op!r}")

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> int:
        while True:
            try:
                op, payload = self._read_request()
            except (EOFError, OSError):
                return self._orphaned()
            error: RemoteError | None = None
            try:
                self._handle(op, payload)
            except Exception as exc:
                error = self._error(exc)
            try:
                self._reply(error)
            except OSError:
                return self._orphaned()
            if op == OP_CLOSE or (op == OP_OPEN and error is not None):
                return 0

    def _orphaned(self) -> int:
        """The parent closed the pipe (or died) without a close request: close the sink, bounded."""
        if not self.opened or self.closed:
            return 0
        log.warning("expbus worker: the training process went away; flushing and closing sink %r "
                    "(at most %.0f s)", self.sink_id, self.close_timeout)
        _set_priority("normal")
        timer = threading.Timer(self.close_timeout, os._exit, args=(_EXIT_CLOSE_TIMEOUT,))
        timer.daemon = True
        timer.start()
        try:
            for name in ("flush", "close"):
                method = getattr(self.sink, name, None)
                if method is not None:
                    self._invoke(method)
        except Exception:
            log.exception("expbus worker: closing sink %r after the training process went away failed",
                          self.sink_id)
            return 1
        finally:
            timer.cancel()
        return 0


def _parse_args(argv: list[str]) -> tuple[int | None, str]:
    """``(stdout fd, priority)`` from ``[--stdout-fd N] [--priority idle|normal]``."""
    stdout_fd: int | None = None
    priority = "normal"
    rest = list(argv)
    while rest:
        flag = rest.pop(0)
        if flag == "--stdout-fd" and rest:
            stdout_fd = int(rest.pop(0))
        elif flag == "--priority" and rest and rest[0] in WORKER_PRIORITIES:
            priority = rest.pop(0)
        else:
            raise SystemExit(f"usage: python -m {__spec__.name if __spec__ else __name__} [--stdout-fd N] "
                             f"[--priority idle|normal]; got {argv}")
    return stdout_fd, priority


def _set_priority(priority: str) -> None:
    """Run this process (and what it starts) under ``SCHED_IDLE``, or back under ``SCHED_OTHER``.

    Why ``SCHED_IDLE`` and not ``nice 19``: what the child costs the training step on a busy
    machine is mostly *wake-up preemption*: a woken task with sleeper credit takes the core
    from the running training thread, whatever its nice value. A ``SCHED_IDLE`` task never
    preempts a normal one. Measured (workload a, K=10, every backend, 5 runs each on the
    2-core VM): the training thread's wait per step 153 µs (nice 0) / 147 µs (nice 19) /
    99 µs (``SCHED_IDLE``); its run-queue delay 101 / 99 / 48 µs.
    """
    if not hasattr(os, "sched_setscheduler"):
        return  # not Linux: the default scheduling
    policy = os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        print(f"expbus worker pid {os.getpid()}: cannot set scheduling priority {priority!r}: {exc}",
              file=sys.stderr, flush=True)
        return
    if priority == "normal":
        # A policy is per thread, and inherited: the sink's client threads and the programs it
        # started (wandb-core and its threads) run idle too, and take part in the close.
        for tid in _threads_of(_descendants(os.getpid()) | {os.getpid()}):
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except OSError:
                pass  # exited meanwhile


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from ``/proc``; empty where there is none)."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _threads_of(pids: set[int]) -> list[int]:
    """The thread ids of ``pids`` (each process's own id included)."""
    tids: list[int] = []
    for pid in pids:
        try:
            tids.extend(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            tids.append(pid)
    return tids


def main(argv: list[str] | None = None) -> int:
    """Serve one sink until the parent closes the pipe; the exit status."""
    stdout_fd, priority = _parse_args(sys.argv[1:] if argv is None else argv)
    proto_in, proto_out = _move_fds(stdout_fd)
    _ignore_job_signals()
    if priority == "idle":
        # Before the sink's open, so that what it starts (wandb-core) inherits it.
        _set_priority("idle")
    worker = _Worker(proto_in, proto_out)
    try:
        return worker.serve()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
