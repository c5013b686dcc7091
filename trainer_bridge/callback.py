"""The Lightning callback that runs an expbus bus beside a Trainer: lifecycle, hyperparameters, metrics, checkpoints."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import msgspec

from expbus.bus import (
    Bus,
    Event,
    Hyperparams,
    JournalHealth,
    RunFinished,
    RunStarted,
    Sink,
    SinkHealth,
    now,
)
from expbus.sinks import ExpbusConfig, build_bus, load_config, resolve_run_dir

from ._checkpoints import CheckpointWatcher
from ._hparams import collect_hparams
from ._lightning_metrics import MetricsTap
from ._run_identity import config_for_rank, read_or_create_run_id
from ._tensor_values import resolve_tensor_values

__all__ = ["BridgeCallback"]

log = logging.getLogger("expbus.trainer_bridge")

_Status = Literal["completed", "failed", "interrupted"]


def _root_device_type(trainer: pl.Trainer) -> str:
    """``cuda``, ``mps``, ``cpu``...: where the strategy puts the module (known before it moves there)."""
    try:
        return str(trainer.strategy.root_device.type)
    except Exception:  # a strategy without a root device: resolve value by value
        return "cpu"


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class BridgeCallback(pl.Callback):
    """Sends a Trainer's run to expbus sinks without slowing the training step.

    Attach it to a ``lightning.pytorch.Trainer`` (``logger=False`` is fine: everything the
    module logs with ``self.log`` still reaches the sinks). For each ``fit`` / ``validate`` /
    ``test`` / ``predict`` it opens a bus in ``setup`` and publishes:

    * ``RunStarted`` (run id, host, pid, ranks, run directory, the configuration);
    * ``Hyperparams``: the module's and data module's, as Lightning loggers receive them;
    * ``Metrics`` for every ``log_metrics`` Lightning performs (same steps as a Lightning
      logger, ``log_every_n_steps`` honoured, epoch-end and validation metrics included).
      Values are handed over as detached tensors: they are converted in the bus thread,
      never on the training thread;
    * ``CheckpointSaved`` / ``CheckpointRemoved`` for checkpoint files written and pruned;
    * ``RunFinished``: ``completed``, ``failed`` (with the error) or ``interrupted``.

    The bus is closed (within ``config.bus.close_timeout``) in ``teardown``, or in
    ``on_exception`` when the run raises. Under DDP only global rank 0 delivers to sinks
    (unless a sink sets ``rank_zero_only: false``); every rank journals its own events,
    rank N into ``journal.rankN.msgpack``. The run id is kept in ``run_dir/.expbus/run_id``,
    so a resumed run keeps it.

    Args:
        config: a mapping, a YAML file path, an OmegaConf ``DictConfig`` or an
            :class:`~expbus.sinks.ExpbusConfig`; ``None`` uses the defaults (journal only).
        sinks: extra sink objects keyed by sink id (beside the configured ones).
        run_dir: the run directory; overrides the configuration's.

    Raises:
        ConfigError: the configuration is invalid (raised here, before training starts).
        TypeError: an extra sink has no ``write`` method.
        ValueError: an extra sink id is also a configured sink's id.

    Attributes:
        config: the validated configuration.
        run_dir: the run directory (absolute).
        run_id: the run's id, known once ``setup`` ran.
        journal_path: the journal file of this process, once ``setup`` ran.
        last_stats: every sink's health when the bus last closed.
        last_journal_stats: the journal's health when the bus last closed.
        last_close_ok: whether the last close finished cleanly within its deadline.

    Example::

        trainer = Trainer(logger=False, callbacks=[BridgeCallback("expbus.yaml")])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        config: Any = None,
        *,
        sinks: Mapping[str, Sink] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        resolved = load_config(config)
        if run_dir is not None:
            resolved = msgspec.structs.replace(resolved, run_dir=os.fspath(run_dir))
        self.config: ExpbusConfig = resolved
        # Resolved now so that a bad name fails before training, and the start-time version
        # is the construction time (ranks agree on it: rank 0's is broadcast in ``setup``).
        self.run_dir: Path = Path(os.path.abspath(resolve_run_dir(resolved)))
        extra = dict(sinks or {})
        for sink_id, sink in extra.items():
            if not callable(getattr(sink, "write", None)):
                raise TypeError(f"sinks[{sink_id!r}] ({type(sink).__name__}) has no write(batch) method")
            spec = resolved.sinks.get(sink_id)
            if spec is not None and spec.get("enabled", True) is not False:
                raise ValueError(f"sinks[{sink_id!r}]: the configuration already has a sink with this id")
        self._extra_sinks: dict[str, Sink] = extra
        self.run_id: str | None = None
        self.journal_path: Path | None = None
        self.last_stats: dict[str, SinkHealth] = {}
        self.last_journal_stats: JournalHealth | None = None
        self.last_close_ok: bool | None = None
        self._bus: Bus | None = None
        self._tap: MetricsTap | None = None
        self._watcher: CheckpointWatcher | None = None
        self._finished = False

    # -- state --------------------------------------------------------------------------
    @property
    def bus(self) -> Bus | None:
        """The open bus of the current run, or ``None`` outside ``setup`` ... ``teardown``."""
        return self._bus

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer with its callbacks: the bus (threads, files) stays
        # behind; each process opens its own in ``setup``.
        state = self.__dict__.copy()
        state["_bus"] = None
        state["_tap"] = None
        state["_watcher"] = None
        return state

    def stats(self) -> dict[str, SinkHealth]:
        """Every sink's health: live while the bus is open, else as it was at the last close."""
        bus = self._bus
        return bus.stats() if bus is not None else dict(self.last_stats)

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver and flush everything published so far (waits; not for the training step's hot path).

        Args:
            timeout: seconds to wait at most; ``config.bus.flush_timeout`` by default.

        Returns:
            True when every sink and the journal acknowledged in time; False otherwise or
            when no bus is open.
        """
        bus = self._bus
        if bus is None:
            return False
        return bus.flush(self.config.bus.flush_timeout if timeout is None else timeout)

    def _publish(self, event: Event) -> None:
        bus = self._bus
        if bus is not None:
            bus.publish(event)

    # -- lifecycle ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Open the bus and publish ``RunStarted`` and ``Hyperparams``; start observing metrics and checkpoints.

        Raises:
            SinkOpenError: a sink failed to open (naming it).
        """
        if self._bus is not None:
            return
        rank, world_size = trainer.global_rank, trainer.world_size
        run_id = ""
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_id = read_or_create_run_id(self.run_dir)
        if world_size > 1:
            # Rank 0 decides: processes started separately may disagree on a time-based version.
            run_dir_text, run_id = trainer.strategy.broadcast((str(self.run_dir), run_id), src=0)
            self.run_dir = Path(run_dir_text)
        self.run_id = run_id
        config = config_for_rank(self.config, rank)
        bus = build_bus(
            config,
            run_dir=self.run_dir,
            run_id=run_id,
            global_rank=rank,
            world_size=world_size,
            extra_sinks=self._extra_sinks,
            # On an accelerator, one device-to-host copy per drain instead of one per value;
            # on the CPU one ``item()`` per value is cheaper than stacking (measured).
            value_resolver=resolve_tensor_values if _root_device_type(trainer) != "cpu" else None,
        )
        bus.open()
        self._bus = bus
        self._finished = False
        self.journal_path = bus.journal_path
        bus.publish(
            RunStarted(
                time=now(),
                run_id=run_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                global_rank=rank,
                local_rank=trainer.local_rank,
                world_size=world_size,
                run_dir=str(self.run_dir),
                config=msgspec.to_builtins(config),
            )
        )
        try:
            params = collect_hparams(trainer)
        except Exception as exc:  # odd hyperparameters must not stop the run
            log.error("expbus: could not collect hyperparameters: %s: %s", type(exc).__name__, exc)
            params = None
        if params is not None:
            bus.publish(Hyperparams(time=now(), params=params))
        self._tap = MetricsTap(trainer, bus)
        self._tap.install()
        if trainer.is_global_zero:
            self._watcher = CheckpointWatcher(trainer, self._publish)
            self._watcher.install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Publish ``RunFinished`` (completed, or interrupted) and close the bus."""
        self._sync_checkpoints(force=True)
        self._finish(trainer, "interrupted" if trainer.interrupted else "completed")
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Publish ``RunFinished`` (failed with the error, or interrupted) and close the bus.

        Lightning does not call ``teardown`` when ``fit`` raises, so the bus closes here.
        """
        self._sync_checkpoints(force=True)
        interrupted = isinstance(exception, (KeyboardInterrupt, SystemExit))  # SystemExit: SIGTERM
        self._finish(trainer, "interrupted" if interrupted else "failed", _error_text(exception))
        self._close()

    def _finish(self, trainer: pl.Trainer, status: _Status, error: str | None = None) -> None:
        if self._finished or self._bus is None:
            return
        self._finished = True
        self._bus.publish(RunFinished(time=now(), status=status, error=error, step=trainer.global_step))

    def _close(self) -> None:
        bus = self._bus
        if bus is None:
            return
        if self._tap is not None:
            self._tap.uninstall()
            self._tap = None
        if self._watcher is not None:
            self._watcher.uninstall()
            self._watcher = None
        self._bus = None
        self.last_close_ok = bus.close(self.config.bus.close_timeout)
        self.last_stats = bus.stats()
        self.last_journal_stats = bus.journal_stats()

    # -- checkpoints ----------------------------------------------------------------------
    def _sync_checkpoints(self, force: bool = False) -> None:
        watcher = self._watcher
        if watcher is not None and (force or watcher.dirty):
            watcher.scan()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the checkpoints a resumed run starts with (they are not new)."""
        if self._watcher is not None:
            self._watcher.seed()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Report checkpoints pruned after the last save (a flag test otherwise)."""
        watcher = self._watcher
        if watcher is not None and watcher.dirty:
            watcher.scan()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report checkpoints pruned after the last save."""
        self._sync_checkpoints()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report checkpoints pruned after the last save."""
        self._sync_checkpoints()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report checkpoints pruned after the last save."""
        self._sync_checkpoints()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report checkpoints pruned after the last save."""
        self._sync_checkpoints()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report checkpoints pruned after the last save."""
        self._sync_checkpoints()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report checkpoints pruned after the last save."""
        self._sync_checkpoints()

    def __repr__(self) -> str:
        state = "open" if self._bus is not None else "idle"
        return f"BridgeCallback(run_dir={str(self.run_dir)!r}, sinks={sorted(self.config.sinks)}, {state})"
