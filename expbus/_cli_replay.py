"""``expbus replay RUN_DIR --to SINK``: deliver a run's journal to a sink, idempotently."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_replay_parser"]


def add_replay_parser(commands: Any) -> None:
    """Register the ``replay`` subcommand."""
    replay = commands.add_parser(
        "replay",
        help="replay a run's journal into a sink (idempotent: a second replay adds nothing)",
        description=(
            "Deliver the journal of RUN_DIR to a sink: a sink id from --config's sinks: map, or a "
            "sink type with --set options. Each sink id keeps a delivery cursor in "
            "RUN_DIR/.expbus/cursors, so only what it has not acknowledged is sent, and its "
            "backend run id in RUN_DIR/.expbus/sinks, so the same backend run continues."
        ),
    )
    replay.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds journal.msgpack)")
    replay.add_argument("--to", required=True, metavar="SINK",
                        help="a sink id of --config, or a sink type (jsonl, tensorboard, mlflow, wandb, ...)")
    replay.add_argument("--config", metavar="FILE", help="an expbus or exp_manager YAML file with a sinks: map")
    replay.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="a sink option (YAML value), repeatable: --set tracking_uri=sqlite:///mlflow.db")
    replay.add_argument("--id", dest="sink_id", metavar="ID",
                        help="the sink id (its cursor and backend state); default: SINK")
    replay.add_argument("--journal", default="journal.msgpack", metavar="NAME",
                        help="the journal file name (journal.rankN.msgpack for rank N)")
    replay.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="deadline for the whole replay (default: 3600)")
    replay.add_argument("--quiet", action="store_true", help="no progress line")
    replay.set_defaults(func=_replay)


def _sink_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    import yaml

    from expbus.sinks import ConfigError, load_config

    options: dict[str, Any] = {}
    for item in args.options:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set log_dir=tb", path="--set", value=item)
        options[key] = yaml.safe_load(raw) if raw else ""
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text())
        if isinstance(data, dict) and isinstance(data.get("exp_manager"), dict):
            data = {"sinks": data["exp_manager"].get("sinks") or {}}
        config = load_config(data)
        if args.to not in config.sinks:
            from expbus.sinks._errors import close_match

            match = close_match(args.to, config.sinks)
            hint = f"; did you mean {match!r}?" if match else ""
            raise ConfigError(f"--to {args.to!r}: no such sink in {args.config} (sinks: "
                              f"{', '.join(config.sinks) or 'none'}){hint}", path="--to", value=args.to)
        spec = {**config.sinks[args.to], **options}
        spec.pop("enabled", None)
        return args.sink_id or args.to, spec
    return args.sink_id or args.to, {"type": args.to, **options}


def _replay(args: argparse.Namespace) -> int:
    from expbus.bus import SinkOpenError
    from expbus.sinks import ConfigError, ReplayProgress, create_sink, replay_journal

    run_dir = Path(args.run_dir)
    try:
        sink_id, spec = _sink_spec(args)
        sink, policy = create_sink(sink_id, spec)
    except (ConfigError, OSError) as exc:
        print(f"expbus replay: {exc}", file=sys.stderr)
        return 2

    def show(progress: ReplayProgress) -> None:
        if args.quiet:
            return
        print(f"\rreplay {progress.sink_id}: {progress.done}/{progress.total} events "
              f"({progress.rate:,.0f}/s)", end="", file=sys.stderr, flush=True)

    try:
        results = replay_journal(run_dir, {sink_id: (sink, policy)}, journal_name=args.journal,
                                 timeout=args.timeout, progress=show)
    except FileNotFoundError as exc:
        print(f"expbus replay: {exc}", file=sys.stderr)
        return 2
    except SinkOpenError as exc:
        print(f"\nexpbus replay: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(file=sys.stderr)
    ok = True
    for result in results:
        health = result.health
        print(f"{result.sink_id}: replayed {result.replayed} of {result.journal_records} journal records "
              f"({result.already_delivered} already delivered); failed={health.failed} "
              f"dropped={health.dropped} errors={health.errors}")
        if not result.complete or health.failed or health.dropped:
            ok = False
            if health.last_error:
                print(f"{result.sink_id}: last error: {health.last_error}", file=sys.stderr)
    return 0 if ok else 1
