"""YAML configuration: two-stage validation with clear errors, overrides, and sink building."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from expbus.bus import SinkPolicy
from expbus.sinks import (
    ConfigError,
    ExpbusConfig,
    available_sinks,
    build_bus,
    create_sink,
    load_config,
    resolve_run_dir,
)
from expbus.sinks.jsonl import JsonlSink


def test_defaults() -> None:
    config = load_config(None)
    assert config == ExpbusConfig()
    assert config.exp_dir == "./nemo_experiments"
    assert config.journal.enabled and config.journal.fsync_interval == 1.0
    assert config.sinks == {}


def test_yaml_file_with_sinks_map(tmp_path: Path) -> None:
    path = tmp_path / "expbus.yaml"
    path.write_text(
        "name: exp\n"
        "journal: {fsync_interval: 0.5}\n"
        "sinks:\n"
        "  events: {type: jsonl, path: out/events.jsonl, batch_size: 64}\n"
        "  dll: {type: dllogger, json_file: dllogger.json}\n"
    )
    config = load_config(path)
    assert config.name == "exp"
    assert config.journal.fsync_interval == 0.5
    assert set(config.sinks) == {"events", "dll"}
    sink, policy = create_sink("events", config.sinks["events"])
    assert isinstance(sink, JsonlSink) and sink.path_option == "out/events.jsonl"
    assert policy == SinkPolicy(batch_size=64)


def test_hydra_style_dotlist_overrides() -> None:
    base = OmegaConf.create({"sinks": {"events": {"type": "jsonl", "path": "a.jsonl"}}})
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(["sinks.events.path=b.jsonl", "bus.close_timeout=5"]))
    config = load_config(merged)
    assert config.sinks["events"]["path"] == "b.jsonl"
    assert config.bus.close_timeout == 5.0


def test_interpolations_resolve() -> None:
    cfg = OmegaConf.create({"name": "exp", "sinks": {"e": {"type": "jsonl", "path": "${name}.jsonl"}}})
    assert load_config(cfg).sinks["e"]["path"] == "exp.jsonl"


def test_nested_expbus_block() -> None:
    config = load_config({"expbus": {"name": "x"}, "model": {"lr": 1}})
    assert config.name == "x"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sinks": {"tb": {"type": "jsonl", "pth": "x"}}}, "sinks.tb.pth: unknown key; did you mean path?"),
        ({"sinks": {"tb": {"type": "jsonl", "batch_sise": 3}}}, "sinks.tb.batch_sise: unknown key; did you mean batch_size?"),
        ({"journl": {}}, "journl: unknown key; did you mean journal?"),
        ({"journal": {"fsync_intervl": 1}}, "journal.fsync_intervl: unknown key; did you mean fsync_interval?"),
        ({"sinks": {"e": {"type": "jsnl"}}}, "sinks.e.type: unknown sink type 'jsnl'; did you mean jsonl?"),
        ({"sinks": {"e": {"type": "jsonl", "queue_size": "lots"}}}, "sinks.e.queue_size: Expected `int`, got `str` (got 'lots')"),
        ({"sinks": {"e": {"type": "jsonl", "append": [1]}}}, "sinks.e.append: Expected `bool`, got `array`"),
        ({"sinks": {"e": {"type": "jsonl", "when_full": "drop_oldest"}}}, "sinks.e.when_full: Invalid enum value 'drop_oldest'"),
        ({"bus": {"close_timeout": "soon"}}, "bus.close_timeout: Expected `float`, got `str` (got 'soon')"),
        ({"sinks": {"e": {"path": "x"}}}, "sinks.e.type: a sink needs a type"),
        ({"sinks": {"e": {"type": "no_such_pkg.mod:Sink"}}}, "cannot import module 'no_such_pkg.mod'"),
        ({"sinks": {"e": {"type": "expbus.sinks.jsonl:Nope"}}}, "has no attribute 'Nope'"),
        ({"sinks": {"e": {"type": "jsonl", "queue_size": 0}}}, "sinks.e: queue_size must be at least 1, got 0"),
    ],
)
def test_bad_config_gives_one_clear_error(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert message in str(info.value)


def test_unknown_sink_type_lists_the_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"sinks": {"e": {"type": "nothing_like_it"}}})
    for name in ("jsonl", "dllogger", "csv", "console"):
        assert name in str(info.value)
    assert info.value.path == "sinks.e.type"
    assert info.value.value == "nothing_like_it"


def test_typo_in_yaml_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sinks:\n  events:\n    type: jsonl\n    flush_every: 3\n")
    with pytest.raises(ConfigError, match=r"sinks\.events\.flush_every: unknown key"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sinks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_disabled_sinks_are_skipped(run_dir: Path) -> None:
    config = load_config({"sinks": {"e": {"type": "jsonl"}, "off": {"type": "jsonl", "enabled": False}}})
    bus = build_bus(config, run_dir=run_dir)
    assert bus.sink_ids == ["e"]


def test_builtins_are_registered_through_entry_points() -> None:
    known = available_sinks()
    for name in ("jsonl", "dllogger", "csv", "console", "memory"):
        assert name in known
        assert known[name].startswith("expbus.sinks.")


def test_run_dir_layout(tmp_path: Path) -> None:
    config = load_config({"exp_dir": str(tmp_path), "name": "exp", "version": "v1"})
    assert resolve_run_dir(config) == tmp_path / "exp" / "v1"
    dated = resolve_run_dir(load_config({"exp_dir": str(tmp_path)}))
    assert dated.parent == tmp_path / "default"
    assert len(dated.name) == len("2026-01-01_00-00-00")
    assert resolve_run_dir(load_config({"run_dir": "/x/y"})) == Path("/x/y")
    with pytest.raises(ConfigError, match="would leave exp_dir"):
        resolve_run_dir(load_config({"name": "../escape"}))
    with pytest.raises(ConfigError, match="would leave exp_dir"):
        resolve_run_dir(load_config({"version": "/abs"}))


def test_a_sink_path_that_leaves_the_run_directory_fails_at_load() -> None:
    from expbus.sinks import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"sinks\.e\.path: '\.\./\.\./x\.jsonl' would leave the run directory"):
        load_config({"sinks": {"e": {"type": "jsonl", "path": "../../x.jsonl"}}})
    assert load_config({"sinks": {"e": {"type": "jsonl", "path": "/tmp/elsewhere/x.jsonl"}}}).sinks["e"]
