"""Where sweep jobs may run: one slot per job that can run at once, on a GPU or on the CPU."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

__all__ = ["Slot", "plan_slots", "visible_gpus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """A place one job runs.

    Attributes:
        index: the slot's number (for the status line).
        gpu: the ``CUDA_VISIBLE_DEVICES`` entry of its GPU, or ``None`` for a CPU slot.
    """

    index: int
    gpu: str | None = None

    @property
    def label(self) -> str:
        """``gpu<id>`` or ``cpu<index>``."""
        return f"gpu{self.gpu}" if self.gpu is not None else f"cpu{self.index}"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (ids or UUIDs)."""
    # The entries themselves, not 0..n-1: a child pinned to "3" must see the parent's GPU 3.
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_slots(num_gpus: int, jobs_per_gpu: int, cpu_slots: int | None) -> list[Slot]:
    """The slots of a sweep.

    Args:
        num_gpus: GPUs to use; ``-1`` is every visible one, ``0`` runs on CPU slots.
        jobs_per_gpu: jobs sharing one GPU at a time.
        cpu_slots: jobs at once without GPUs; ``None`` is half the cores (at least one).

    Returns:
        The slots, GPUs interleaved so that the first jobs spread over every GPU.

    Raises:
        ValueError: a count below its minimum.
    """
    if jobs_per_gpu < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu must be >= 1 (got {jobs_per_gpu})")
    if cpu_slots is not None and cpu_slots < 1:
        raise ValueError(f"hydra.launcher.cpu_slots must be >= 1 or null for half the cores (got {cpu_slots})")
    gpus = visible_gpus() if num_gpus != 0 else []
    if num_gpus > 0:
        if num_gpus > len(gpus):
            log.warning("hydra.launcher.num_gpus=%d but %d GPU(s) are visible; using %d", num_gpus, len(gpus),
                        len(gpus))
        gpus = gpus[:num_gpus]
    if gpus:
        return [Slot(i, gpu) for i, gpu in enumerate(g for _ in range(jobs_per_gpu) for g in gpus)]
    count = cpu_slots if cpu_slots is not None else max(1, (os.cpu_count() or 2) // 2)
    return [Slot(i) for i in range(count)]
