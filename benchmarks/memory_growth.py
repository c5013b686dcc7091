"""How much memory a stalled sink can cost: peak RSS growth over 1M events against what its policy lets it hold.

What it measures
    A fresh bus (journal on, in a temp dir) with one sink whose ``write`` blocks until it is
    released (a hung backend), under the default policy (``when_full="drop_newest"``, which
    with the journal on *spills*: events beyond the queue stay in the journal and are read
    back when the sink drains) with ``queue_size=Q``. 1,000,000 ``Metrics`` events, each built
    as the bridge builds one (a new dict of K=10 float values, a new step), are published, and
    the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
    run where the kernel allows) is compared with the RSS before the first publish. Two publishing patterns:

    * ``paced``: 250 events, then a 1 ms sleep, and so on (about 150k events/s, still far
      beyond any training loop): the bus keeps up, so what grows is the stalled sink's queue.
      The RSS is also read once the queue has just filled (nothing spilled yet), which splits
      the growth into the queued events themselves and what spilling 900k more adds;
    * ``burst``: the 1M events in one tight loop: the publisher outruns the bus thread, so
      the ingress (which has no bound: ``publish`` never waits) grows as well.

    Control: each pattern runs again with a *healthy* sink (its ``write`` returns at once),
    same bus, policy and publishing. Its growth is what the bus costs at that rate whatever
    the sink (events between two polls of the ingress, the burst's ingress backlog, the
    drain being journaled); the stalled run's growth minus the control's is what the stall
    itself costs. Every run (2 patterns x 2 sinks) is a fresh interpreter.

The bound
    What the sink's policy lets it hold: ``Q`` queued events plus one batch of ``batch_size``
    inside its (hung) ``write``, which left the queue when the write began, times the bytes
    one queued event holds: ``tracemalloc`` over 20,000 events built as
    above and kept in a ``collections.deque`` (as the sink's queue keeps them), so the
    deque's slot (8 bytes, in 64-slot blocks) is included. It counts every block the event
    owns (the ``Metrics`` struct, its values dict, the 11 floats and the step's int; the
    metric names are shared) as the allocator hands it out: pymalloc serves every request
    of up to 512 bytes from 16-byte size classes (a 24-byte float takes 32 bytes), and glibc
    malloc adds an 8-byte header to larger ones (rounded to 16). The requested bytes
    (tracemalloc's own total, about 12% less: what the bound was before) are reported too.
    Not included: pymalloc's pool headers and partly used pools.

Data arrival
    While stalled, the sink's queue must stay at ``Q``, nothing may be dropped, and every other
    event must be counted as spilled; after the sink is released and the bus closed, the sink
    must have received every event published (read back from the journal), and the journal
    must hold every event. The healthy control must have delivered every event before the
    close, dropped none, and the journal must hold every event. A failed check exits with
    status 1.

Run alone: ``python -m benchmarks.memory_growth [--quick] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import Checks, emit, finish
from benchmarks.report import REPO_ROOT
from expbus.bus import Bus, Event, JournalReader, Metrics, SinkPolicy

K = 10
PACE = 250  # events per 1 ms sleep in the paced pattern (about 150k events/s on a 2-core VM)
NAMES = [f"train/metric_{i:03d}" for i in range(K)]


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class StalledSink:
    """A sink whose ``write`` blocks until :meth:`release` (a hung backend); counts what it got."""

    def __init__(self) -> None:
        self.received = 0
        self._go = threading.Event()

    def write(self, batch: Sequence[Event]) -> None:
        self._go.wait()
        self.received += len(batch)

    def release(self) -> None:
        self._go.set()


class HealthySink:
    """The control: a sink whose ``write`` returns at once; counts what it got."""

    def __init__(self) -> None:
        self.received = 0

    def write(self, batch: Sequence[Event]) -> None:
        self.received += len(batch)


def _event(i: int, t0: float) -> Metrics:
    v = float(i)
    return Metrics(time=t0 + i * 1e-3, step=i, epoch=0, values={name: v + j for j, name in enumerate(NAMES)})


def _allocated(size: int) -> int:
    """Bytes the allocator hands out for a request of ``size`` (CPython's pymalloc, else glibc malloc)."""
    if size <= 512:
        return max(16, (size + 15) & ~15)
    return max(32, (size + 8 + 15) & ~15)


def bytes_per_event(n: int = 20_000) -> tuple[float, float]:
    """(allocated, requested) bytes one queued event holds, deque slot included (tracemalloc over ``n``)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.time()
    kept = deque(_event(i, t0) for i in range(n))
    requested = tracemalloc.get_traced_memory()[0] - before
    # Only blocks allocated since start() and still alive: the events, their parts and the deque.
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    allocated = sum(_allocated(trace.size) for trace in snapshot.traces)
    del kept, snapshot
    return allocated / n, requested / n


def _one(mode: str, sink_kind: str, n: int, queue_size: int, tmp: Path, checks: Checks) -> dict[str, Any]:
    """One pattern with one sink (``stalled`` or the ``healthy`` control), in this process."""
    run_dir = tmp / f"run-{mode}-{sink_kind}"
    stalled_sink = StalledSink() if sink_kind == "stalled" else None
    sink: StalledSink | HealthySink = stalled_sink or HealthySink()
    policy = SinkPolicy(queue_size=queue_size, when_full="drop_newest", write_timeout=3600.0)
    bus = Bus(run_dir=run_dir)
    bus.add_sink("sink", sink, policy)
    bus.open()
    t0 = time.time()
    gc.collect()
    time.sleep(0.2)
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    hwm0 = _status_kb("VmHWM")
    rss_at_fill = 0
    publish = bus.publish
    start = time.perf_counter()
    if mode == "burst":
        for i in range(n):
            publish(_event(i, t0))
    else:
        fill_at = queue_size + 2 * policy.batch_size
        for chunk in range(0, n, PACE):
            for i in range(chunk, min(n, chunk + PACE)):
                publish(_event(i, t0))
            time.sleep(0.001)
            if chunk < fill_at <= chunk + PACE:
                time.sleep(0.05)  # the bus catches up: the queue is full, nothing dropped yet
                rss_at_fill = _status_kb("VmRSS")
    published_s = time.perf_counter() - start
    # Wait until the bus has taken every event. Stalled: queued + spilled + dropped + the
    # batch inside the hung write. Healthy: delivered.
    deadline = time.monotonic() + 300
    batch = policy.batch_size
    while time.monotonic() < deadline:
        h = bus.stats()["sink"]
        if stalled_sink is not None:
            taken = h.spilled + h.dropped + h.queue_depth >= n - batch
        else:
            taken = h.delivered + h.dropped >= n
        if taken and not bus._ingress and not bus._pending:
            break
        time.sleep(0.02)
    drained_s = time.perf_counter() - start
    time.sleep(0.1)
    before_close = bus.stats()["sink"]
    hwm = _status_kb("VmHWM")
    rss = _status_kb("VmRSS")
    what = mode if stalled_sink is not None else f"{mode}, healthy sink"
    if stalled_sink is not None:
        in_write = n - before_close.spilled - before_close.dropped - before_close.queue_depth
        checks.check(f"{what}: queue held at the bound", before_close.queue_depth == queue_size,
                     f"queue depth {before_close.queue_depth} (bound {queue_size}), in the hung write {in_write}")
        checks.check(f"{what}: excess spilled, none dropped",
                     before_close.dropped == 0 and before_close.spilled == n - queue_size - in_write
                     and 0 < in_write <= batch,
                     f"spilled {before_close.spilled}, dropped {before_close.dropped} of {n} while stalled")
        stalled_sink.release()
    else:
        checks.check(f"{what}: every event delivered before the close, none dropped",
                     before_close.delivered == n and before_close.dropped == 0 and sink.received == n,
                     f"delivered {before_close.delivered}/{n} (sink received {sink.received}), "
                     f"dropped {before_close.dropped}, spilled {before_close.spilled}")
    closed = bus.close(timeout=300.0)
    final = bus.stats()["sink"]
    checks.check(f"{what}: close", closed, f"bus.close() returned {closed}")
    checks.expect_equal(f"{what}: every event delivered", final.delivered, n, "delivered")
    checks.expect_equal(f"{what}: sink received", sink.received, n, "sink received")
    reader = JournalReader(run_dir)
    records = sum(1 for _ in reader)
    checks.check(f"{what}: journal", records == n and reader.skipped_bytes == 0,
                 f"journal records {records}/{n}, skipped_bytes={reader.skipped_bytes}")
    return {
        "mode": mode,
        "sink": sink_kind,
        "events": n,
        "queue_size": queue_size,
        "peak_reset": reset,
        "rss_before_mb": rss0 / 1024,
        "hwm_before_mb": hwm0 / 1024,
        "peak_mb": hwm / 1024,
        "rss_after_mb": rss / 1024,
        "growth_mb": (hwm - rss0) / 1024,
        "growth_at_fill_mb": (rss_at_fill - rss0) / 1024 if rss_at_fill else None,
        "publish_s": published_s,
        "drain_s": drained_s,
        # Stalled: while stalled (before the release); healthy: before the close.
        "spilled_while_stalled": before_close.spilled,
        "dropped_while_stalled": before_close.dropped,
        "delivered_after_release": final.delivered,
    }


def _run_mode(mode: str, sink_kind: str, n: int, queue_size: int, tmp: Path) -> dict[str, Any]:
    """One publishing pattern with one sink, in this process (call it in a fresh one)."""
    checks = Checks()
    row = _one(mode, sink_kind, n, queue_size, tmp, checks)
    return {"row": row, "checks": checks.items}


def _control_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a healthy-sink control run."""
    keys = ("growth_mb", "growth_at_fill_mb", "peak_mb", "rss_before_mb", "rss_after_mb", "publish_s", "drain_s",
            "spilled_while_stalled", "dropped_while_stalled", "delivered_after_release", "peak_reset")
    return {key: row[key] for key in keys}


def run(n: int, queue_size: int, tmp: Path) -> dict[str, Any]:
    """Both publishing patterns, with the stalled sink and the healthy control, each in a fresh interpreter.

    Fresh interpreters because freed memory is not returned to the OS.
    """
    checks = Checks()
    per_event, requested_per_event = bytes_per_event()
    # The queue plus the one batch a hung write holds (the default batch_size, as in _one).
    batch_size = SinkPolicy().batch_size
    held = queue_size + batch_size
    bound_mb = per_event * held / 2**20
    requested_bound_mb = requested_per_event * held / 2**20
    rows = []
    for mode in ("paced", "burst"):
        parts: dict[str, dict[str, Any]] = {}
        for sink_kind in ("stalled", "healthy"):
            out = tmp / f"{mode}-{sink_kind}.json"
            cmd = [sys.executable, "-m", "benchmarks.memory_growth", "--mode", mode, "--sink", sink_kind,
                   "--events", str(n), "--queue-size", str(queue_size), "--json-out", str(out)]
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), timeout=600, stdout=subprocess.DEVNULL)
            what = mode if sink_kind == "stalled" else f"{mode}, healthy sink"
            if not out.exists():
                checks.check(f"{what}: ran", False, f"exit status {proc.returncode}, no result")
                continue
            part = json.loads(out.read_text(encoding="utf-8"))
            checks.items.extend(part["checks"])
            parts[sink_kind] = part["row"]
        row = parts.get("stalled")
        if row is None:
            continue
        control = parts.get("healthy")
        row["bound_mb"] = bound_mb
        row["growth_vs_bound"] = row["growth_mb"] / bound_mb
        row["control"] = _control_summary(control) if control is not None else None
        row["stall_cost_mb"] = row["growth_mb"] - control["growth_mb"] if control is not None else None
        row["stall_cost_vs_bound"] = row["stall_cost_mb"] / bound_mb if control is not None else None
        rows.append(row)
        control_text = (f"; healthy sink {control['growth_mb']:.1f} MB; the stall's own cost "
                        f"{row['stall_cost_mb']:.1f} MB ({row['stall_cost_vs_bound']:.2f}x)" if control else "")
        print(f"  {mode:<6} {n:,} events, bound {queue_size:,} + {batch_size:,} ({bound_mb:.1f} MB): peak RSS growth "
              f"{row['growth_mb']:.1f} MB with the stalled sink ({row['growth_vs_bound']:.2f}x the bound)"
              f"{control_text}", file=sys.stderr, flush=True)
    return {
        "benchmark": "memory_growth",
        "params": {"events": n, "queue_size": queue_size, "batch_size": batch_size, "held_events": held,
                   "k": K, "bytes_per_event": per_event,
                   "requested_bytes_per_event": requested_per_event, "bound_mb": bound_mb,
                   "requested_bound_mb": requested_bound_mb},
        "rows": rows,
        "checks": checks.items,
        "ok": checks.ok,
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_growth", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events published (default 1M)")
    parser.add_argument("--queue-size", type=int, default=100_000, help="the sink's queue bound (default 100000)")
    parser.add_argument("--quick", action="store_true", help="100k events, queue bound 10k")
    parser.add_argument("--mode", choices=["paced", "burst"], help=argparse.SUPPRESS)
    parser.add_argument("--sink", choices=["stalled", "healthy"], default="stalled", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    n, q = (100_000, 10_000) if args.quick else (args.events, args.queue_size)
    if args.mode:
        with tempfile.TemporaryDirectory(prefix="expbus-bench-mem-") as tmp:
            emit(_run_mode(args.mode, args.sink, n, q, Path(tmp)), args.json_out)
        return 0
    print(f"memory_growth: {n:,} events, queue bound {q:,}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="expbus-bench-mem-") as tmp:
        result = run(n, q, Path(tmp))
    return finish("memory_growth", result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
