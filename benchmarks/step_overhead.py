"""What logging costs the training step: expbus side by side with Lightning's own loggers.

What it measures
    Real ``Trainer.fit`` runs (CPU, ``torch.set_num_threads(1)`` so that the machine's other
    core is free for logging threads and background processes) of
    :class:`benchmarks._workloads.BenchModule`:

    * workload ``a``: a step that releases the GIL, as a GPU step does (a ``torch.mm`` sized
      to about 2 ms on this machine, then a tiny Linear step);
    * workload ``b``: a Python-bound tiny step (``Linear(32, 32)`` on a batch of 8);

    each logging ``K`` in {1, 10, 100} metrics every step (``self.log`` once per metric,
    ``log_every_n_steps=1``). Configurations:

    * ``none``: ``logger=False``, no callbacks (the module still calls ``self.log``);
    * Lightning's own loggers, one at a time and all together: ``CSVLogger``,
      ``TensorBoardLogger``, ``MLFlowLogger`` on sqlite (MLflow 3.x refuses the file store),
      ``WandbLogger(offline=True)``;
    * expbus: ``BridgeCallback`` with ``logger=False`` and the same backends as sinks, one at a
      time and all together (plus ``jsonl``, ``dllogger``), each sink where its default puts it
      (``workers:``); the journal is on in every expbus configuration (it is the default), and
      ``expbus: journal only`` shows its floor, i.e. what the training process would still pay
      if every sink ran in another process;
    * expbus with ``workers`` forced (``bus.workers``): every sink on a thread of the training
      process (``E:all:thread``) or in a worker process of its own (``E:all:process``). Any
      expbus configuration takes a ``:thread`` or ``:process`` suffix on the command line
      (``--configs E:mlflow:process``), see :func:`describe`.

    W&B runs with the same settings for Lightning's logger and expbus's sink: offline,
    console capture off, system-metrics sampling and machine-info probing off (so that
    wandb-core's sampler does not compete for the two cores).

    Each configuration runs in a fresh process: the benchmark process imports torch and
    Lightning only (no logger client, no expbus), then forks one child per configuration and
    repeat; the child runs every (workload, K) cell with new loggers or a new bridge and a new
    run directory. Repeats run the configurations in alternating order (A B C ... C B A ...),
    so that drift of the machine's load hits all of them alike.

    Per step: ``perf_counter_ns`` at every ``on_train_batch_start``; a step is the interval
    between two consecutive starts, so it includes what Lightning's logger connector does
    after ``on_train_batch_end`` (where Lightning's loggers run). Warm-up steps are dropped.

Figures
    Per cell: median, mean and p99 step time; overhead against ``none`` in µs and as a ratio
    (the median is what the targets name; the mean keeps the periodic stalls, e.g. a sink
    writing a batch every ``batch_delay``, that the median hides); expbus's overhead as a
    fraction of Lightning's for the same backends; time to flush at close (``on_train_end``
    until ``fit`` returns, plus ``wandb.finish()`` for Lightning's ``WandbLogger``, which leaves
    its run open); the CPU time other threads of the training process used per step (bus and
    sink threads, TensorBoard's writer thread, wandb's threads): the part of it spent in Python
    holds the GIL that the training thread needs (C code that releases the GIL, such as
    sqlite's, runs on the other core); the CPU of the child processes that exited during the
    run (``workers: process`` sink workers, start-up and imports included), which no longer
    holds the training process's GIL but still needs a core.

Data arrival
    Every cell reads its backends back after the run: CSV rows, TensorBoard scalars
    (``EventAccumulator``), MLflow metric points (metric history and the sqlite table), W&B
    offline run records (:func:`expbus.sinks.wandb.read_offline_history`), jsonl lines,
    DLLogger lines and journal records; each must hold every step with all ``K`` metrics, and
    expbus's sinks must report nothing dropped or failed. A failed check exits with status 1.

Run alone: ``python -m benchmarks.step_overhead [--quick] [--repeats 2] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

# torch and Lightning are imported before any child is forked (and nothing else heavy).
import torch

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402

from benchmarks._common import Checks, finish, median, percentile  # noqa: E402
from benchmarks._workloads import (  # noqa: E402
    BenchModule,
    StepClock,
    TapToggle,
    calibrate_matmul,
    make_loader,
    metric_names,
)

BACKENDS = ["csv", "tensorboard", "mlflow", "wandb"]
BACKEND_LABELS = {"csv": "CSV", "tensorboard": "TensorBoard", "mlflow": "MLflow (sqlite)", "wandb": "W&B offline"}

# key -> (label, family, backends)
CONFIGS: dict[str, tuple[str, str, list[str]]] = {
    "none": ("no logging", "none", []),
    "L:csv": ("Lightning CSVLogger", "lightning", ["csv"]),
    "L:tensorboard": ("Lightning TensorBoardLogger", "lightning", ["tensorboard"]),
    "L:mlflow": ("Lightning MLFlowLogger (sqlite)", "lightning", ["mlflow"]),
    "L:wandb": ("Lightning WandbLogger (offline)", "lightning", ["wandb"]),
    "L:all": ("Lightning: CSV + TB + MLflow + W&B", "lightning", list(BACKENDS)),
    "E:journal": ("expbus: journal only", "expbus", []),
    "E:csv": ("expbus: csv sink", "expbus", ["csv"]),
    "E:tensorboard": ("expbus: tensorboard sink", "expbus", ["tensorboard"]),
    "E:mlflow": ("expbus: mlflow sink (sqlite)", "expbus", ["mlflow"]),
    "E:wandb": ("expbus: wandb sink (offline)", "expbus", ["wandb"]),
    "E:all": ("expbus: CSV + TB + MLflow + W&B + jsonl + dllogger", "expbus", [*BACKENDS, "jsonl", "dllogger"]),
    "E:all:thread": ("expbus: CSV + TB + MLflow + W&B + jsonl + dllogger, workers: thread", "expbus",
                     [*BACKENDS, "jsonl", "dllogger"]),
    "E:all:process": ("expbus: CSV + TB + MLflow + W&B + jsonl + dllogger, workers: process", "expbus",
                      [*BACKENDS, "jsonl", "dllogger"]),
}
# expbus configuration -> the Lightning configuration with the same backends.
PAIRS = {"E:csv": "L:csv", "E:tensorboard": "L:tensorboard", "E:mlflow": "L:mlflow", "E:wandb": "L:wandb",
         "E:all": "L:all"}
WORKER_SUFFIXES = ("thread", "process")


def _forced(config: str) -> tuple[str, str | None]:
    """``E:mlflow:process`` -> (``E:mlflow``, ``process``); other keys -> (key, None)."""
    base, _, workers = config.rpartition(":")
    if workers in WORKER_SUFFIXES and base in CONFIGS and CONFIGS[base][1] == "expbus":
        return base, workers
    return config, None


def describe(config: str) -> tuple[str, str, list[str]]:
    """(label, family, backends) of a configuration key, including the ``:thread`` / ``:process`` variants.

    Raises:
        KeyError: an unknown configuration.
    """
    if config in CONFIGS:
        return CONFIGS[config]
    base, workers = _forced(config)
    if workers is None:
        raise KeyError(config)
    label, family, backends = CONFIGS[base]
    return f"{label}, workers: {workers}", family, backends


def workers_of(config: str) -> str | None:
    """The ``bus.workers`` a configuration forces (``None``: each sink's default)."""
    return _forced(config)[1]


def peer_of(config: str) -> str | None:
    """The Lightning configuration with the same backends as an expbus configuration."""
    return PAIRS.get(config) or PAIRS.get(_forced(config)[0])


QUICK_CONFIGS = ["none", "L:all", "E:all", "E:all:process"]
BASELINE_EVERY = 4  # run ``none`` again after this many other configurations
# Run --repeats times; the per-backend configurations run --single-repeats times.
CORE_CONFIGS = ["none", "L:all", "E:journal", "E:all", "E:all:thread", "E:all:process"]
WORKLOADS = ["a", "b"]
# (workload, K) -> (warm-up steps, most measured steps). A full run measures each cell for CELL_SECONDS
# of training (StepClock stops it), three times the default batch_delay (2 s), so that every sink writes
# several batches during training in every configuration: a shorter cell would time expbus before its
# sinks first write. The step caps only bound the data loader (K=100 steps cost ~27 ms in Lightning's
# self.log alone; a K=1 tiny step ~1 ms).
FULL_STEPS = {("a", 1): (20, 6000), ("a", 10): (10, 3000), ("a", 100): (5, 600),
              ("b", 1): (30, 20000), ("b", 10): (10, 5000), ("b", 100): (5, 600)}
CELL_SECONDS = 6.0
QUICK_STEPS = {("a", 1): (5, 30), ("a", 10): (5, 30), ("b", 1): (5, 30), ("b", 10): (5, 30)}

WANDB_SETTINGS: dict[str, Any] = {
    "console": "off", "silent": True, "x_disable_stats": True, "x_disable_machine_info": True,
}

_perf = time.perf_counter_ns


# -- the child: one configuration, every cell ------------------------------------------------
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mlflow", "alembic", "wandb", "expbus"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _lightning_loggers(backends: list[str], cell_dir: Path, cell: str, db: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    loggers: list[Any] = []
    for backend in backends:
        if backend == "csv":
            loggers.append(CSVLogger(save_dir=str(cell_dir), name="csv", version=0))
        elif backend == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(cell_dir), name="tb", version=0))
        elif backend == "mlflow":
            loggers.append(MLFlowLogger(experiment_name=f"lightning-{cell}", run_name=cell,
                                        tracking_uri=f"sqlite:///{db}"))
        elif backend == "wandb":
            import wandb

            loggers.append(WandbLogger(save_dir=str(cell_dir / "wandb-l"), offline=True, project="expbus-bench",
                                       name=cell, settings=wandb.Settings(**WANDB_SETTINGS)))
    return loggers


def _expbus_sinks(backends: list[str], cell: str, db: Path) -> dict[str, dict[str, Any]]:
    sinks: dict[str, dict[str, Any]] = {}
    for backend in backends:
        if backend == "mlflow":
            sinks["mlflow"] = {"type": "mlflow", "tracking_uri": f"sqlite:///{db}",
                               "experiment_name": f"expbus-{cell}", "run_name": cell}
        elif backend == "wandb":
            sinks["wandb"] = {"type": "wandb", "offline": True, "project": "expbus-bench", "name": cell,
                              "settings": dict(WANDB_SETTINGS)}
        else:
            sinks[backend] = {"type": backend}
    return sinks


def _check_backends(checks: Checks, tag: str, family: str, backends: list[str], cell_dir: Path, run_dir: Path,
                    cell: str, db: Path, names: list[str], steps: int) -> dict[str, int]:
    """Read every backend of the cell back; one check per backend; returns values found per backend."""
    from benchmarks import _readback as rb

    found: dict[str, int] = {}
    for backend in [*backends, *(["journal"] if family == "expbus" else [])]:
        try:
            if backend == "csv":
                csv_dir = cell_dir / "csv" / "version_0" if family == "lightning" else run_dir
                counted = rb.count_csv(csv_dir / "metrics.csv", names)
            elif backend == "tensorboard":
                tb_dir = cell_dir / "tb" / "version_0" if family == "lightning" else run_dir
                counted = rb.count_tensorboard(tb_dir, names)
            elif backend == "mlflow":
                experiment = f"{'lightning' if family == 'lightning' else 'expbus'}-{cell}"
                counted = rb.count_mlflow(db, experiment, names)
            elif backend == "wandb":
                save_dir = cell_dir / "wandb-l" if family == "lightning" else run_dir
                counted = rb.count_wandb(save_dir, names)
                waited = 0.0
                while counted.rows < steps and waited < 5.0:
                    # finish() returned; give wandb-core a moment to write the last records (noted below)
                    time.sleep(0.25)
                    waited += 0.25
                    counted = rb.count_wandb(save_dir, names)
                if waited:
                    counted.detail = f"complete {waited:.2f} s after close"
            elif backend == "jsonl":
                counted = rb.count_jsonl(run_dir / "events.jsonl", names)
            elif backend == "dllogger":
                counted = rb.count_dllogger(run_dir / "dllogger.json", names)
            else:
                counted = rb.count_journal(run_dir, names)
        except Exception as exc:
            checks.check(f"{tag}: {backend}", False, f"read back failed: {type(exc).__name__}: {exc}")
            found[backend] = 0
            continue
        found[backend] = counted.values
        detail = f"{backend} steps with all {len(names)} metrics {counted.rows}/{steps}"
        if counted.detail:
            detail += f" ({counted.detail})"
        checks.check(f"{tag}: {backend}", counted.rows == steps, detail)
    return found


def _run_cell(config: str, workload: str, k: int, warmup: int, measured: int, matmul_n: int, root: Path,
              db: Path, checks: Checks, device: str = "cpu", extra_callbacks: tuple[Any, ...] = (),
              seconds: float = 0.0, toggle_s: float = 0.0) -> dict[str, Any]:
    """One ``Trainer.fit`` of one configuration and cell, timed and read back (``device``: ``cpu`` or ``cuda``).

    ``seconds`` above 0 ends training after that long past the warm-up (``measured`` is then
    only the most steps it may run); else exactly ``warmup + measured + 1`` steps run.
    ``toggle_s`` above 0 (expbus configurations): the bridge publishes in alternate windows of
    that many seconds (:class:`~benchmarks._workloads.TapToggle`); the result's ``toggle``
    holds the on and off medians, and the backends must hold exactly the published steps.
    """
    _label, family, backends = describe(config)
    cell = f"{workload}-k{k}"
    tag = f"{config} {cell}"
    cell_dir = root / cell
    cell_dir.mkdir(parents=True)
    run_dir = cell_dir / "expbus"
    steps = warmup + measured + 1  # one more start closes the last measured interval
    names = metric_names(k)
    clock = StepClock(warmup, seconds)
    callbacks: list[Any] = [clock, *extra_callbacks]
    loggers: list[Any] = []
    bridge: Any = None
    if family == "lightning":
        loggers = _lightning_loggers(backends, cell_dir, cell, db)
    elif family == "expbus":
        from expbus import BridgeCallback

        bridge_config: dict[str, Any] = {"run_dir": str(run_dir), "sinks": _expbus_sinks(backends, cell, db)}
        workers = workers_of(config)
        if workers is not None:
            bridge_config["bus"] = {"workers": workers}
        bridge = BridgeCallback(bridge_config)
        callbacks.append(bridge)
    toggle = TapToggle(bridge, toggle_s) if toggle_s > 0 and bridge is not None else None
    if toggle is not None:
        callbacks.append(toggle)
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_steps=steps, max_epochs=1, logger=loggers or False,
        callbacks=callbacks, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(cell_dir),
    )
    model = BenchModule(workload, k, matmul_n)
    loader = make_loader(steps, device)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = _perf()
    trainer.fit(model, loader)
    t_fit = _perf()
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()  # WandbLogger.finalize leaves the run open; the data is not complete before
    t_closed = _perf()
    if bridge is not None:
        from expbus.sinks._process import wait_for_workers

        wait_for_workers(30.0)  # closed sinks' worker processes finish exiting: their CPU is counted
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the child processes that exited during the run (expbus's sink workers, closed in fit;
    # wandb-core when it exits in time), imports and start-up included: work moved, not removed.
    children_cpu_s = (children_after.ru_utime + children_after.ru_stime
                      - children_before.ru_utime - children_before.ru_stime)
    intervals = clock.intervals_us(warmup)
    cpu_intervals = clock.cpu_intervals_us(warmup)
    cpu = clock.thread_cpu_us()
    others = sum(cpu["others"].values())
    n_steps = len(clock.starts)
    if seconds > 0:
        checks.check(f"{tag}: steps", warmup + 2 <= n_steps <= steps,
                     f"training steps run {n_steps} (for {seconds} s after {warmup} warm-up steps; at most {steps})")
    else:
        checks.expect_equal(f"{tag}: steps", n_steps, steps, "training steps run")
    expected_rows = toggle.published_steps() if toggle is not None else n_steps
    found = _check_backends(checks, tag, family, backends, cell_dir, run_dir, cell, db, names, expected_rows)
    sink_stats: dict[str, Any] = {}
    if bridge is not None:
        for sink_id, health in bridge.last_stats.items():
            sink_stats[sink_id] = {"delivered": health.delivered, "dropped": health.dropped, "failed": health.failed}
            checks.check(f"{tag}: {sink_id} health", health.dropped == 0 and health.failed == 0 and health.errors == 0,
                         f"sink {sink_id} delivered={health.delivered} dropped={health.dropped} "
                         f"failed={health.failed} errors={health.errors}")
        checks.check(f"{tag}: bridge close", bool(bridge.last_close_ok), f"bus closed cleanly: {bridge.last_close_ok}")
    return {
        "config": config,
        "workload": workload,
        "k": k,
        "warmup": warmup,
        "steps": n_steps,
        "intervals_us": [round(x, 1) for x in intervals],
        # The training thread's own CPU per step (its median beside the wall median splits a
        # step's overhead into "the thread ran longer" and "it waited").
        "step_cpu_median_us": median(cpu_intervals) if cpu_intervals else 0.0,
        # What the typical step waited (wall minus CPU, step by step): the GIL hand-offs land on
        # a few steps, so this stays near 0 while the mean wait (``main_wait_us``) does not.
        "step_wait_median_us": median([w - c for w, c in zip(intervals, cpu_intervals, strict=False)])
        if cpu_intervals else 0.0,
        "fit_s": (t_fit - t0) / 1e9,
        "close_ms": (t_closed - clock.train_end_ns) / 1e6,
        "train_s": (clock.train_end_ns - clock.starts[0]) / 1e9 if clock.starts else 0.0,
        "cpu_main_us": cpu["main"],
        "main_wait_us": (clock.train_end_ns - clock.train_start_ns) / 1e3 - cpu["main"],
        "cpu_others_us": cpu["others"],
        "cpu_others_total_us": others,
        "cpu_children_s": children_cpu_s,
        "values_found": found,
        "toggle": toggle.split(intervals, cpu_intervals, warmup) if toggle is not None else {},
        "sink_stats": sink_stats,
    }


def _child(config: str, cells: list[tuple[str, int, int, int]], matmul_n: int, out: Path, root: Path,
           seconds: float = 0.0, toggle_s: float = 0.0) -> int:
    """Everything a forked child does: run the cells of one configuration, write JSON to ``out``.

    ``seconds`` above 0: each cell trains that long after its warm-up (see :func:`_run_cell`).
    """
    os.environ.update({
        "WANDB_SILENT": "true", "WANDB_DIR": str(root), "WANDB_CACHE_DIR": str(root / ".wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / ".wandb-config"), "WANDB_DATA_DIR": str(root / ".wandb-data"),
        "WANDB_ERROR_REPORTING": "false", "GIT_PYTHON_REFRESH": "quiet", "MLFLOW_TRACKING_URI": "",
    })
    os.chdir(root)
    _quiet()
    checks = Checks()
    results: list[dict[str, Any]] = []
    db = root / "mlflow.db"
    error = ""
    try:
        for workload, k, warmup, measured in cells:
            results.append(_run_cell(config, workload, k, warmup, measured, matmul_n, root, db, checks,
                                     seconds=seconds, toggle_s=toggle_s))
            print(f"    {config:<14} {workload} K={k:<3} median {median(results[-1]['intervals_us']):9.1f} us",
                  file=sys.stderr, flush=True)
    except BaseException:
        error = traceback.format_exc()
        checks.check(f"{config}: ran", False, error.strip().splitlines()[-1])
        print(error, file=sys.stderr, flush=True)
    finally:
        try:
            import wandb

            if "wandb" in sys.modules:
                wandb.teardown()
        except Exception:
            pass
    out.write_text(json.dumps({"config": config, "cells": results, "checks": checks.items, "error": error}),
                   encoding="utf-8")
    return 0 if checks.ok else 1


def _fork_run(target: Any, args: tuple[Any, ...], timeout: float) -> int:
    """Run ``target(*args)`` in a forked child; its exit status (-9 when killed at the timeout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            code = target(*args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.05)


def _calibrate(out: Path) -> int:
    n, ms = calibrate_matmul()
    out.write_text(json.dumps({"n": n, "ms": ms}), encoding="utf-8")
    return 0


# -- the parent: schedule, aggregate ---------------------------------------------------------
def _summarise(samples: list[float]) -> dict[str, float]:
    return {"median": median(samples), "p99": percentile(samples, 99.0), "mean": sum(samples) / len(samples),
            "n": len(samples)}


def aggregate(runs: list[dict[str, Any]], configs: list[str]) -> list[dict[str, Any]]:
    """One row per (configuration, workload, K): pooled step statistics and overheads against ``none``."""
    pooled: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        for cell in run["cells"]:
            pooled.setdefault((cell["config"], cell["workload"], cell["k"]), []).append(cell)
    rows: list[dict[str, Any]] = []
    base: dict[tuple[str, int], dict[str, float]] = {}
    for (config, workload, k), cells in sorted(pooled.items(), key=lambda kv: (configs.index(kv[0][0]), kv[0][1:])):
        samples = [x for c in cells for x in c["intervals_us"]]
        if not samples:
            continue
        stats = _summarise(samples)
        steps = sum(len(c["intervals_us"]) for c in cells)
        row: dict[str, Any] = {
            "config": config, "label": describe(config)[0], "family": describe(config)[1], "workload": workload,
            "k": k, "repeats": len(cells), "steps_measured": steps, **stats,
            "repeat_medians": [median(c["intervals_us"]) for c in cells],
            "close_ms": median([c["close_ms"] for c in cells]),
            "bg_cpu_us_per_step": median([c["cpu_others_total_us"] / max(1, c["steps"]) for c in cells]),
            "main_cpu_us_per_step": median([c["cpu_main_us"] / max(1, c["steps"]) for c in cells]),
            "main_wait_us_per_step": median([c["main_wait_us"] / max(1, c["steps"]) for c in cells]),
            "children_cpu_s": median([c.get("cpu_children_s", 0.0) for c in cells]),
            "bg_threads": _merge_threads([c["cpu_others_us"] for c in cells], [c["steps"] for c in cells]),
        }
        if config == "none":
            base[(workload, k)] = stats
        rows.append(row)
    for row in rows:
        b = base.get((row["workload"], row["k"]))
        if b is None:
            continue
        row["base_median"] = b["median"]
        row["overhead_us"] = row["median"] - b["median"]
        row["overhead_ratio"] = row["median"] / b["median"]
        row["overhead_pct"] = 100.0 * row["overhead_us"] / b["median"]
        row["p99_overhead_us"] = row["p99"] - b["p99"]
        row["p99_ratio"] = row["p99"] / b["p99"]
        # The mean keeps the periodic stalls (a sink writing a batch every batch_delay) that the median hides.
        row["mean_overhead_us"] = row["mean"] - b["mean"]
        row["mean_overhead_pct"] = 100.0 * row["mean_overhead_us"] / b["mean"]
    by_key = {(r["config"], r["workload"], r["k"]): r for r in rows}
    for row in rows:
        peer = peer_of(row["config"])
        other = by_key.get((peer, row["workload"], row["k"])) if peer else None
        if other is not None and "overhead_us" in row:
            row["peer"] = peer
            row["peer_overhead_us"] = other["overhead_us"]
            lo = other["overhead_us"]
            row["fraction_of_peer"] = row["overhead_us"] / lo if lo > 0 else None
            row["peer_mean_overhead_us"] = other["mean_overhead_us"]
            lo = other["mean_overhead_us"]
            row["mean_fraction_of_peer"] = row["mean_overhead_us"] / lo if lo > 0 else None
    return rows


def _merge_threads(per_run: list[dict[str, float]], steps: list[int]) -> dict[str, float]:
    merged: dict[str, list[float]] = {}
    for threads, n in zip(per_run, steps, strict=True):
        for name, us in threads.items():
            merged.setdefault(_thread_family(name), []).append(us / max(1, n))
    return {name: sum(v) / len(per_run) for name, v in sorted(merged.items())}


def _thread_family(name: str) -> str:
    # "Thread-12 (run)" -> "Thread (run)": numbered threads of one kind add up.
    head, _, rest = name.partition(" ")
    if head.startswith("Thread-") or head.startswith("Dummy-"):
        head = head.split("-")[0]
    return f"{head} {rest}".strip()


def calibrate_in_child(tmp: Path) -> dict[str, Any]:
    """The matmul size for workload (a), calibrated in a forked child like the measured runs: ``{"n", "ms"}``."""
    calib = tmp / "calibration.json"
    code = _fork_run(_calibrate, (calib,), 120.0)
    if code != 0 or not calib.exists():
        raise RuntimeError(f"matmul calibration failed (exit {code})")
    cal: dict[str, Any] = json.loads(calib.read_text(encoding="utf-8"))
    return cal


def run_in_child(config: str, cells: list[tuple[str, int, int, int]], matmul_n: int, tmp: Path, label: str,
                 checks: Checks, timeout: float, seconds: float = 0.0, toggle_s: float = 0.0) -> dict[str, Any] | None:
    """Run one configuration's cells in a fresh forked child (see :func:`_child`); its result, or None.

    The child's data-arrival checks join ``checks``, their names prefixed with ``label`` (a
    repeat, a pair, a run); a child that wrote no result, or exited non-zero with every check
    passed, fails a check of its own. The child's directory is removed once it is read.
    """
    root = Path(tempfile.mkdtemp(prefix=f"{label.replace(' ', '')}-{config.replace(':', '-')}-", dir=tmp))
    out = root / "result.json"
    t0 = time.perf_counter()
    code = _fork_run(_child, (config, cells, matmul_n, out, root, seconds, toggle_s), timeout)
    took = time.perf_counter() - t0
    print(f"  [{label} {config}: exit {code} after {took:.1f} s]", file=sys.stderr, flush=True)
    if not out.exists():
        checks.check(f"{label} {config}: ran", False, f"child exit status {code}, no result")
        shutil.rmtree(root, ignore_errors=True)
        return None
    res: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    res["seconds"] = took
    for item in res["checks"]:
        item["name"] = f"{label} {item['name']}"
    checks.items.extend(res["checks"])
    if code != 0 and all(item["ok"] for item in res["checks"]):
        checks.check(f"{label} {config}: exit", False, f"child exit status {code}")
    shutil.rmtree(root, ignore_errors=True)
    return res


def run(configs: list[str], steps: dict[tuple[str, int], tuple[int, int]], repeats: int, timeout: float,
        tmp: Path, single_repeats: int | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """Calibrate the matmul, run the configurations (forked) in alternating order, aggregate.

    The configurations of :data:`CORE_CONFIGS` run ``repeats`` times, the others
    ``single_repeats`` times (default: ``repeats``). ``seconds`` above 0: every cell trains
    that long after its warm-up (``steps`` then holds the most measured steps).
    """
    single_repeats = repeats if single_repeats is None else single_repeats
    checks = Checks()
    cal = calibrate_in_child(tmp)
    print(f"step_overhead: matmul {cal['n']}x{cal['n']} takes {cal['ms']:.2f} ms on one thread", file=sys.stderr)
    cells = [(w, k, wu, n) for (w, k), (wu, n) in steps.items()]
    runs: list[dict[str, Any]] = []
    schedule: list[tuple[int, str]] = []
    for r in range(max(repeats, single_repeats)):
        order = configs if r % 2 == 0 else list(reversed(configs))
        chosen = [c for c in order if c != "none" and r < (repeats if c in CORE_CONFIGS else single_repeats)]
        # The baseline runs at the start of every repeat and again after every BASELINE_EVERY other
        # configurations, so that one run caught by a burst of load elsewhere cannot set it alone.
        schedule.append((r, "none"))
        for i, config in enumerate(chosen, 1):
            schedule.append((r, config))
            if i % BASELINE_EVERY == 0 and i < len(chosen):
                schedule.append((r, "none"))
    if len(schedule) > 1:
        schedule.append((schedule[-1][0], "none"))  # and once more at the very end
    t_start = time.perf_counter()
    for r, config in schedule:
        res = run_in_child(config, cells, cal["n"], tmp, f"#{r + 1}", checks, timeout, seconds)
        if res is not None:
            res["repeat"] = r
            runs.append(res)
    rows = aggregate(runs, configs)
    return {
        "benchmark": "step_overhead",
        "params": {
            "configs": configs, "workloads": WORKLOADS,
            "steps": {f"{w}:{k}": list(v) for (w, k), v in steps.items()}, "cell_seconds": seconds,
            "repeats": repeats, "single_repeats": single_repeats, "core_configs": CORE_CONFIGS,
            "matmul_n": cal["n"], "matmul_ms": cal["ms"], "torch_threads": 1,
            "lightning": pl.__version__, "torch": torch.__version__,
        },
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
        "checks": checks.items,
        "ok": checks.ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 configurations, K in {1, 10}, 30 steps, 1 run "
                        "(a full run trains every cell for CELL_SECONDS)")
    parser.add_argument("--repeats", type=int, default=2,
                        help=f"runs of {', '.join(CORE_CONFIGS)} (default 2)")
    parser.add_argument("--single-repeats", type=int, default=1,
                        help="runs of the per-backend configurations (default 1)")
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per child process (default 240)")
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    configs = QUICK_CONFIGS if args.quick else list(CONFIGS)
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = []
        for c in configs:
            try:
                describe(c)
            except KeyError:
                unknown.append(c)
        if unknown:
            parser.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
        if "none" not in configs:
            configs.insert(0, "none")
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    repeats = 1 if args.quick else args.repeats
    single = 1 if args.quick else args.single_repeats
    print(f"step_overhead: {len(configs)} configurations, {repeats} repeats ({single} for single backends), "
          f"cells {list(steps)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="expbus-bench-step-") as tmp:
        result = run(configs, steps, repeats, args.timeout, Path(tmp), single, 0.0 if args.quick else CELL_SECONDS)
    for row in result["rows"]:
        extra = ""
        if "overhead_us" in row:
            extra = f"  overhead {row['overhead_us']:+9.1f} us ({row['overhead_pct']:+6.1f}%)"
        print(f"  {row['config']:<14} {row['workload']} K={row['k']:<3} median {row['median']:9.1f} us "
              f"p99 {row['p99']:9.1f} us{extra}", file=sys.stderr)
    return finish("step_overhead", result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
