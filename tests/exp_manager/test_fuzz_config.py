"""Fuzzing the exp_manager config loader: any block gives a config or one ConfigError, never a traceback from inside.

Blocks are NeMo-like ``exp_manager:`` mappings with random edits at real key paths (so the
fuzzer reaches the nested params, the logger kwargs and the sinks), arbitrary mappings, the
same as OmegaConf nodes (interpolations included), and arbitrary text read as a YAML file.
``EXPBUS_FUZZ_EXAMPLES`` raises the number of examples.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from expbus.sinks import ConfigError
from expbus.trainer_bridge.exp_manager import ExpManagerConfig, load_exp_manager_config
from expbus.trainer_bridge.exp_manager._config import parse_max_time
from expbus.trainer_bridge.exp_manager._loggers import logger_sinks

FUZZ = settings(
    deadline=None,
    max_examples=int(os.environ.get("EXPBUS_FUZZ_EXAMPLES", "150")),
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _text
            | st.sampled_from(["???", "${name}", "${nope}", "${multiply:2,3}", "", "..", "../x", "/abs", "-1",
                               "yes", "off", "all", "min", "max", "00:01:00:00", "1:2", "SIGUSR1", "nan",
                               "jsonl", "expbus.sinks.jsonl:JsonlSink", ":X"]))
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3),
                     max_leaves=10)

# A NeMo-like block every key of which is real: edits below put random values at real paths.
_BASE: dict[str, Any] = {
    "exp_dir": None, "name": "exp", "version": None, "use_datetime_version": True,
    "resume_if_exists": False, "resume_ignore_no_checkpoint": True,
    "create_tensorboard_logger": True, "summary_writer_kwargs": {"flush_secs": 5},
    "create_wandb_logger": False, "wandb_logger_kwargs": {"name": "n", "project": "p", "offline": True},
    "create_mlflow_logger": False, "mlflow_logger_kwargs": {"experiment_name": "e", "tracking_uri": "sqlite:///m.db"},
    "create_dllogger_logger": False, "dllogger_logger_kwargs": {"json_file": "./dllogger.json"},
    "create_checkpoint_callback": True,
    "checkpoint_callback_params": {"monitor": "val_loss", "save_top_k": 3, "mode": "min", "every_n_epochs": 1},
    "create_early_stopping_callback": False, "early_stopping_callback_params": {"monitor": "val_loss", "patience": 3},
    "step_timing_kwargs": {"reduction": "mean", "buffer_size": 1},
    "ema": {"enable": False, "decay": 0.999}, "max_time_per_run": None, "seconds_to_sleep": 5,
    "sinks": {"events": {"type": "jsonl", "path": "events.jsonl"}},
    "journal": {"fsync_interval": 1.0}, "bus": {"close_timeout": 5.0}, "preemption_signal": "SIGTERM",
}
_SECTIONS = sorted(k for k, v in _BASE.items() if isinstance(v, dict))
_FIELDS = sorted(ExpManagerConfig.__struct_fields__)
_SUBKEYS = sorted({k for v in _BASE.values() if isinstance(v, dict) for k in v}
                  | {"enabled", "type", "log_dir", "sub_dir", "id", "save_dir", "filepath", "dirpath", "filename",
                     "train_time_interval", "every_n_train_steps", "stdout", "verbose", "workers", "when_full"})

_edit_path = st.one_of(
    st.builds(lambda a: [a], st.sampled_from(_FIELDS)),
    st.builds(lambda a, b: [a, b], st.sampled_from(_SECTIONS), st.sampled_from(_SUBKEYS)),
    st.builds(lambda b: ["sinks", "events", b], st.sampled_from(_SUBKEYS)),
    st.lists(st.sampled_from(_FIELDS + _SUBKEYS) | _text, min_size=1, max_size=3),
)
_switches = st.dictionaries(st.sampled_from([f for f in _FIELDS if f.startswith("create_")]), st.booleans(),
                            max_size=4)


def _edited(switches: dict[str, bool], edits: list[tuple[list[str], Any]]) -> dict[str, Any]:
    block = copy.deepcopy(_BASE)
    block.update(switches)
    for path, value in edits:
        node: Any = block
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {})
        if isinstance(node, dict):
            node[path[-1]] = value
    return block


_blocks = st.one_of(
    st.builds(_edited, _switches, st.lists(st.tuples(_edit_path, _json), max_size=3)),
    st.builds(_edited, _switches, st.lists(st.tuples(_edit_path, _json), max_size=3)),
    st.dictionaries(st.sampled_from(_FIELDS) | _text, _json, max_size=5),
)


def _load_or_config_error(source: Any) -> ExpManagerConfig | None:
    try:
        config = load_exp_manager_config(source)
    except ConfigError as exc:
        assert str(exc), "a ConfigError says what is wrong"
        return None
    assert isinstance(config, ExpManagerConfig)
    return config


@pytest.mark.timeout(90)
@FUZZ
@given(block=_blocks)
def test_any_block_gives_a_config_or_a_config_error(block: dict[str, Any]) -> None:
    config = _load_or_config_error(block)
    if config is None:
        return
    # The next steps of exp_manager with a loaded config fail the same way, if at all.
    if config.max_time_per_run is not None:
        parse_max_time(config.max_time_per_run)  # checked at load: must not raise now
    try:
        logger_sinks(config, exp_dir=Path("/tmp/exp"), name=config.name or "default", version="v0")
    except ConfigError:
        pass


@pytest.mark.timeout(90)
@FUZZ
@given(block=_blocks)
def test_the_same_as_an_omegaconf_node_of_a_whole_config(block: dict[str, Any]) -> None:
    try:
        node = OmegaConf.create({"name": "top", "model": {"lr": 0.1}, "exp_manager": block})
    except Exception:
        return  # OmegaConf itself refuses the value: not the loader's input
    _load_or_config_error(node.exp_manager)
    _load_or_config_error(node)


@pytest.mark.timeout(90)
@FUZZ
@given(text=st.text(max_size=300) | st.lists(st.sampled_from(
    ["exp_manager:", "  name: ${model.x}", "  version: ../v", "  ema: {enable: yes, decay: 2}", "  sinks:",
     "    e: {type: jsonl, path: ../../out}", "  max_time_per_run: 1:00:00:00", "  checkpoint_callback_params:",
     "    mode: sideways", "    save_top_k: many", "name: [", "- 1", "a: &x 1", "b: *x", "c: *y", "\t", "---",
     "  create_wandb_logger: true", "  wandb_logger_kwargs: {project: p, api_key: k}", "  files_to_copy: [nope]"]),
    max_size=10).map("\n".join))
def test_any_text_as_yaml_gives_a_config_or_a_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                           text: str) -> None:
    path: Path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    _load_or_config_error(path)
