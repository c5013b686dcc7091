"""The log directory of a run: where it is, the version every rank agrees on, and the files rank 0 writes into it."""

from __future__ import annotations

import fnmatch
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from expbus.bus import redact_argv, redact_text
from expbus.sinks import ConfigError, resolve_sink_class

if TYPE_CHECKING:
    from ._config import ExpManagerConfig

__all__ = [
    "ENV_VERSION",
    "LogDir",
    "LogDirAgreement",
    "attach_log_files",
    "detach_log_files",
    "kept_names",
    "move_previous_run",
    "process_ranks",
    "publish_version",
    "resolve_log_dir",
    "write_run_files",
]

log = logging.getLogger("expbus.exp_manager")

#: NeMo's variable: the version rank 0 chose, for processes started after it.
ENV_VERSION = "NEMO_EXPM_VERSION"
DEFAULT_EXP_DIR = "nemo_experiments"
DATETIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
# Top-level files a resumed run continues, never moved into run_N/: TensorBoard event files
# (as NeMo), the bus journals, and the MLflow store should one live there.
_ALWAYS_KEPT = ("events.out.tfevents*", "journal*.msgpack", "mlflow.db*")
_RUN_DIR = re.compile(r"run_(\d+)$")
_VERSION_DIR = re.compile(r"version_(\d+)$")


@dataclass(frozen=True)
class LogDir:
    """Where a run logs.

    Attributes:
        path: the log dir (absolute).
        exp_dir: NeMo's ``exp_dir`` (the explicit log dir itself when there is one).
        name: the experiment name (``""`` with an explicit log dir, as NeMo).
        version: the version folder, ``None`` when there is none.
        auto_version: the version was chosen here (time or ``version_N``), so ranks that
            started separately may need to agree on it at setup.
    """

    path: Path
    exp_dir: Path
    name: str
    version: str | None
    auto_version: bool = False


def process_ranks(trainer: pl.Trainer) -> tuple[int, int]:
    """(global rank, local rank) of this process, already right before ``fit`` sets the Trainer's.

    The Trainer's ranks are only final once its strategy is set up; like NeMo, this reads
    the launcher's environment (``RANK``/``LOCAL_RANK``, SLURM's) or computes
    ``node_rank * num_devices + local_rank``.
    """
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), local
    for variable in ("RANK", "SLURM_PROCID"):
        if os.environ.get(variable):
            return int(os.environ[variable]), local
    return trainer.node_rank * trainer.num_devices + local, local


def _next_version(root: Path) -> str:
    # Lightning's TensorBoardLogger rule: one more than the largest version_N folder.
    numbers = [int(m.group(1)) for child in (root.iterdir() if root.is_dir() else [])
               if child.is_dir() and (m := _VERSION_DIR.match(child.name))]
    return f"version_{max(numbers) + 1 if numbers else 0}"


def _broadcast(value: str | None) -> str | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_log_dir(trainer: pl.Trainer, config: ExpManagerConfig, *, global_rank: int) -> LogDir:
    """The log dir by NeMo's rules; creates nothing.

    * ``explicit_log_dir`` verbatim (``exp_dir`` and ``version`` are then ignored, with an error log as NeMo).
    * A Trainer that has its own logger: ``<logger.save_dir>/<logger.name>/version_<logger.version>``.
    * Otherwise ``exp_dir/name/version``: ``exp_dir`` ``None`` is ``./nemo_experiments`` (``""`` is
      the current directory, as in NeMo), ``name`` ``None`` is ``default``; the version is
      ``version``, else ``$NEMO_EXPM_VERSION``, else none at all with ``resume_if_exists``,
      else the time (``use_datetime_version``) or the next ``version_N``.

    When ``torch.distributed`` is initialised every rank takes rank 0's version by broadcast;
    :func:`publish_version` hands it to processes started later.
    """
    if config.explicit_log_dir:
        if config.exp_dir or config.version:
            log.error("exp_manager received explicit_log_dir: %s and at least one of exp_dir: %s, or version: %s. "
                      "Please note that exp_dir, name, and version will be ignored.",
                      config.explicit_log_dir, config.exp_dir, config.version)
        path = Path(os.path.abspath(config.explicit_log_dir))
        if global_rank == 0 and path.exists():
            log.warning("Exp_manager is logging to %s, but it already exists.", path)
        return LogDir(path=path, exp_dir=path, name="", version="")
    logger = trainer.logger
    if logger is not None:
        exp_dir = Path(os.path.abspath(logger.save_dir or os.getcwd()))
        name = str(logger.name or "")
        logger_version = f"version_{logger.version}"
        return LogDir(path=exp_dir / name / logger_version, exp_dir=exp_dir, name=name,
                      version=logger_version)
    exp_dir = Path(os.path.abspath(DEFAULT_EXP_DIR if config.exp_dir is None else config.exp_dir))
    name = config.name or "default"
    version = config.version or os.environ.get(ENV_VERSION) or None
    if version and not config.version and _leaves(version):
        # The configured version was checked at load; the inherited one is checked here.
        raise ConfigError(f"${ENV_VERSION}: {version!r} would leave exp_dir; unset it or use a plain folder name",
                          path=ENV_VERSION, value=version)
    auto = False
    if not config.version:
        if not version:
            if config.resume_if_exists:
                log.warning("No version folders would be created under the log folder as 'resume_if_exists' "
                            "is enabled.")
            else:
                version = time.strftime(DATETIME_FORMAT) if config.use_datetime_version else _next_version(
                    exp_dir / name)
                auto = True
        version = _broadcast(version)
    path = exp_dir / name / version if version else exp_dir / name
    return LogDir(path=path, exp_dir=exp_dir, name=name, version=version, auto_version=auto)


def _leaves(part: str) -> bool:
    # The rule exp_manager applies to name and version: no absolute path, no '..'.
    return Path(part).is_absolute() or ".." in Path(part).parts


def publish_version(log_dir: LogDir, *, global_rank: int) -> None:
    """Rank 0 puts the version it chose in ``NEMO_EXPM_VERSION``, for the processes it starts later (DDP)."""
    if global_rank == 0 and log_dir.auto_version and log_dir.version:
        os.environ[ENV_VERSION] = log_dir.version


# -- files of earlier runs -------------------------------------------------------------------
def kept_names(sink_specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Top-level file names (patterns) that stay in a reused log dir: what the sinks continue on resume."""
    names = list(_ALWAYS_KEPT)
    for spec in sink_specs.values():
        if spec.get("enabled", True) is False:
            continue
        try:
            params = inspect.signature(resolve_sink_class(spec.get("type"))).parameters  # type: ignore[arg-type]
        except Exception:
            continue
        for option, param in params.items():
            if not option.endswith(("file", "path", "dir")):
                continue
            value = spec.get(option, param.default)
            if isinstance(value, str) and value and not os.path.isabs(value):
                parts = Path(value).parts
                if len(parts) == 1:
                    names.append(parts[0])
    return names


def move_previous_run(log_dir: Path, keep: Iterable[str]) -> Path | None:
    """Move the top-level files an earlier run left in ``log_dir`` into ``log_dir/run_N`` (rank 0).

    Folders stay, and so do the files matching ``keep`` (TensorBoard event files, journals,
    sink outputs continued on resume). Returns the ``run_N`` folder, or ``None`` if nothing moved.
    """
    if not log_dir.is_dir():
        return None
    patterns = list(keep)
    to_move = [child for child in log_dir.iterdir()
               if child.is_file() and not any(fnmatch.fnmatch(child.name, p) for p in patterns)]
    if not to_move:
        return None
    numbers = [int(m.group(1)) for child in log_dir.iterdir() if child.is_dir() and (m := _RUN_DIR.match(child.name))]
    run_dir = log_dir / f"run_{max(numbers) + 1 if numbers else 0}"
    run_dir.mkdir()
    for child in to_move:
        shutil.move(os.fspath(child), os.fspath(run_dir / child.name))
    log.info("Moved %d files of the previous run in %s into %s", len(to_move), log_dir, run_dir.name)
    return run_dir


# -- files of this run ---------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


#: Mode of the files exp_manager creates in the log dir: they can hold the command line, the
#: repository's diff and log records, so only the user reads them (where the platform has modes).
PRIVATE_FILE_MODE = 0o600


def _private_opener(path: str, flags: int) -> int:
    # A new file gets 0600 (less the umask); an existing one keeps the mode it has.
    return os.open(path, flags, PRIVATE_FILE_MODE)


def write_run_files(log_dir: Path, files_to_copy: Iterable[str] | None) -> None:
    """Rank 0's records of the run: ``cmd-args.log``, ``git-info.log`` (inside a git repository) and the copies.

    ``cmd-args.log`` holds ``sys.argv`` with its secrets replaced by ``***``
    (:func:`expbus.bus.redact_argv`: ``...api_key=***``, ``--password ***``, URI
    credentials); both files are created readable by the user only.
    """
    for item in files_to_copy or []:
        shutil.copy(Path(item), log_dir)
    with open(log_dir / "cmd-args.log", "w", encoding="utf-8", opener=_private_opener) as handle:
        handle.write(" ".join(redact_argv(sys.argv)))
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        with open(log_dir / "git-info.log", "a", encoding="utf-8", opener=_private_opener) as handle:
            handle.write(f"commit hash: {commit}")
            handle.write(redact_text(_git("diff") or ""))


# -- log files -----------------------------------------------------------------------------
_FORMAT = "[%(levelname)1.1s %(asctime)s %(name)s:%(lineno)d] %(message)s"
# Handlers exp_manager added, removed by the next exp_manager call (NeMo keeps adding them).
_installed: list[tuple[logging.Logger, logging.Handler]] = []


def _add(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(handler)
    _installed.append((logger, handler))


class _PrivateFileHandler(logging.FileHandler):
    """A log file created readable by the user only, whose lines carry no URI credentials.

    A client that logs its server's address (``https://user:pass@host``) must not leave the
    password in the run's log files.
    """

    def _open(self) -> Any:
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=_private_opener)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _file_handler(path: Path, *, level: int, formatted: bool = True, delay: bool = False) -> logging.FileHandler:
    handler = _PrivateFileHandler(path, encoding="utf-8", delay=delay)
    handler.setLevel(level)
    if formatted:
        handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def attach_rank_log(log_dir: Path, *, global_rank: int, local_rank: int, config: ExpManagerConfig) -> None:
    """This process's log file ``nemo_log_globalrank-<g>_localrank-<l>.txt`` (what reaches the root logger).

    Every rank writes one, unless ``log_local_rank_0_only`` / ``log_global_rank_0_only``.
    """
    if config.log_local_rank_0_only and local_rank != 0:
        return
    if config.log_global_rank_0_only and global_rank != 0:
        return
    path = log_dir / f"nemo_log_globalrank-{global_rank}_localrank-{local_rank}.txt"
    # Other ranks open theirs at the first record, after rank 0 has tidied the folder.
    _add(logging.getLogger(), _file_handler(path, level=logging.INFO, delay=global_rank != 0))


def attach_log_files(log_dir: Path) -> None:
    """Rank 0's ``nemo_error_log.txt`` (warnings and errors) and ``lightning_logs.txt`` (Lightning's log)."""
    lightning = logging.getLogger("lightning.pytorch")
    errors = _file_handler(log_dir / "nemo_error_log.txt", level=logging.WARNING)
    _add(logging.getLogger(), errors)
    if not lightning.propagate:
        # Lightning stops its records at its own logger when the root had no handler at import.
        _add(lightning, errors)
    _add(lightning, _file_handler(log_dir / "lightning_logs.txt", level=logging.NOTSET, formatted=False))


def detach_log_files() -> None:
    """Remove and close the log files of the previous exp_manager call of this process."""
    while _installed:
        logger, handler = _installed.pop()
        logger.removeHandler(handler)
        handler.close()


def _relocate_log_files(old: Path, new: Path) -> None:
    for index, (logger, handler) in enumerate(list(_installed)):
        if not isinstance(handler, logging.FileHandler):
            continue
        current = Path(handler.baseFilename)
        if current.parent != old:
            continue
        logger.removeHandler(handler)
        handler.close()
        target = new / current.name
        if current.exists() and not target.exists():
            shutil.move(os.fspath(current), os.fspath(target))
        replacement = _file_handler(target, level=handler.level, formatted=handler.formatter is not None)
        logger.addHandler(replacement)
        _installed[index] = (logger, replacement)


class LogDirAgreement(pl.Callback):
    """Makes every rank use rank 0's log dir once the processes can talk (``setup``).

    Processes started separately (``torchrun``, SLURM tasks) with neither ``version`` nor
    ``NEMO_EXPM_VERSION`` each chose a version before ``torch.distributed`` existed. NeMo
    leaves them disagreeing; here rank 0's choice is broadcast at setup and the other ranks
    move their log file there and drop the folder they made. (Lightning's ``ModelCheckpoint``
    and the :class:`~expbus.trainer_bridge.BridgeCallback` take rank 0's directory by
    broadcast on their own.)

    Args:
        log_dir: the log dir this process chose.
    """

    def __init__(self, log_dir: LogDir) -> None:
        super().__init__()
        self.log_dir = log_dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take rank 0's log dir (a broadcast; nothing when there is one process)."""
        if trainer.world_size < 2:
            return
        mine = str(self.log_dir.path)
        agreed = trainer.strategy.broadcast(mine, src=0)
        if agreed == mine:
            return
        new = Path(agreed)
        log.info("rank %d: using rank 0's log dir %s instead of %s", trainer.global_rank, new, mine)
        new.mkdir(parents=True, exist_ok=True)
        _relocate_log_files(self.log_dir.path, new)
        if self.log_dir.version is not None and new.parent == self.log_dir.path.parent:
            os.environ[ENV_VERSION] = new.name
        trainer._default_root_dir = str(new)  # type: ignore[attr-defined]  # Lightning has no setter
        try:
            self.log_dir.path.rmdir()  # only if this rank left nothing else there
        except OSError:
            pass
        self.log_dir = LogDir(path=new, exp_dir=self.log_dir.exp_dir, name=self.log_dir.name,
                              version=new.name if self.log_dir.version else self.log_dir.version)
