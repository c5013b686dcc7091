"""What one ``bus.publish(event)`` costs the training thread, next to a bare ``deque.append``.

What it measures
    ns per call of ``bus.publish(ev)`` on a real, open :class:`~expbus.bus.Bus` (journal in
    a temp dir, a :class:`~expbus.sinks.jsonl.JsonlSink`) and of ``dq.append(ev)`` on a
    plain :class:`collections.deque`, with the same pre-built ``Metrics`` object, in the same
    process and run. The variants are interleaved: every round times each variant once over
    ``--calls`` calls (``time.perf_counter_ns`` around the whole loop), and the order of the
    variants rotates from round to round, so clock drift, turbo and cache effects hit all of
    them alike. Events published in earlier rounds are still being journalled and written
    while later rounds run, so the bus thread (and the jsonl sink's thread) really compete
    for the GIL with the publishing thread, as they do during training.

    Also timed, in the same rounds: the loop alone (``for _ in repeat(None, n): pass``),
    the pre-bound forms (``publish = bus.publish``; ``append = dq.append``), and building a
    ``Metrics`` event (``time.time()`` + construction from an already built values dict of
    K=1 and K=10 entries, and with ``expbus.bus.now()`` instead of ``time.time()``), which
    the Lightning bridge does once per logged step.

How to read the numbers
    ``median ns`` is the median over rounds of (round time / calls); ``p99 ns`` is the 99th
    percentile of the same per-round values (with 20-30 rounds this is close to the worst
    round: it shows the GIL hand-offs to the bus thread, whose switch interval is 5 ms).
    ``mean ns`` is total time / total calls: unlike the median it keeps the rounds that a
    GIL hand-off landed in. While the bus drains a backlog it takes the GIL for up to 5 ms at
    a time, and that stall lands on whichever variant is running (longer rounds are hit more
    often), so compare variants by their medians and read the mean and p99 as the stall the
    training thread sees while the bus is busy. ``net ns`` subtracts the empty loop's median.
    ``ratio`` is the median of the per-round ratios (paired by round) to ``dq.append(ev)``
    (for the pre-bound form: to the pre-bound ``append(ev)``). While the bus is open,
    ``bus.publish`` *is* the ingress deque's bound ``append``, so the pre-bound pair should
    read about 1.0; a few ns either way are the allocator and caches (the bare deque is
    cleared after each round, the ingress is emptied by the bus thread). ``bus.publish(ev)``
    costs a few ns more than ``dq.append(ev)`` because CPython 3.11 cannot specialise the
    lookup of an instance attribute holding a bound method (``LOAD_METHOD`` stays generic),
    while ``dq.append`` is a specialised method-descriptor call. The machine's other load
    shifts whole stretches of rounds; the paired ratio is the most stable figure.

Data arrival
    After the rounds, ``bus.flush()`` must return True, and the jsonl file, the journal and
    the sink's counters must hold every published event (no drops: the sink runs under
    ``when_full="block"``, so a backlog makes the bus thread wait, never the publisher).
    A failed check exits with status 1.

Run alone: ``python -m benchmarks.publish_overhead [--rounds 30 --calls 10000] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat
from pathlib import Path
from typing import Any

from benchmarks._common import Checks, count_lines, finish, median, percentile
from expbus.bus import Bus, JournalReader, Metrics, SinkPolicy, now
from expbus.sinks.jsonl import JsonlSink

_perf = time.perf_counter_ns


# One function per variant, each a tight loop of its own, so that every variant pays the
# same loop and call overhead. ``bus.publish`` is looked up on every call, as a caller that
# follows the Bus docstring ("fetch bus.publish when you call it") does.
def _t_loop(n: int, ctx: dict[str, Any]) -> int:
    t0 = _perf()
    for _ in repeat(None, n):
        pass
    return _perf() - t0


def _t_bus_publish(n: int, ctx: dict[str, Any]) -> int:
    bus = ctx["bus"]
    ev = ctx["event"]
    t0 = _perf()
    for _ in repeat(None, n):
        bus.publish(ev)
    return _perf() - t0


def _t_deque_append(n: int, ctx: dict[str, Any]) -> int:
    dq = ctx["deque"]
    ev = ctx["event"]
    t0 = _perf()
    for _ in repeat(None, n):
        dq.append(ev)
    return _perf() - t0


def _t_bound_publish(n: int, ctx: dict[str, Any]) -> int:
    publish = ctx["bus"].publish
    ev = ctx["event"]
    t0 = _perf()
    for _ in repeat(None, n):
        publish(ev)
    return _perf() - t0


def _t_bound_append(n: int, ctx: dict[str, Any]) -> int:
    append = ctx["deque"].append
    ev = ctx["event"]
    t0 = _perf()
    for _ in repeat(None, n):
        append(ev)
    return _perf() - t0


def _t_build_k1(n: int, ctx: dict[str, Any]) -> int:
    values = ctx["values_k1"]
    t0 = _perf()
    for i in range(n):
        Metrics(time=time.time(), step=i, values=values)
    return _perf() - t0


def _t_build_k10(n: int, ctx: dict[str, Any]) -> int:
    values = ctx["values_k10"]
    t0 = _perf()
    for i in range(n):
        Metrics(time=time.time(), step=i, values=values)
    return _perf() - t0


def _t_build_k1_now(n: int, ctx: dict[str, Any]) -> int:
    values = ctx["values_k1"]
    t0 = _perf()
    for i in range(n):
        Metrics(time=now(), step=i, values=values)
    return _perf() - t0


# (key, label, timer, baseline key for the ratio column, publishes to the bus)
VARIANTS: list[tuple[str, str, Callable[[int, dict[str, Any]], int], str | None, bool]] = [
    ("bus_publish", "`bus.publish(ev)`", _t_bus_publish, "deque_append", True),
    ("deque_append", "`dq.append(ev)`", _t_deque_append, None, False),
    ("bound_publish", "`publish(ev)` (pre-bound `bus.publish`)", _t_bound_publish, "bound_append", True),
    ("bound_append", "`append(ev)` (pre-bound `dq.append`)", _t_bound_append, None, False),
    ("loop", "empty loop (`for _ in repeat(None, n)`)", _t_loop, None, False),
    ("build_k1", "build `Metrics(time=time.time(), step=i, values=v)`, K=1", _t_build_k1, None, False),
    ("build_k10", "build `Metrics(time=time.time(), step=i, values=v)`, K=10", _t_build_k10, None, False),
    ("build_k1_now", "build `Metrics(time=now(), step=i, values=v)`, K=1", _t_build_k1_now, None, False),
]


def run(rounds: int, calls: int, tmp: Path) -> dict[str, Any]:
    """Time every variant ``rounds`` times over ``calls`` calls; verify the bus got everything."""
    checks = Checks()
    values_k1 = {"train/loss": 0.25}
    values_k10 = {f"train/metric_{i}": 0.25 + i for i in range(10)}
    event = Metrics(time=time.time(), step=1, values=values_k1, epoch=0)
    run_dir = tmp / "run"
    bus = Bus(run_dir=run_dir)
    # Lossless for this sink: a backlog makes the bus thread wait, never the publisher.
    bus.add_sink("jsonl", JsonlSink(path="events.jsonl"), SinkPolicy(when_full="block"))
    bus.open()
    dq: deque[Any] = deque()
    ctx = {"bus": bus, "event": event, "deque": dq, "values_k1": values_k1, "values_k10": values_k10}

    per_round: dict[str, list[float]] = {key: [] for key, *_ in VARIANTS}
    published = 0
    # One untimed warm-up round (specialising interpreter, first deque blocks, sink open).
    for _key, _label, timer, _base, _pub in VARIANTS:
        timer(min(calls, 1000), ctx)
        published += min(calls, 1000) if _pub else 0
        dq.clear()
    gc.collect()

    t_start = time.perf_counter()
    for r in range(rounds):
        shift = r % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        if r % 2:
            order.reverse()
        for key, _label, timer, _base, publishes in order:
            ns = timer(calls, ctx)
            per_round[key].append(ns / calls)
            if publishes:
                published += calls
            dq.clear()  # untimed: keep the bare deque as short as the drained ingress
    t_rounds = time.perf_counter() - t_start

    t0 = time.perf_counter()
    flushed = bus.flush(timeout=300.0)
    t_drain = time.perf_counter() - t0
    stats_open = bus.stats()["jsonl"]
    closed = bus.close(timeout=60.0)
    stats = bus.stats()["jsonl"]
    journal = bus.journal_stats()

    checks.check("publish: flush", flushed, f"bus.flush() returned {flushed} after {t_drain:.2f}s")
    checks.check("publish: close", closed, f"bus.close() returned {closed}")
    checks.expect_equal("publish: sink delivered", stats_open.delivered, published, "jsonl sink delivered")
    checks.expect_equal(
        "publish: sink dropped/failed", stats.dropped + stats.failed, 0, "jsonl sink dropped+failed"
    )
    lines = count_lines(run_dir / "events.jsonl")
    checks.expect_equal("publish: jsonl lines", lines, published, "jsonl lines")
    reader = JournalReader(run_dir)
    records = sum(1 for _ in reader)
    checks.expect_equal("publish: journal records", records, published, "journal records read back")
    checks.check(
        "publish: journal clean",
        reader.skipped_bytes == 0 and reader.unknown == 0 and journal.errors == 0,
        f"journal skipped_bytes={reader.skipped_bytes} unknown={reader.unknown} errors={journal.errors}",
    )

    loop_median = median(per_round["loop"])
    rows = []
    for key, label, _timer, base, publishes in VARIANTS:
        samples = per_round[key]
        row: dict[str, Any] = {
            "key": key,
            "label": label,
            "median_ns": median(samples),
            "p99_ns": percentile(samples, 99.0),
            "mean_ns": sum(samples) / len(samples),
            "min_ns": min(samples),
            "net_median_ns": median(samples) - loop_median if key != "loop" else None,
            "ratio": None,
            "publishes": publishes,
        }
        if base is not None:
            ratios = [a / b for a, b in zip(samples, per_round[base], strict=True) if b > 0]
            row["ratio"] = median(ratios)
            row["ratio_of_medians"] = median(samples) / median(per_round[base])
        rows.append(row)
    return {
        "benchmark": "publish_overhead",
        "params": {"rounds": rounds, "calls": calls, "variants": len(VARIANTS)},
        "rows": rows,
        "per_round_ns": per_round,
        "published": published,
        "timed_rounds_s": t_rounds,
        "drain_after_rounds_s": t_drain,
        "checks": checks.items,
        "ok": checks.ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publish_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--calls", type=int, default=10_000, help="calls per variant per round (default 10000)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (4 rounds x 1000 calls)")
    parser.add_argument("--json-out", help="write the result as JSON here (default: stdout)")
    args = parser.parse_args(argv)
    rounds, calls = (4, 1000) if args.quick else (args.rounds, args.calls)
    print(f"publish_overhead: {rounds} rounds x {calls} calls x {len(VARIANTS)} variants", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="expbus-bench-") as tmp:
        result = run(rounds, calls, Path(tmp))
    for row in result["rows"]:
        ratio = f"  x{row['ratio']:.2f}" if row["ratio"] is not None else ""
        print(f"  {row['median_ns']:8.1f} ns  (p99 {row['p99_ns']:8.1f})  {row['label']}{ratio}", file=sys.stderr)
    return finish("publish_overhead", result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
