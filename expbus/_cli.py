"""The ``expbus`` command line: run the demo, list sink types, summarise a journal."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``expbus`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="expbus", description="expbus: experiment logging that never slows training.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help="train a small model on CPU with the bridge and show where everything went")
    demo.add_argument("--config", metavar="FILE", help="an expbus YAML file (its sinks: replace the demo's)")
    demo.add_argument("--out", metavar="DIR", help="root of experiments (default: ./nemo_experiments)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    demo.set_defaults(func=_demo)

    sinks = commands.add_parser("sinks", help="list the registered sink types")
    sinks.set_defaults(func=_sinks)

    journal = commands.add_parser("journal", help="summarise a journal (a journal file or a run directory)")
    journal.add_argument("path", metavar="PATH")
    journal.set_defaults(func=_journal)
    from expbus._cli_bench import add_bench_parser

    add_bench_parser(commands)
    from expbus._cli_replay import add_replay_parser

    add_replay_parser(commands)
    from expbus._cli_clean import add_clean_parser

    add_clean_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 bad usage or configuration)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def _demo(args: argparse.Namespace) -> int:
    from expbus.sinks import ConfigError

    try:
        from expbus.trainer_bridge import run_demo
    except ImportError as exc:
        print(f"expbus demo needs torch and lightning (pip install 'expbus[lightning]'): {exc}", file=sys.stderr)
        return 1
    try:
        run_demo(args.config, args.out, max_steps=args.steps)
    except ConfigError as exc:
        print(f"expbus demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _sinks(args: argparse.Namespace) -> int:
    from expbus.sinks import available_sinks

    known = available_sinks()
    if not known:
        print("no sink types registered (entry-point group expbus.sinks)")
        return 0
    width = max(len(name) for name in known)
    for name, target in sorted(known.items()):
        note = "" if _importable(target.partition(":")[0]) else "  (not installed)"
        print(f"{name:<{width}}  {target}{note}")
    print("\nany 'package.module:Class' works as a sink type too")
    return 0


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _journal(args: argparse.Namespace) -> int:
    from expbus.bus import JournalReader, RunFinished, RunStarted, journal_segments

    path = Path(args.path)
    segments = journal_segments(path)
    if not segments:
        print(f"expbus journal: no journal at {path}", file=sys.stderr)
        return 2
    reader = JournalReader(path)
    kinds: Counter[str] = Counter()
    runs: dict[str, str] = {}
    current = "?"
    first = last = None
    for event in reader:
        kinds[type(event).__struct_config__.tag] += 1  # type: ignore[attr-defined]
        first = event.time if first is None else min(first, event.time)
        last = event.time if last is None else max(last, event.time)
        if isinstance(event, RunStarted):
            current = event.run_id
            runs[current] = "started, not finished"
        elif isinstance(event, RunFinished):
            runs[current] = event.status + (f" ({event.error})" if event.error else "")
    versions = sorted({h.get("schema_version") for h in reader.headers if "schema_version" in h})
    print(f"journal: {', '.join(str(s) for s in segments)}")
    print(f"  segments: {len(segments)}  schema version: {', '.join(map(str, versions)) or '?'}")
    print(f"  records: {reader.records}  unknown kinds: {reader.unknown}  skipped bytes: {reader.skipped_bytes}")
    if first is not None and last is not None:
        print(f"  span: {last - first:.1f} s")
    for kind, count in sorted(kinds.items()):
        print(f"    {kind:<20} {count}")
    for run_id, status in runs.items():
        print(f"  run {run_id}: {status}")
    return 0
