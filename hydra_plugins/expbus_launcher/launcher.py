"""The ``expbus`` Hydra launcher (also ``nemo_launcher``): sweep jobs as subprocesses packed onto GPUs or CPU slots."""

# No `from __future__ import annotations` here: Hydra's plugin scan executes this module without putting it
# in sys.modules, where dataclasses look up string annotations.
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from ._jobs import JOBS_DIR, Job, child_command, child_env, write_job_config
from ._pool import run_pool
from ._report import StatusLine, failure, summary_table
from ._slots import plan_slots

__all__ = ["ExpbusLauncher", "ExpbusLauncherConf"]

log = logging.getLogger(__name__)


@dataclass
class ExpbusLauncherConf:
    """``hydra.launcher`` options.

    Attributes:
        num_gpus: GPUs to use, one job per GPU slot; ``-1`` is every visible GPU, ``0`` forces CPU slots.
        jobs_per_gpu: jobs sharing one GPU at a time.
        cpu_slots: jobs at once when no GPU is used; ``null`` is half the cores.
        tail_lines: lines of a failed job's log shown in its error.
    """

    _target_: str = "hydra_plugins.expbus_launcher.launcher.ExpbusLauncher"
    num_gpus: int = -1
    jobs_per_gpu: int = 1
    cpu_slots: Optional[int] = None  # noqa: UP045 - OmegaConf's structured configs read Optional, not `|`
    tail_lines: int = 40


# `nemo_launcher` too, so NeMo's multirun configs (`override hydra/launcher: nemo_launcher`) run unchanged.
for _name in ("expbus", "nemo_launcher"):
    ConfigStore.instance().store(group="hydra/launcher", name=_name, node=ExpbusLauncherConf, provider="expbus")


class ExpbusLauncher(Launcher):
    """Runs each sweep job as its own process, as many at once as there are slots, and reports every outcome.

    Args:
        num_gpus: see :class:`ExpbusLauncherConf`.
        jobs_per_gpu: see :class:`ExpbusLauncherConf`.
        cpu_slots: see :class:`ExpbusLauncherConf`.
        tail_lines: see :class:`ExpbusLauncherConf`.
    """

    def __init__(self, num_gpus: int = -1, jobs_per_gpu: int = 1, cpu_slots: int | None = None,
                 tail_lines: int = 40) -> None:
        self.num_gpus = num_gpus
        self.jobs_per_gpu = jobs_per_gpu
        self.cpu_slots = cpu_slots
        self.tail_lines = tail_lines
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep what ``launch`` needs (Hydra's launcher protocol)."""
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the jobs; every job runs even when some fail.

        Args:
            job_overrides: each job's overrides.
            initial_job_idx: the first job's number in the sweep.

        Returns:
            One ``JobReturn`` per job, in order; a failed one holds a :class:`JobFailedError`
            (with its log tail), which Hydra raises for the first failure, exiting non-zero.
        """
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        slots = plan_slots(self.num_gpus, self.jobs_per_gpu, self.cpu_slots)
        on_gpus = slots[0].gpu is not None
        log.info("expbus launcher: %d job(s) on %d %s slot(s); sweep dir %s", len(job_overrides), len(slots),
                 "GPU" if on_gpus else "CPU", sweep_dir)
        prepared = [self._prepare(initial_job_idx + i, list(overrides), sweep_dir, on_gpus=on_gpus,
                                  threads=None if on_gpus else _threads_per_slot(len(slots)))
                    for i, overrides in enumerate(job_overrides)]
        jobs = [job for job, _ in prepared]
        run_pool(jobs, slots, StatusLine())
        table = summary_table(jobs)
        (sweep_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
        (sweep_dir / JOBS_DIR / f"summary_{initial_job_idx}.txt").write_text(table + "\n", encoding="utf-8")
        log.info("expbus sweep summary:\n%s", table)
        return [self._job_return(job, cfg) for job, cfg in prepared]

    def _prepare(self, num: int, overrides: list[str], sweep_dir: Path, *, on_gpus: bool,
                 threads: int | None) -> tuple[Job, DictConfig]:
        """Compose the job's config as Hydra's basic launcher does, record it, and build its command."""
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
            sweep_config.hydra.job.num = num
        # ${hydra:...} in the job's config resolves against this job's Hydra node.
        HydraConfig.instance().set_config(sweep_config)
        job_dir = sweep_dir / JOBS_DIR / f"job_{num}"
        config_path = job_dir / "config.yaml"
        write_job_config(sweep_config, config_path)
        env_set = OmegaConf.to_container(sweep_config.hydra.job.env_set, resolve=True)
        assert isinstance(env_set, dict)
        job = Job(num=num, overrides=overrides,
                  command=child_command(num, overrides, pin_devices=on_gpus and _has_trainer(sweep_config)),
                  env=child_env({str(k): v for k, v in env_set.items()}, gpu=None, gpus_exist=on_gpus, threads=threads),
                  log_path=job_dir / "job.log", config_path=config_path)
        return job, sweep_config

    def _job_return(self, job: Job, sweep_config: DictConfig) -> JobReturn:
        """Hydra's record of a finished job; a failed one carries its error for Hydra to raise."""
        ret = JobReturn(overrides=job.overrides, hydra_cfg=sweep_config, working_dir=str(Path.cwd()),
                        task_name=str(sweep_config.hydra.job.name))
        with open_dict(sweep_config):
            task_cfg = OmegaConf.masked_copy(sweep_config, [str(k) for k in sweep_config if k != "hydra"])
        ret.cfg = task_cfg
        if job.returncode == 0:
            ret.status = JobStatus.COMPLETED
            ret.return_value = None  # the task ran in another process; its value stays there
        else:
            ret.status = JobStatus.FAILED
            ret.return_value = failure(job, self.tail_lines)
        return ret


def _has_trainer(cfg: DictConfig) -> bool:
    """The job's config has a ``trainer:`` block, whose ``devices`` the launcher may set."""
    return isinstance(cfg.get("trainer"), DictConfig)


def _threads_per_slot(slots: int) -> int:
    """Cores per CPU slot, so that CPU jobs together use the machine without oversubscribing it."""
    return max(1, (os.cpu_count() or 1) // slots)
