"""The training workloads of the step-overhead benchmarks, and the per-step clock.

Imports torch and Lightning only (no logger client, no expbus sink), so that a process can
import it, fork, and give every configuration a child whose logging state is untouched.

Workloads (``training_step`` of :class:`BenchModule`):

* ``a``: a step that releases the GIL, as a GPU step does: ``torch.mm`` of two ``n x n``
  float32 buffers (``n`` sized by :func:`calibrate_matmul` so that it takes about 2 ms on
  one thread), then the tiny step of ``b``. torch releases the GIL for the whole matmul.
* ``b``: a Python-bound tiny step: ``Linear(32, 32)`` on a batch of 8, MSE loss, SGD.

Both log ``K`` metrics per step with ``self.log(name, loss, on_step=True, on_epoch=False)``,
one call per metric, so the module's own code is identical in every configuration and
the difference between configurations is what the loggers cost.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import median

__all__ = [
    "BenchModule",
    "StepClock",
    "TapToggle",
    "calibrate_matmul",
    "make_loader",
    "metric_names",
    "thread_cpu_ns",
]

_perf = time.perf_counter_ns
_thread_time = time.thread_time_ns


def metric_names(k: int) -> list[str]:
    """The ``K`` metric names a module logs: ``train/m000`` ... ."""
    return [f"train/m{i:03d}" for i in range(k)]


class BenchModule(pl.LightningModule):
    """A module whose ``training_step`` is workload ``a`` or ``b`` and logs ``k`` metrics.

    Args:
        workload: ``"a"`` (a GIL-releasing matmul of ``matmul_n`` plus the tiny step) or ``"b"``.
        k: metrics logged per step.
        matmul_n: size of the square matmul of workload ``a``.
    """

    mm_a: torch.Tensor
    mm_b: torch.Tensor

    def __init__(self, workload: str, k: int, matmul_n: int = 0) -> None:
        super().__init__()
        if workload not in ("a", "b"):
            raise ValueError(f"workload must be 'a' or 'b', got {workload!r}")
        self.workload = workload
        self.names = metric_names(k)
        self.lin = nn.Linear(32, 32)
        self.matmul = workload == "a"
        if self.matmul:
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("mm_a", torch.randn(matmul_n, matmul_n, generator=gen), persistent=False)
            self.register_buffer("mm_b", torch.randn(matmul_n, matmul_n, generator=gen), persistent=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The workload, then ``K`` calls of ``self.log``."""
        if self.matmul:
            torch.mm(self.mm_a, self.mm_b)  # ~2 ms with the GIL released, as a device step would be
        x, y = batch
        loss = F.mse_loss(self.lin(x), y)
        log = self.log
        for name in self.names:
            log(name, loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def make_loader(steps: int, device: str = "cpu") -> DataLoader[Any]:
    """Exactly ``steps`` batches of 8 x 32 inputs and targets (one epoch), in order."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * steps, 32, generator=gen, device="cpu").to(device)
    y = torch.randn(8 * steps, 32, generator=gen, device="cpu").to(device)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def thread_cpu_ns() -> dict[int, tuple[str, int]]:
    """CPU time (ns) of every live Python thread: ``{ident: (name, ns)}`` (Linux clocks)."""
    out: dict[int, tuple[str, int]] = {}
    for thread in threading.enumerate():
        ident = thread.ident
        if ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(ident)
            out[ident] = (thread.name, time.clock_gettime_ns(clock))
        except (AttributeError, OSError, ProcessLookupError):
            continue
    return out


class StepClock(pl.Callback):
    """Per-step wall clock and per-thread CPU, recorded from the training thread.

    ``starts`` holds ``perf_counter_ns`` at every ``on_train_batch_start``: the interval
    between two consecutive starts is one whole step, including what Lightning's logger
    connector does after ``on_train_batch_end`` (where Lightning's loggers run).
    ``cpu_starts`` holds the training thread's own CPU clock (``thread_time_ns``) at the same
    moments, so that a step's wall time splits into the CPU the thread spent and the time it
    waited (for the GIL, or for a core), step by step. ``cpu_start``
    and ``cpu_end`` are :func:`thread_cpu_ns` snapshots at ``on_train_start`` and
    ``on_train_end``; ``train_start_ns`` and ``train_end_ns`` are when they ran (the end is
    the start of the teardown: loggers finalised, the bus closed). The training thread's wall
    time minus its CPU time over that window is the time it waited: for the GIL, or for a core.

    ``stop_after_s`` (when above 0) ends training once that many seconds have passed since the
    first step after ``warmup``: a cell then lasts the same time in every configuration, long
    enough that batched sinks write several times during it, whatever a step costs.
    """

    def __init__(self, warmup: int = 0, stop_after_s: float = 0.0) -> None:
        super().__init__()
        self.warmup = warmup
        self.stop_after_ns = int(stop_after_s * 1e9)
        self.starts: list[int] = []
        self.cpu_starts: list[int] = []
        self.cpu_start: dict[int, tuple[str, int]] = {}
        self.cpu_end: dict[int, tuple[str, int]] = {}
        self.train_end_ns = 0
        self.train_start_ns = 0
        self.main_ident = threading.get_ident()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.main_ident = threading.get_ident()
        self.cpu_start = thread_cpu_ns()
        self.train_start_ns = _perf()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(_perf())
        self.cpu_starts.append(_thread_time())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        starts = self.starts
        warmup = self.warmup
        if self.stop_after_ns and len(starts) > warmup + 1 and starts[-1] - starts[warmup] >= self.stop_after_ns:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end_ns = _perf()
        self.cpu_end = thread_cpu_ns()

    def intervals_us(self, warmup: int) -> list[float]:
        """Whole-step durations in µs, the first ``warmup`` steps dropped."""
        s = self.starts
        return [(b - a) / 1e3 for a, b in zip(s[warmup:], s[warmup + 1 :], strict=False)]

    def cpu_intervals_us(self, warmup: int) -> list[float]:
        """The training thread's own CPU µs in each whole step, the first ``warmup`` steps dropped."""
        s = self.cpu_starts
        return [(b - a) / 1e3 for a, b in zip(s[warmup:], s[warmup + 1 :], strict=False)]

    def thread_cpu_us(self) -> dict[str, Any]:
        """CPU µs spent during training by the training thread and by every other thread, by name."""
        main = 0.0
        others: dict[str, float] = {}
        for ident, (name, end) in self.cpu_end.items():
            start = self.cpu_start.get(ident, (name, 0))[1]
            delta = (end - start) / 1e3
            if ident == self.main_ident:
                main = delta
            else:
                others[name] = others.get(name, 0.0) + delta
        return {"main": main, "others": others}


def calibrate_matmul(target_ms: float = 2.0, reps: int = 30) -> tuple[int, float]:
    """The size ``n`` whose ``torch.mm`` of two ``n x n`` float32 matrices takes about ``target_ms``.

    Returns ``(n, measured median ms)``; run it with the thread count the benchmark uses.
    """
    best: tuple[int, float] | None = None
    for n in range(256, 1025, 32):
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        for _ in range(3):
            torch.mm(a, b)
        samples = []
        for _ in range(reps):
            t0 = _perf()
            torch.mm(a, b)
            samples.append((_perf() - t0) / 1e6)
        samples.sort()
        ms = samples[len(samples) // 2]
        if best is None or abs(ms - target_ms) < abs(best[1] - target_ms):
            best = (n, ms)
        if ms > target_ms:
            break
    assert best is not None
    return best


class TapToggle(pl.Callback):
    """Within one run, publishes in alternate windows of ``window_s`` seconds: the bridge's tap on, then off.

    The median step of the *on* windows against that of the *off* windows, in the same process
    and minutes, is expbus's per-step cost with the machine's drift and the process's own speed
    (which differ by up to 20% from one fresh process to the next on the 2-core VM) cancelled.
    The bus, its threads and the sink workers exist in both windows; only what publishing
    starts (the bridge's event, the bus's drain, the sinks' writes) differs, and a sink's batch
    (every ``batch_delay``) can land in either window. Installs and removes the tap of
    ``bridge`` (an expbus ``BridgeCallback``; a private attribute of our own class) in
    ``on_train_batch_start``, before Lightning logs that step's metrics; put it after
    :class:`StepClock` and the bridge in ``callbacks``.
    """

    def __init__(self, bridge: Any, window_s: float) -> None:
        super().__init__()
        self.bridge = bridge
        self.window_ns = int(window_s * 1e9)
        self.on: list[bool] = []  # per started step: whether its metrics were published
        self.toggled: list[bool] = []  # per started step: whether the tap changed at its start
        self._window_start = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        tap = self.bridge._tap
        now = _perf()
        want = tap.installed
        if not self.on:
            self._window_start = now
            want = True
        elif now - self._window_start >= self.window_ns:
            self._window_start = now
            want = not want
        changed = want != tap.installed
        if changed:
            tap.install() if want else tap.uninstall()
        self.on.append(want)
        self.toggled.append(changed)

    def published_steps(self) -> int:
        """How many steps had their metrics published (what every backend must hold)."""
        return sum(self.on)

    def split(self, walls: list[float], cpus: list[float], warmup: int) -> dict[str, float]:
        """Median wall and CPU µs of the on and off steps after ``warmup`` (a step that toggled left out)."""
        on_wall: list[float] = []
        off_wall: list[float] = []
        on_cpu: list[float] = []
        off_cpu: list[float] = []
        for index, (wall, cpu) in enumerate(zip(walls, cpus, strict=False)):
            step = warmup + index
            if step >= len(self.on) or self.toggled[step]:
                continue
            if self.on[step]:
                on_wall.append(wall)
                on_cpu.append(cpu)
            else:
                off_wall.append(wall)
                off_cpu.append(cpu)
        if not on_wall or not off_wall:
            return {}
        return {
            "on_median_us": median(on_wall), "off_median_us": median(off_wall),
            "on_cpu_median_us": median(on_cpu), "off_cpu_median_us": median(off_cpu),
            "on_steps": float(len(on_wall)), "off_steps": float(len(off_wall)),
        }
