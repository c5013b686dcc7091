"""``hydra_runner``: NeMo's Hydra entry-point decorator, with each job's run state kept apart from the next one's."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["NO_CHDIR", "RUNNER_OVERRIDES", "hydra_runner"]

#: What NeMo's runner appends to the command line: no ``.hydra`` subdir, logging to stdout only,
#: and the run dir is the working directory (exp_manager owns the experiment folders).
RUNNER_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=.")

#: Added unless the command line sets it: without it, Hydra's basic launcher moves each sweep job
#: into its sweep folder, which exp_manager refuses (relative paths and DDP break).
NO_CHDIR = "hydra.job.chdir=false"

# Variables one job leaves behind that would steer the next job run in the same process
# (Hydra's basic launcher runs every job of a sweep in one process).
_PER_JOB_ENV = ("NEMO_EXPM_VERSION",)


def _register_resolvers() -> None:
    """The resolvers NeMo's configs use (``${multiply:a,b}``, ``${sum:a,b}``)."""
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)
    OmegaConf.register_new_resolver("sum", lambda x, y: x + y, replace=True)


_register_resolvers()


@contextmanager
def _job_environment() -> Iterator[None]:
    """Restore the per-job variables after a job, so each job picks its own version and folders."""
    saved = {name: os.environ.get(name) for name in _PER_JOB_ENV}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def hydra_runner(
    config_path: str | None = ".",
    config_name: str | None = None,
    schema: Any | None = None,
) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """Decorate a ``main(cfg)`` as NeMo's ``hydra_runner`` does.

    The command line gets ``hydra.output_subdir=null``, ``hydra/job_logging=stdout`` and
    ``hydra.run.dir=.`` (see :data:`RUNNER_OVERRIDES`), and ``hydra.job.chdir=false`` unless it
    sets that itself (so sweeps under Hydra's basic launcher stay in the working directory, as
    exp_manager requires); the ``multiply`` and ``sum`` resolvers are
    registered, and ``-m`` runs a sweep with whichever ``hydra/launcher`` the config names
    (``expbus`` or NeMo's ``nemo_launcher``, ``submitit_local``/``submitit_slurm`` and ``ray``
    run each job in its own process; those two ship the task to it with cloudpickle). Every
    job's ``exp_manager`` call makes its own bus, journal and sinks; between jobs run in one
    process (the basic launcher, a reused Ray worker) the variables a job publishes
    (``NEMO_EXPM_VERSION``) are restored.

    Args:
        config_path: the config folder, relative to the decorated function's file.
        config_name: the primary config's name.
        schema: a structured config stored under ``config_name`` for validation and defaults.

    Returns:
        The decorator; the decorated function also accepts a ready ``DictConfig`` and then
        calls the task directly.
    """

    def decorator(task_function: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(task_function)
        def task(cfg: DictConfig) -> Any:
            with _job_environment():
                return task_function(cfg)

        @functools.wraps(task_function)
        def wrapper(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is not None:
                return task_function(cfg_passthrough)
            from hydra._internal.utils import _run_hydra, get_args_parser

            _register_launcher()
            parser = get_args_parser()
            args = parser.parse_args()
            chdir = [] if any(o.startswith("hydra.job.chdir=") for o in args.overrides) else [NO_CHDIR]
            args.overrides = [*args.overrides, *RUNNER_OVERRIDES, *chdir]
            if schema is not None:
                _store_schema(schema, args.config_name or config_name)
            # _run_hydra parses the arguments again through this method: hand it ours.
            args.parse_args = lambda *_a, **_k: args
            _run_hydra(args=args, args_parser=parser, task_function=task, config_path=config_path,
                       config_name=config_name)
            return None

        return wrapper

    return decorator


def _register_launcher() -> None:
    """Register the ``expbus`` launcher with Hydra directly, as NeMo's launcher does.

    Hydra 1.3 finds plugins by listing the ``hydra_plugins`` namespace package, which fails
    for setuptools' default (PEP 660) editable installs; importing the module still works.
    """
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.expbus_launcher.launcher import ExpbusLauncher
    except ImportError:  # hydra_plugins not installed: Hydra's own discovery decides
        return
    Plugins.instance().register(ExpbusLauncher)


def _store_schema(schema: Any, name: str | None) -> None:
    """Register ``schema`` under the primary config's name (a path in ``--config-name`` would bypass it)."""
    from hydra.core.config_store import ConfigStore

    if name is None:
        return
    path, base = os.path.split(name)
    if path:
        sys.stderr.write("ERROR Cannot set config file path using `--config-name` when using schema. Please set "
                         "path using `--config-path` and file name using `--config-name` separately.\n")
        sys.exit(1)
    ConfigStore.instance().store(name=base, node=schema)
