"""Taps Lightning's one funnel of logged metrics so that ``self.log`` reaches the bus even with ``logger=False``.

Why a wrapper on a private object: everything a LightningModule logs with ``self.log`` (per
step, honouring ``log_every_n_steps``; at epoch end; in validation and test) reaches loggers
through a single call, ``trainer._logger_connector.log_metrics(metrics, step)``. That call
returns early when ``trainer.loggers`` is empty, and otherwise converts every tensor with
``.item()`` on the training thread (a device sync per value). No public hook sees those
values, so the tap replaces the method *on the connector instance* for the duration of a
run and restores it at teardown; the original still runs after the tap, so user-supplied
Lightning loggers keep working unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from expbus.bus import Bus, Metrics, now

__all__ = ["MetricsTap", "metrics_event"]

log = logging.getLogger("expbus.trainer_bridge")

_MISSING: Any = object()


def metrics_event(trainer: Any, metrics: Mapping[str, Any], step: int | None) -> Metrics:
    """The ``Metrics`` event for one ``log_metrics`` call, with the step Lightning would log.

    As in ``_LoggerConnector.log_metrics``: an explicit ``step`` argument wins; else a
    ``step`` key in the metrics (removed from the values); else the count of optimizer
    steps taken (``fit_loop.epoch_loop._batches_that_stepped``). ``epoch`` is always the
    current epoch. Values stay tensors, detached but not converted: the bus resolves them in
    its own thread.
    """
    values: dict[str, Any]
    if step is None:
        step_value = metrics.get("step")
        if step_value is not None:
            # A logged ``step`` orders the record, so it is read here (Lightning does the same);
            # modules rarely log one, and it is one value, not one per metric.
            step = step_value if type(step_value) is int else int(step_value)
            values = {k: (v.detach() if getattr(v, "requires_grad", False) else v)
                      for k, v in metrics.items() if k != "step"}
            return Metrics(time=now(), step=step, epoch=trainer.current_epoch, values=values)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
    # ``detach`` only where a value carries a graph (``self.log(..., enable_graph=True)``):
    # holding the graph until the bus thread reads the value would keep activations alive.
    values = {k: (v.detach() if getattr(v, "requires_grad", False) else v) for k, v in metrics.items()}
    return Metrics(time=now(), step=step, epoch=trainer.current_epoch, values=values)


class MetricsTap:
    """Publishes every metrics dict Lightning logs as one ``Metrics`` event, then lets Lightning continue.

    Args:
        trainer: the ``lightning.pytorch.Trainer`` whose logged metrics to publish.
        bus: an open bus; the tap is removed before it closes.
    """

    def __init__(self, trainer: Any, bus: Bus) -> None:
        self._trainer = trainer
        self._bus = bus
        self._connector: Any = None
        self._wrapper: Any = None
        self._previous: Any = _MISSING
        self._failed = False

    @property
    def installed(self) -> bool:
        """Whether the tap is in place."""
        return self._wrapper is not None

    def install(self) -> None:
        """Wrap ``trainer._logger_connector.log_metrics`` (idempotent)."""
        if self._wrapper is not None:
            return
        connector = self._trainer._logger_connector
        original = connector.log_metrics  # the class's method, or whoever wrapped it before us
        previous = connector.__dict__.get("log_metrics", _MISSING)
        trainer = self._trainer
        bus = self._bus
        tap = self

        def log_metrics(metrics: Any, step: int | None = None) -> None:
            # The per-step cost of expbus: one dict, one event, one deque append.
            if metrics:
                try:
                    bus.publish(metrics_event(trainer, metrics, step))
                except Exception as exc:  # reporting must never break the training step
                    tap._report(exc)
            original(metrics, step)

        log_metrics.__expbus_tap__ = True  # type: ignore[attr-defined]
        connector.log_metrics = log_metrics
        self._connector = connector
        self._previous = previous
        self._wrapper = log_metrics

    def uninstall(self) -> None:
        """Put back what was there before :meth:`install` (idempotent)."""
        connector, wrapper = self._connector, self._wrapper
        if connector is None or wrapper is None:
            return
        self._connector = None
        self._wrapper = None
        if connector.__dict__.get("log_metrics") is not wrapper:
            # Someone wrapped on top of us: leave their wrapper in place; ours then publishes
            # into a closed bus, which is a no-op.
            return
        if self._previous is _MISSING:
            del connector.log_metrics
        else:
            connector.log_metrics = self._previous

    def _report(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            log.error("expbus: could not publish logged metrics: %s: %s", type(exc).__name__, exc)
