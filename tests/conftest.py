"""Test-session guards (no network beyond loopback, quiet clients, a fresh cwd per test) and a real MLflow server."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

# Clients that phone home on their own: keep them silent before anything imports them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CLEARML_OFFLINE_MODE", "1")
os.environ.setdefault("PL_DISABLE_FORK", "1")


def _is_loopback(address: Any) -> bool:
    if isinstance(address, (str, bytes)) and not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkAccessError(AssertionError):
    """A test tried to reach something other than loopback."""


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to connect to {address!r}: only loopback is allowed")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to connect to {address!r}: only loopback is allowed")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Fail any test that opens a socket to anything but loopback."""
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Undo what a test (or the code under test) wrote into os.environ.

    exp_manager publishes ``NEMO_EXPM_VERSION`` for ranks spawned later, and clients set their
    own variables; left behind, they would steer later tests and their subprocesses.
    """
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with a temporary working directory (for ./nemo_experiments defaults)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- a real MLflow tracking server ------------------------------------------------------------
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend store and proxied artifacts, in ``root``.

    The port and the store stay the same across :meth:`kill` and :meth:`start`, so a restarted
    server serves the runs of the killed one. Use it as a context manager: every process of the
    server (its own process group) is stopped on exit, whatever happened in the block.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "mlflow.db"
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90.0) -> float:
        """Start the server and wait until it answers ``/health``; returns the seconds that took."""
        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # No job runner (huey consumers) for a test server: fewer processes, faster start.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        if self._log is None:
            self._log = open(self.log_path, "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log()}")
            if self.healthy():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not answer /health in {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        """Whether the server answers ``/health`` now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """``SIGKILL`` every process of the server at once, as a crash or an OOM kill would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server (``SIGTERM``, then ``SIGKILL`` what is left); idempotent."""
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGKILL)  # anything of the group still alive (uvicorn's workers)

    def log(self) -> str:
        """What the server printed, for a failure message."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _signal(self, sig: signal.Signals) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)  # the server's own process group (start_new_session)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server_type() -> type[MlflowServer]:
    """The :class:`MlflowServer` class (test modules cannot import conftest under importlib mode).

    ``with mlflow_server_type(tmp_path / "server") as server: ... server.url ... server.kill() ...``
    """
    pytest.importorskip("mlflow")
    return MlflowServer
