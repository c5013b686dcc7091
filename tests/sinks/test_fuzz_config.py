"""Fuzzing the expbus config loader: any input gives a config or one ConfigError, never a traceback from inside.

Inputs are mappings (text keys to JSON-like values, biased towards the real keys so the
fuzzer reaches the sink blocks and their options) and arbitrary text read as a YAML file.
``type:`` values with an import path come from a fixed list: a random one would import
whatever module it names. ``EXPBUS_FUZZ_EXAMPLES`` raises the number of examples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expbus.bus import POLICY_KEYS
from expbus.sinks import ConfigError, ExpbusConfig, available_sinks, create_sink, load_config, resolve_run_dir

FUZZ = settings(
    deadline=None,
    max_examples=int(os.environ.get("EXPBUS_FUZZ_EXAMPLES", "200")),
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _text
            | st.sampled_from(["???", "${name}", "${nope}", "${oc.env:NOPE_NOT_SET}", "", ".", "..", "../x",
                               "/abs", "-1", "1e400", "nan", "true", "thread", "process", "block"]))
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3),
                     max_leaves=12)

_SINK_TYPES = sorted(available_sinks())
_IMPORT_PATHS = ["expbus.sinks.jsonl:JsonlSink", "expbus.sinks.jsonl:Nope", "expbus.sinks.nope:X", ":X", "x:",
                 ".relative:X", "expbus..sinks:X", "expbus.sinks.jsonl:JsonlSink.write", "os.path:join", ":"]
_sink_type = (st.sampled_from(_SINK_TYPES) | st.sampled_from(_IMPORT_PATHS)
              | _text.filter(lambda t: ":" not in t) | _scalars)
_option_names = st.sampled_from(sorted(POLICY_KEYS | {"workers", "enabled", "path", "append", "json_file",
                                                     "every_secs", "stream", "max_metrics", "hparams_file",
                                                     "flush_secs", "log_dir", "sub_dir", "prefix", "project"})) | _text
# A sink block: usually a type plus a few options (real names and random ones), sometimes anything.
_sink_blocks = st.one_of(
    st.builds(lambda t, opts: {"type": t, **opts}, _sink_type, st.dictionaries(_option_names, _json, max_size=4)),
    st.builds(lambda t, opts: {"type": t, **opts}, _sink_type, st.dictionaries(_option_names, _json, max_size=4)),
    st.dictionaries(_option_names, _json, max_size=4),
    _json,
)
_sections = {
    "journal": st.dictionaries(st.sampled_from(["enabled", "fsync_interval", "name"]) | _text, _json, max_size=3),
    "bus": st.dictionaries(st.sampled_from(["poll_interval", "flush_timeout", "close_timeout", "open_timeout",
                                            "workers"]) | _text, _json, max_size=3),
    "sinks": st.dictionaries(_text, _sink_blocks, max_size=3),
}
# Valid blocks of the built-in sinks, for the near-valid configs below.
_VALID_SINKS: list[dict[str, Any]] = [
    {"type": "jsonl", "path": "events.jsonl", "append": True, "when_full": "block", "queue_size": 10},
    {"type": "csv", "path": "metrics.csv", "hparams_file": None, "batch_size": 4},
    {"type": "dllogger", "json_file": "dll.json", "stdout": False, "verbose": True},
    {"type": "console", "every_secs": 0, "stream": "stderr", "max_metrics": 3},
    {"type": "tensorboard", "flush_secs": 5, "sub_dir": "tb", "prefix": "p"},
    {"type": "mlflow", "tracking_uri": "sqlite:///x.db", "log_model": False},
    {"type": "memory", "enabled": False},
    {"type": "expbus.sinks.jsonl:JsonlSink", "path": "b.jsonl", "workers": "thread"},
]


def _mutate(base: dict[str, Any], edits: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """``base`` with each edit's value put at its key path (missing levels are created)."""
    for path, value in edits:
        node: Any = base
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {})
        if isinstance(node, dict) and path:
            node[path[-1]] = value
    return base


_known_key = st.sampled_from(["sinks", "s0", "s1", "type", "path", "when_full", "queue_size", "journal", "bus",
                              "workers", "name", "enabled", "every_secs", "sub_dir", "version", "stream",
                              "fsync_interval", "close_timeout", "json_file", "hparams_file", "catch_up"])
_paths = st.one_of(
    st.builds(lambda a, b, c: [a, b, c], st.just("sinks"), st.sampled_from(["s0", "s1", "s2"]), _known_key),
    st.builds(lambda a, b: [a, b], st.sampled_from(["journal", "bus"]), _known_key),
    st.lists(_known_key | _text, min_size=1, max_size=4),
)
_near_valid = st.builds(
    lambda sinks, edits: _mutate({"name": "exp", "version": "v0", "journal": {"fsync_interval": 0.5},
                                  "bus": {"close_timeout": 5.0},
                                  "sinks": {f"s{i}": dict(block) for i, block in enumerate(sinks)}}, edits),
    st.lists(st.sampled_from(_VALID_SINKS), max_size=3),
    st.lists(st.tuples(_paths, _json), max_size=3),
)
_mappings: st.SearchStrategy[dict[str, Any]] = st.one_of(
    _near_valid,
    _near_valid,
    # The real sections (each one present or not), with a random extra key now and then.
    st.fixed_dictionaries({}, optional={
        **_sections,
        "exp_dir": _scalars, "name": _scalars, "version": _scalars, "run_dir": _scalars,
    }),
    st.fixed_dictionaries({"sinks": _sections["sinks"]}),
    st.dictionaries(st.sampled_from(["exp_dir", "name", "version", "run_dir", "journal", "bus", "sinks", "expbus"])
                    | _text, _json, max_size=5),
)


def _load_or_config_error(source: Any) -> ExpbusConfig | None:
    try:
        config = load_config(source)
    except ConfigError as exc:
        assert str(exc), "a ConfigError says what is wrong"
        return None
    assert isinstance(config, ExpbusConfig)
    return config


@pytest.mark.timeout(90)
@FUZZ
@given(data=_mappings)
def test_any_mapping_gives_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    config = _load_or_config_error(data)
    if config is None:
        return
    # What the bridge does next with a loaded config fails the same way, if at all.
    try:
        resolve_run_dir(config)
    except ConfigError:
        pass
    for sink_id, spec in config.sinks.items():
        if spec.get("enabled", True) is False:
            continue
        try:
            create_sink(sink_id, spec)
        except ConfigError:
            pass


@pytest.mark.timeout(90)
@FUZZ
@given(data=_mappings)
def test_an_expbus_block_inside_a_bigger_config(data: dict[str, Any]) -> None:
    _load_or_config_error({"model": {"lr": 0.1}, "expbus": data})


@pytest.mark.timeout(90)
@FUZZ
@given(text=st.text(max_size=300) | st.lists(st.sampled_from(
    ["sinks:", "  e:", "    type: jsonl", "    path: ${name}", "name: [", "bus: {workers: 1}", "- 1", "a: &x 1",
     "b: *x", "c: *y", "journal:", "  fsync_interval: ten", "expbus:", "  name: ../x", "\t", "%YAML 1.1", "---",
     "sinks: {e: {type: 3}}", "!!python/object:os.system {}", "key: ${oc.env:HOME}", "x: ${now:%Y}"]),
    max_size=12).map("\n".join))
def test_any_text_as_yaml_gives_a_config_or_a_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                           text: str) -> None:
    path: Path = tmp_path_factory.mktemp("yaml") / "expbus.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_or_config_error(path)
    _load_or_config_error(str(path))


@pytest.mark.parametrize("value", [object(), 3, ["a"], b"bytes", Path("/nonexistent/expbus.yaml")])
def test_other_sources_give_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError):
        load_config(value)
