"""How fast the bus drains: events/s and metric values/s from the first publish to ``flush()``.

What it measures
    N pre-built ``Metrics`` events (distinct steps, K float values each) are published in a
    tight loop (``bus.publish(ev)``) on a fresh, open bus; the clock runs from the first
    publish until ``bus.flush()`` returns True, i.e. until every event is journalled (fsync
    included) and written and flushed by every sink. Each case runs ``--repeats`` times on
    a fresh bus in a fresh temp dir. Setups:

    * ``journal only``: the journal (msgpack, in the run dir) and no sink.
    * ``jsonl + journal``: the journal plus a :class:`~expbus.sinks.jsonl.JsonlSink`, the
      usual configuration.
    * ``jsonl, no journal``: the jsonl sink alone (``journal=False``).
    * ``memory (ceiling)``: a :class:`~expbus.sinks.testing.MemorySink` and no journal: the
      bus's own overhead (drain, resolve, fan-out, batching, the sink thread) with no
      encoding or I/O, an upper bound for any sink.
    * ``tensorboard + journal``, ``csv + journal``, ``dllogger + journal``,
      ``mlflow (sqlite) + journal``: each backend sink with its defaults (MLflow into a
      sqlite database in the temp dir), with fewer events (they are slower; see
      ``SINK_SIZES``), read back through the backend's reader (TensorBoard's record
      reader and ``Event`` proto, the CSV rows, the DLLogger lines, MLflow's metric history
      and its sqlite table).

    Sinks run under ``SinkPolicy(when_full="block")``, so a backlog makes the bus thread
    wait for the sink instead of dropping: the numbers are the lossless, sustained rate.
    K is 1, 10 and 100; N is 200k for K <= 10 and 20k for K = 100 (about 2M values, so
    the K=100 jsonl file stays ~55 MB).

    A last case, ``jsonl + journal, default policy``, publishes the same 200k-event burst
    under the *default* sink policy (``when_full="drop_newest"``, ``queue_size=100_000``):
    a burst larger than the queue is partly dropped by design. It reports how many were
    dropped and checks the accounting instead (delivered + dropped == published, the
    journal still holds every event, the jsonl file holds exactly the delivered ones).

How to read the numbers
    ``events/s`` and ``values/s`` (= events/s x K) are medians over the repeats, with the
    slowest and fastest repeat beside them. ``publish ns/ev`` is the publishing loop's time
    per event: it includes the GIL time the bus thread takes while it drains concurrently
    (compare with the uncontended ns per call of :mod:`benchmarks.publish_overhead`). The
    drain rate is what the bus sustains when the training thread does nothing else; on a
    real run the training thread keeps most of the GIL and the bus needs only
    (events per step / events/s) seconds of it per step.

Data arrival
    Every repeat reads everything back: the steps in the jsonl file and in the journal must
    be exactly 0..N-1 in order (the memory sink's events likewise; the backend sinks must
    hold every step with all K values), ``flush()`` and
    ``close()`` must return True, and the sink must report N delivered, 0 dropped, 0 failed.
    A failed check exits with status 1.

Run alone: ``python -m benchmarks.drain_throughput [--quick] [--repeats 3] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _readback as _rb
from benchmarks._common import Checks, count_lines, finish, journal_steps, jsonl_steps, median, steps_in_order
from expbus.bus import Bus, Metrics, SinkPolicy
from expbus.sinks.jsonl import JsonlSink
from expbus.sinks.testing import MemorySink

# (key, label, journal, sink kind)
SETUPS: list[tuple[str, str, bool, str | None]] = [
    ("journal", "journal only", True, None),
    ("jsonl_journal", "jsonl + journal", True, "jsonl"),
    ("jsonl", "jsonl, no journal", False, "jsonl"),
    ("memory", "memory (ceiling)", False, "memory"),
    ("tensorboard", "tensorboard + journal", True, "tensorboard"),
    ("csv", "csv + journal", True, "csv"),
    ("dllogger", "dllogger + journal", True, "dllogger"),
    ("mlflow", "mlflow (sqlite) + journal", True, "mlflow"),
]
FULL_SIZES = {1: 200_000, 10: 200_000, 100: 20_000}
QUICK_SIZES = {1: 2_000, 10: 2_000, 100: 500}
# The backend sinks are slower: fewer events, so that each run takes a second or two.
SINK_SIZES = {
    "tensorboard": {1: 50_000, 10: 20_000, 100: 4_000},
    "csv": {1: 50_000, 10: 20_000, 100: 4_000},
    "dllogger": {1: 50_000, 10: 20_000, 100: 4_000},
    "mlflow": {1: 3_000, 10: 1_000, 100: 200},
}
QUICK_SINK_SIZES = {"mlflow": {1: 200, 10: 200, 100: 50}}
SINK_REPEATS = 2  # at most, for the backend sinks (to keep the full run near 6 minutes)
BURST_SIZE = 200_000

_LOSSLESS = SinkPolicy(when_full="block")


def _events(n: int, k: int) -> list[Metrics]:
    values = {f"train/metric_{i:03d}": 0.5 + i for i in range(k)}
    t0 = time.time()
    return [Metrics(time=t0 + i * 1e-3, step=i, values=values, epoch=0) for i in range(n)]


def _one(
    setup: tuple[str, str, bool, str | None],
    events: list[Metrics],
    k: int,
    tmp: Path,
    checks: Checks,
    tag: str,
    policy: SinkPolicy = _LOSSLESS,
    burst: bool = False,
) -> dict[str, Any]:
    """Publish ``events`` on a fresh bus, time until flush, read everything back."""
    _key, _label, journal, sink_kind = setup
    n = len(events)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    bus = Bus(run_dir=run_dir, journal=journal)
    memory: MemorySink | None = None
    experiment = f"drain-{run_dir.name}"
    if sink_kind == "jsonl":
        bus.add_sink("sink", JsonlSink(path="events.jsonl"), policy)
    elif sink_kind == "memory":
        memory = MemorySink()
        bus.add_sink("sink", memory, policy)
    elif sink_kind == "tensorboard":
        from expbus.sinks.tensorboard import TensorBoardSink

        bus.add_sink("sink", TensorBoardSink(), policy)
    elif sink_kind == "csv":
        from expbus.sinks.csv import CsvSink

        bus.add_sink("sink", CsvSink(), policy)
    elif sink_kind == "dllogger":
        from expbus.sinks.dllogger import DLLoggerSink

        bus.add_sink("sink", DLLoggerSink(json_file="dllogger.json"), policy)
    elif sink_kind == "mlflow":
        from expbus.sinks.mlflow import MlflowSink

        bus.add_sink("sink", MlflowSink(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment_name=experiment),
                     policy)
    bus.open()
    gc.collect()

    t0 = time.perf_counter()
    for ev in events:
        bus.publish(ev)
    t1 = time.perf_counter()
    flushed = bus.flush(timeout=600.0)
    t2 = time.perf_counter()

    stats = bus.stats().get("sink")
    closed = bus.close(timeout=60.0)
    journal_health = bus.journal_stats()

    checks.check(f"{tag}: flush/close", flushed and closed, f"flush() {flushed}, close() {closed}")
    delivered = dropped = 0
    if stats is not None:
        delivered, dropped = stats.delivered, stats.dropped
        if burst:
            checks.expect_equal(f"{tag}: accounting", delivered + dropped, n, "delivered+dropped")
            checks.expect_equal(f"{tag}: failed", stats.failed, 0, "failed")
        else:
            checks.expect_equal(f"{tag}: delivered", delivered, n, "sink delivered")
            checks.expect_equal(f"{tag}: dropped/failed", dropped + stats.failed, 0, "sink dropped+failed")
    if sink_kind == "jsonl":
        path = run_dir / "events.jsonl"
        if burst:
            checks.expect_equal(f"{tag}: jsonl lines", count_lines(path), delivered, "jsonl lines vs delivered")
        else:
            steps = jsonl_steps(path)
            checks.check(f"{tag}: jsonl steps", steps_in_order(steps, n),
                         f"jsonl lines {len(steps)}/{n}, steps 0..{n - 1} in order")
    if sink_kind in ("tensorboard", "csv", "dllogger", "mlflow"):
        names = list(events[0].values)
        if sink_kind == "tensorboard":
            counted = _rb.count_tensorboard_records(run_dir, names)
        elif sink_kind == "csv":
            counted = _rb.count_csv(run_dir / "metrics.csv", names)
        elif sink_kind == "dllogger":
            counted = _rb.count_dllogger(run_dir / "dllogger.json", names)
        else:
            counted = _rb.count_mlflow(tmp / "mlflow.db", experiment, names)
        checks.check(f"{tag}: {sink_kind} read back", counted.rows == n and counted.values == n * k,
                     f"{sink_kind} steps with all {k} values {counted.rows}/{n}, values {counted.values}/{n * k}"
                     + (f" ({counted.detail})" if counted.detail else ""))
    if sink_kind == "memory" and memory is not None:
        steps = [e.step for e in memory.events]  # type: ignore[attr-defined]
        checks.check(f"{tag}: memory steps", steps_in_order(steps, n),
                     f"memory sink events {len(steps)}/{n}, steps 0..{n - 1} in order")
    if journal:
        jsteps, skipped, unknown = journal_steps(run_dir)
        checks.check(
            f"{tag}: journal",
            steps_in_order(jsteps, n) and skipped == 0 and unknown == 0 and journal_health.errors == 0,
            f"journal records {len(jsteps)}/{n}, steps in order, skipped_bytes={skipped}, "
            f"unknown={unknown}, errors={journal_health.errors}",
        )
    elapsed = t2 - t0
    result = {
        "seconds": elapsed,
        "publish_ns_per_event": (t1 - t0) / n * 1e9,
        "flush_wait_s": t2 - t1,
        "events_per_s": n / elapsed,
        "values_per_s": n * k / elapsed,
        "delivered": delivered,
        "dropped": dropped,
        "journal_records": journal_health.records,
        "journal_bytes": journal_health.bytes_written,
        "sink_bytes": (run_dir / "events.jsonl").stat().st_size if sink_kind == "jsonl" else 0,
    }
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def run(sizes: dict[int, int], repeats: int, burst_size: int, tmp: Path,
        sink_sizes: dict[str, dict[int, int]] | None = None) -> dict[str, Any]:
    """Every setup x K, ``repeats`` times, then the default-policy burst."""
    checks = Checks()
    rows: list[dict[str, Any]] = []
    sink_sizes = SINK_SIZES if sink_sizes is None else sink_sizes
    for k, n_default in sizes.items():
        all_events = _events(max([n_default, *(s.get(k, 0) for s in sink_sizes.values())]), k)
        for setup in SETUPS:
            key, label, _journal, sink_kind = setup
            n = sink_sizes.get(sink_kind or "", {}).get(k, n_default)
            events = all_events[:n]
            reps = []
            for rep in range(min(repeats, SINK_REPEATS) if sink_kind in sink_sizes else repeats):
                tag = f"drain {label} K={k} #{rep + 1}"
                reps.append(_one(setup, events, k, tmp, checks, tag))
            eps = [r["events_per_s"] for r in reps]
            row = {
                "key": key,
                "label": label,
                "k": k,
                "events": n,
                "repeats": repeats,
                "events_per_s": median(eps),
                "events_per_s_min": min(eps),
                "events_per_s_max": max(eps),
                "values_per_s": median(eps) * k,
                "publish_ns_per_event": median([r["publish_ns_per_event"] for r in reps]),
                "seconds": median([r["seconds"] for r in reps]),
                "journal_bytes": reps[0]["journal_bytes"],
                "sink_bytes": reps[0]["sink_bytes"],
                "runs": reps,
            }
            rows.append(row)
            print(
                f"  {label:<20} K={k:<3} N={n:<7} {row['events_per_s']:>12,.0f} ev/s "
                f"{row['values_per_s']:>14,.0f} values/s  publish {row['publish_ns_per_event']:.0f} ns/ev",
                file=sys.stderr, flush=True,
            )
        del events, all_events

    burst_setup = ("jsonl_journal_default", "jsonl + journal, default policy", True, "jsonl")
    events = _events(burst_size, 1)
    burst = _one(burst_setup, events, 1, tmp, checks, "burst default policy K=1", SinkPolicy(), burst=True)
    del events
    burst.update({"key": burst_setup[0], "label": burst_setup[1], "k": 1, "events": burst_size,
                  "policy": "when_full=drop_newest, queue_size=100000"})
    print(f"  burst {burst_size} under the default policy: delivered {burst['delivered']}, "
          f"dropped {burst['dropped']}, journal {burst['journal_records']}", file=sys.stderr, flush=True)
    return {
        "benchmark": "drain_throughput",
        "params": {"sizes": {str(k): n for k, n in sizes.items()}, "repeats": repeats, "burst": burst_size,
                   "sink_repeats": min(repeats, SINK_REPEATS),
                   "sink_sizes": {s: {str(k): n for k, n in v.items()} for s, v in sink_sizes.items()}},
        "rows": rows,
        "burst": burst,
        "checks": checks.items,
        "ok": checks.ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drain_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = 1 if args.quick else args.repeats
    burst = 2_000 if args.quick else BURST_SIZE
    print(f"drain_throughput: sizes {sizes}, {repeats} repeats", file=sys.stderr)
    sink_sizes = QUICK_SINK_SIZES if args.quick else SINK_SIZES
    with tempfile.TemporaryDirectory(prefix="expbus-bench-") as tmp:
        result = run(sizes, repeats, burst, Path(tmp), sink_sizes)
    return finish("drain_throughput", result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
