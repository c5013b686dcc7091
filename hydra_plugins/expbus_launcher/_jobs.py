"""One sweep job as a subprocess: its command line, environment, resolved config and log file."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["JOBS_DIR", "Job", "child_command", "child_env", "write_job_config"]

#: Folder under the sweep dir with each job's config and log (NeMo sweeps use ``sweep.subdir: .``,
#: so the job's own subdir cannot hold them).
JOBS_DIR = "expbus_sweep"

# Overrides the child must not get: it runs one job in run mode, in the launcher's working directory.
_DROPPED_PREFIXES = ("hydra.run.", "hydra.sweep.", "hydra.sweeper.", "hydra.launcher.", "hydra.mode")
_DROPPED_GROUPS = ("hydra/launcher=", "hydra/sweeper=")
# Variables that belong to one run: a sweep's jobs are independent runs.
_PER_RUN_ENV = ("NEMO_EXPM_VERSION",)


@dataclass
class Job:
    """A sweep job and, once it ran, its outcome.

    Attributes:
        num: the job's number in the sweep (``hydra.job.num``).
        overrides: the job's overrides, as Hydra hands them to the launcher.
        command: the child's command line.
        env: the child's environment.
        log_path: where its stdout and stderr go.
        config_path: its resolved config (a record; the child composes its own from the overrides).
        returncode: the exit code (``None`` while queued or running).
        seconds: how long it ran.
        slot: the label of the slot it ran on.
    """

    num: int
    overrides: list[str]
    command: list[str]
    env: dict[str, str]
    log_path: Path
    config_path: Path
    returncode: int | None = None
    seconds: float = 0.0
    slot: str = ""

    @property
    def shown_overrides(self) -> str:
        """The overrides a user set (Hydra's own keys left out)."""
        return " ".join(o for o in self.overrides if not o.startswith("hydra.")) or "(none)"


def _script_command() -> list[str]:
    """How this process was started: ``python script.py`` or ``python -m package.module``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        # `python -m pkg.train`: running the file directly would break its relative imports.
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    return [sys.executable, os.path.abspath(sys.argv[0])]


def _config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-path/--config-name/--config-dir`` flags of the parent's command line."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    flags = []
    if args.config_path is not None:
        flags.append(f"--config-path={args.config_path}")
    if args.config_name is not None:
        flags.append(f"--config-name={args.config_name}")
    if args.config_dir is not None:
        flags.append(f"--config-dir={os.path.abspath(args.config_dir)}")
    return flags


def _kept(override: str) -> bool:
    key = override.lstrip("+~")
    return not key.startswith(_DROPPED_PREFIXES) and not key.startswith(_DROPPED_GROUPS)


def child_command(num: int, overrides: Sequence[str], *, pin_devices: bool) -> list[str]:
    """The command that runs one job: the same script and config, the job's overrides, without ``-m``.

    Args:
        num: the job's number, passed on as ``hydra.job.num`` so ``${hydra:job.num}`` agrees.
        overrides: the job's overrides (the command line's and the swept values).
        pin_devices: the job has one GPU of its own: ``trainer.devices=1`` replaces any devices override.

    Returns:
        The argument vector.
    """
    args = [o for o in overrides if _kept(o)]
    if pin_devices:
        # CUDA_VISIBLE_DEVICES leaves the job one GPU; `devices: -1` or a list of ids would not fit it.
        args = [o for o in args if not o.lstrip("+~").startswith("trainer.devices=")]
        args.append("++trainer.devices=1")
    return [*_script_command(), *_config_flags(sys.argv[1:]), *args, f"hydra.job.num={num}"]


def child_env(env_set: Mapping[str, Any], *, gpu: str | None, gpus_exist: bool, threads: int | None) -> dict[str, str]:
    """The environment of one job.

    Args:
        env_set: the job's ``hydra.job.env_set``.
        gpu: the job's GPU, pinned through ``CUDA_VISIBLE_DEVICES``.
        gpus_exist: GPUs are visible to the launcher (a CPU job then sees none).
        threads: ``OMP_NUM_THREADS`` for a CPU job, unless already set, so CPU jobs do not oversubscribe the cores.

    Returns:
        The variables.
    """
    env = {k: v for k, v in os.environ.items() if k not in _PER_RUN_ENV}
    env.update({str(k): str(v) for k, v in env_set.items()})
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    elif gpus_exist:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if gpu is None and threads is not None and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    # Line by line into the log file, so the status line and a crash's tail are current.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_job_config(sweep_config: DictConfig, path: Path) -> None:
    """Write the job's config (Hydra's own node left out), resolved where it can be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = OmegaConf.to_container(sweep_config, resolve=True, throw_on_missing=False)
        note = "# resolved config of this job (the job composes its own from the same overrides)\n"
    except Exception as err:  # an interpolation only the job can resolve: keep it as written
        data = OmegaConf.to_container(sweep_config, resolve=False)
        note = f"# unresolved config of this job (resolving it raised {type(err).__name__})\n"
    assert isinstance(data, dict)
    data.pop("hydra", None)
    path.write_text(note + OmegaConf.to_yaml(OmegaConf.create(data)), encoding="utf-8")
