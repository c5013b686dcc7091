"""What-if experiments behind the recommendations of the benchmark report (not part of ``python -m benchmarks``).

Each variant changes one thing in a forked child at run time, then runs the same cells as
:mod:`benchmarks.step_overhead` (same workloads, same read-back checks). Variants patch
private internals of expbus to try a change before it is made in ``bus/`` or
``trainer_bridge/``; they are experiments, not supported configurations.

* ``base``: expbus as it is.
* ``poll50`` (``pollN``): ``bus.poll_interval: 0.05`` (N ms; the bus thread wakes 10x less often).
* ``stack``: the bus thread resolves an event's tensors with one ``torch.stack(values).tolist()``
  instead of one ``.item()`` per value (each ``.item()`` releases and retakes the GIL).
* ``eager``: the training thread resolves CPU tensors with one ``torch.stack(...).tolist()``
  before publishing (no tensor reaches the bus thread).
* ``poll50+stack``, ``poll50+eager``: both.
* ``switch0.5``: ``sys.setswitchinterval(0.0005)`` (the training thread waits at most 0.5 ms
  for the GIL instead of 5 ms, at the price of more switches).

``--profile`` instead runs one configuration with cProfile in the bus thread and in every
sink thread, and prints where their time goes.

Run: ``python -m benchmarks.whatif --variants base,poll50,stack --configs E:journal,E:all
--cells b:10,b:100 --repeats 3`` (``none`` is always run too, as the baseline).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import step_overhead as so
from benchmarks._common import median, percentile
from benchmarks._workloads import calibrate_matmul

VARIANTS = ["base", "poll50", "poll20", "stack", "eager", "poll50+stack", "poll50+eager", "switch0.5"]


def _patch_stack() -> None:
    import msgspec
    import torch

    from expbus.bus import _bus, _codec
    from expbus.bus._events import Metrics

    original = _codec.resolve_event

    def resolve_event(event: Any) -> Any:
        if type(event) is Metrics:
            values = list(event.values.values())
            if values and all(type(v) is torch.Tensor for v in values):
                floats = torch.stack(values).tolist()
                return msgspec.structs.replace(event, values=dict(zip(event.values, floats, strict=True)))
        return original(event)

    _bus.resolve_event = resolve_event  # type: ignore[attr-defined]


def _patch_eager() -> None:
    import torch

    from expbus.trainer_bridge import _lightning_metrics as lm

    original = lm.metrics_event

    def metrics_event(trainer: Any, metrics: Any, step: Any) -> Any:
        values = list(metrics.values())
        if values and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in values):
            floats = torch.stack([v.detach() for v in values]).tolist()
            metrics = dict(zip(metrics, floats, strict=True))
        return original(trainer, metrics, step)

    lm.metrics_event = metrics_event


def _patch_poll(interval: float) -> None:
    import expbus.trainer_bridge.callback as cb

    real_init = cb.BridgeCallback.__init__

    def init(self: Any, config: Any = None, **kwargs: Any) -> None:
        config = dict(config or {})
        config["bus"] = {**config.get("bus", {}), "poll_interval": interval}
        real_init(self, config, **kwargs)

    cb.BridgeCallback.__init__ = init  # type: ignore[method-assign]


def apply(variant: str) -> None:
    """Apply a variant's changes in this (child) process."""
    for part in variant.split("+"):
        if part == "base":
            continue
        if part.startswith("poll"):
            _patch_poll(float(part[4:]) / 1000.0)
        elif part == "stack":
            _patch_stack()
        elif part == "eager":
            _patch_eager()
        elif part == "switch0.5":
            sys.setswitchinterval(0.0005)
        else:
            raise ValueError(f"unknown variant part {part!r}")


def _profiled_child(config: str, cells: list[tuple[str, int, int, int]], matmul_n: int, out: Path,
                    root: Path) -> int:
    """Run the cells with cProfile inside the bus thread and every sink thread; stats to ``out``.txt."""
    from expbus.bus import _bus, _runner

    profiles: dict[str, cProfile.Profile] = {}

    def wrap(target: Any, name: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            prof = cProfile.Profile()
            profiles[name() if callable(name) else name] = prof
            prof.enable()
            try:
                return target(*args, **kwargs)
            finally:
                prof.disable()

        return run

    real_main = _bus.Bus._thread_main
    _bus.Bus._thread_main = lambda self, started: wrap(real_main, f"bus-{id(self)}")(self, started)  # type: ignore
    real_run = _runner._SinkThread._run

    def sink_run(self: Any) -> None:
        import threading

        wrap(real_run, threading.current_thread().name + f"-{id(self)}")(self)

    _runner._SinkThread._run = sink_run  # type: ignore[method-assign]
    code = so._child(config, cells, matmul_n, out, root)
    text = io.StringIO()
    merged: dict[str, pstats.Stats] = {}
    for name, prof in profiles.items():
        kind = name.rsplit("-", 1)[0]
        stats = pstats.Stats(prof, stream=text)
        if kind in merged:
            merged[kind].add(stats)
        else:
            merged[kind] = stats
    for kind, stats in merged.items():
        print(f"\n===== {kind} (all cells) =====", file=text)
        stats.stream = text  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(18)
    out.with_suffix(".txt").write_text(text.getvalue(), encoding="utf-8")
    return code


def _variant_child(variant: str, config: str, cells: list[tuple[str, int, int, int]], matmul_n: int, out: Path,
                   root: Path) -> int:
    if config != "none":
        apply(variant)
    return so._child(config, cells, matmul_n, out, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.whatif", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="base,poll50,stack,poll50+stack", help=f"from {VARIANTS}")
    parser.add_argument("--configs", default="E:journal,E:all", help="expbus configurations of step_overhead")
    parser.add_argument("--cells", default="b:10,b:100", help="workload:K pairs (default b:10,b:100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the bus and sink threads of --configs")
    args = parser.parse_args(argv)
    cells = []
    for item in args.cells.split(","):
        workload, k = item.split(":")
        warmup, measured = so.FULL_STEPS[(workload, int(k))]
        cells.append((workload, int(k), warmup, measured))
    configs = args.configs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="expbus-whatif-"))
    calib = tmp / "calibration.json"
    so._fork_run(lambda out: (out.write_text(json.dumps(calibrate_matmul())), 0)[1], (calib,), 120)
    matmul_n = json.loads(calib.read_text())[0]
    if args.profile:
        for config in configs:
            root = Path(tempfile.mkdtemp(dir=tmp))
            so._fork_run(_profiled_child, (config, cells, matmul_n, root / "r.json", root), 600)
            print(f"######## {config}")
            print((root / "r.txt").read_text(encoding="utf-8"))
        return 0
    jobs = [("base", "none")] + [(v, c) for v in args.variants.split(",") for c in configs]
    pooled: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for r in range(args.repeats):
        for variant, config in jobs if r % 2 == 0 else jobs[::-1]:
            root = Path(tempfile.mkdtemp(dir=tmp))
            out = root / "r.json"
            so._fork_run(_variant_child, (variant, config, cells, matmul_n, out, root), 600)
            res = json.loads(out.read_text(encoding="utf-8"))
            ok = all(c["ok"] for c in res["checks"])
            for cell in res["cells"]:
                d = pooled.setdefault((variant, config, cell["workload"], cell["k"]),
                                      {"steps": [], "bg": [], "ok": True})
                d["steps"] += cell["intervals_us"]
                d["bg"].append(cell["cpu_others_total_us"] / cell["steps"])
                d["ok"] = d["ok"] and ok
    base = {(w, k): d["steps"] for (v, c, w, k), d in pooled.items() if c == "none"}
    print("| workload | K | configuration | variant | median µs | median overhead µs | median overhead "
          "| mean overhead µs | p99 overhead µs | other threads CPU µs/step | data arrived |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for (v, c, w, k), d in sorted(pooled.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1], kv[0][0])):
        s, b = d["steps"], base[(w, k)]
        m, mb = median(s), median(b)
        mean = sum(s) / len(s) - sum(b) / len(b)
        p99 = percentile(s, 99.0) - percentile(b, 99.0)
        print(f"| {w} | {k} | {c} | {v} | {m:,.0f} | {m - mb:+,.0f} | {100 * (m / mb - 1):+.1f}% | {mean:+,.0f} "
              f"| {p99:+,.0f} | {median(d['bg']):,.0f} | {'yes' if d['ok'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
