"""Security and hygiene of a real run: no secret in any file or on the console, private file modes, paths kept inside.

The run is a real exp_manager training run on CPU with every offline backend (TensorBoard,
MLflow on a SQLite file, DLLogger, jsonl, csv, console) and a custom sink whose options
hold an API key; its hyperparameters and its command line hold secrets.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from expbus.bus import Event, SinkContext, SinkOpenError, SinkPathError
from expbus.sinks import ConfigError
from expbus.trainer_bridge import BridgeCallback
from expbus.trainer_bridge.exp_manager import exp_manager
from expbus.trainer_bridge.exp_manager._dirs import ENV_VERSION, attach_log_files, detach_log_files

from .conftest import TinyModel

# Distinct markers: each must be absent from every byte the run writes.
HPARAM_KEY = "S3KR1T-wandb-key-0001"
HPARAM_PASSWORD = "S3KR1T-db-password-0002"
HPARAM_TOKEN = "S3KR1T-nested-token-0003"
HPARAM_URI_PASSWORD = "S3KR1T-uri-password-0004"
SINK_KEY = "S3KR1T-sink-option-0005"
ARGV_KEY = "S3KR1T-argv-key-0006"
ARGV_PASSWORD = "S3KR1T-argv-password-0007"
ARGV_URI_PASSWORD = "S3KR1T-argv-uri-0008"
SECRETS = [HPARAM_KEY, HPARAM_PASSWORD, HPARAM_TOKEN, HPARAM_URI_PASSWORD, SINK_KEY, ARGV_KEY, ARGV_PASSWORD,
           ARGV_URI_PASSWORD]
# A hyperparameter that is not a secret, expected in every record of the hyperparameters.
VISIBLE = "adamw-V1S1BLE-0009"

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


class SecretModel(TinyModel):
    """The exp_manager tests' linear regression, whose hyperparameters hold secrets next to ordinary values."""

    def __init__(self, lr: float = 0.05, optimizer_name: str = VISIBLE, wandb_api_key: str = HPARAM_KEY,
                 db_password: str = HPARAM_PASSWORD, nested: dict[str, Any] | None = None,
                 tracking_uri: str = f"https://alice:{HPARAM_URI_PASSWORD}@mlflow.example.com/api",
                 max_tokens: int = 512) -> None:
        super().__init__(lr)
        nested = nested if nested is not None else {"api_token": HPARAM_TOKEN, "depth": 2}
        # Again, here: this frame's arguments (the secrets) are the hyperparameters.
        self.save_hyperparameters()


class KeyedSink:
    """A custom sink with an API key among its options (they reach RunStarted's config snapshot)."""

    def __init__(self, api_key: str, endpoint: str = "https://svc.example.com") -> None:
        self.api_key = api_key
        self.endpoint = endpoint

    def write(self, batch: Sequence[Event]) -> None:
        """Accept everything."""


@pytest.fixture
def keyed_sink_type(monkeypatch: pytest.MonkeyPatch) -> str:
    """``KeyedSink`` importable as ``security_test_sinks:KeyedSink`` (the name must not start with expbus)."""
    module = types.ModuleType("security_test_sinks")
    module.KeyedSink = KeyedSink  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "security_test_sinks", module)
    return "security_test_sinks:KeyedSink"


def _files(root: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(root):
        for name in names:
            yield Path(folder) / name


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_secret_reaches_any_file_or_the_console(
    make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any], tmp_path: Path, keyed_sink_type: str,
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", [
        "train.py", f"exp_manager.wandb_logger_kwargs.api_key={ARGV_KEY}", "--db-password", ARGV_PASSWORD,
        f"+model.data_uri=https://bob:{ARGV_URI_PASSWORD}@data.example.com/x", "trainer.max_steps=6",
    ])
    caplog.set_level(logging.INFO)
    trainer = make_trainer(max_steps=6, val_check_interval=3)
    log_dir = exp_manager(trainer, {
        "exp_dir": str(tmp_path / "exps"), "name": "sec", "version": "v0",
        "create_tensorboard_logger": True,
        "create_mlflow_logger": True, "mlflow_logger_kwargs": {"save_dir": str(tmp_path / "mlruns")},
        "create_dllogger_logger": True,
        "checkpoint_callback_params": {"save_top_k": 1},
        "sinks": {
            "events": {"type": "jsonl"},
            "table": {"type": "csv"},
            "screen": {"type": "console", "every_secs": 0},
            "keyed": {"type": keyed_sink_type, "api_key": SINK_KEY},
        },
    })
    assert log_dir is not None
    _, data = tiny()
    torch.manual_seed(0)
    trainer.fit(SecretModel(), datamodule=data)
    detach_log_files()  # close the log files before reading them
    out, err = capfd.readouterr()

    # The run wrote what it should: journal, every sink's file, the run records.
    written = {p.relative_to(log_dir).as_posix() for p in _files(log_dir)}
    for name in ("journal.msgpack", "events.jsonl", "metrics.csv", "hparams.yaml", "dllogger.json",
                 "cmd-args.log", "lightning_logs.txt", "nemo_error_log.txt", "sec.nemo"):
        assert name in written or any(w.endswith(name) for w in written), (name, sorted(written))
    assert any(w.startswith("events.out.tfevents") for w in written)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()

    # No secret anywhere under tmp_path: the run dir, the MLflow store, the log files.
    # Lightning's own .ckpt files pickle the module's hyperparameters (load_from_checkpoint
    # needs them) and are left out on purpose; the weights-only .nemo export is checked.
    checked = 0
    for path in _files(tmp_path):
        if path.suffix == ".ckpt":
            continue
        data_bytes = path.read_bytes()
        checked += 1
        for secret in SECRETS:
            assert secret.encode() not in data_bytes, f"{secret} found in {path}"
    assert checked >= 12
    for stream in (out, err, caplog.text):
        for secret in SECRETS:
            assert secret not in stream

    # What is not secret is all there.
    for name in ("journal.msgpack", "events.jsonl", "hparams.yaml", "dllogger.json"):
        content = (log_dir / name).read_bytes()
        assert VISIBLE.encode() in content, name
        assert b"wandb_api_key" in content and b"***" in content, name
    assert VISIBLE.encode() in next(p for p in _files(log_dir) if p.name.startswith("events.out")).read_bytes()
    assert VISIBLE.encode() in (tmp_path / "mlruns" / "mlflow.db").read_bytes()
    assert b"https://alice:***@mlflow.example.com/api" in (log_dir / "events.jsonl").read_bytes()
    assert "max_tokens: 512" in (log_dir / "hparams.yaml").read_text()
    cmd_args = (log_dir / "cmd-args.log").read_text()
    assert cmd_args == ("train.py exp_manager.wandb_logger_kwargs.api_key=*** --db-password *** "
                        "+model.data_uri=https://bob:***@data.example.com/x trainer.max_steps=6")
    assert "expbus metrics" in out  # the console sink did print

    if os.name == "posix":
        # Files expbus creates and that can hold configuration, argv or log records: the user's only.
        private = ["journal.msgpack", "events.jsonl", "cmd-args.log", "lightning_logs.txt", "nemo_error_log.txt",
                   "nemo_log_globalrank-0_localrank-0.txt", ".expbus/run_id"]
        private += [f".expbus/sinks/{p.name}" for p in (log_dir / ".expbus" / "sinks").iterdir()]
        private += [p.relative_to(log_dir).as_posix() for p in (log_dir / ".expbus" / "cursors").rglob("*.json")]
        assert len(private) > 8
        for name in private:
            assert _mode(log_dir / name) & 0o077 == 0, (name, oct(_mode(log_dir / name)))
        assert _mode(log_dir / ".expbus") == 0o700
        assert _mode(log_dir / ".expbus" / "sinks") == 0o700


@posix_only
def test_log_files_are_private_and_carry_no_uri_credentials(tmp_path: Path) -> None:
    attach_log_files(tmp_path)
    try:
        logging.getLogger("lightning.pytorch").warning("server https://u:L0GS3KR1T@h:5000 is slow")
        logging.getLogger("expbus.test").error("retrying https://u:L0GS3KR1T@h:5000/api?token=L0GT0K&x=1")
    finally:
        detach_log_files()
    for name in ("lightning_logs.txt", "nemo_error_log.txt"):
        text = (tmp_path / name).read_text()
        assert "https://u:***@h:5000" in text and "L0GS3KR1T" not in text and "L0GT0K" not in text, name
        assert _mode(tmp_path / name) & 0o077 == 0


# -- paths kept inside --------------------------------------------------------------------------
@pytest.mark.parametrize(("block", "key"), [
    ({"name": "../../etc"}, "exp_manager.name"),
    ({"name": "/abs/name"}, "exp_manager.name"),
    ({"version": "../x"}, "exp_manager.version"),
    ({"sinks": {"events": {"type": "jsonl", "path": "../../outside.jsonl"}}}, "exp_manager.sinks.events.path"),
    ({"summary_writer_kwargs": {"sub_dir": "../.."}}, "exp_manager.summary_writer_kwargs.sub_dir"),
    ({"create_dllogger_logger": True, "dllogger_logger_kwargs": {"json_file": "a/../../../x.json"}},
     "exp_manager.dllogger_logger_kwargs.json_file"),
])
def test_escaping_names_versions_and_sink_paths_are_refused_before_disk(
        make_trainer: Callable[..., pl.Trainer], tmp_path: Path, block: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        exp_manager(make_trainer(), {"create_checkpoint_callback": False, **block})
    assert raised.value.path == key
    message = str(raised.value)
    assert message.startswith(key) and "would leave" in message
    assert list(tmp_path.iterdir()) == []


def test_an_inherited_version_that_escapes_is_refused(make_trainer: Callable[..., pl.Trainer], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VERSION, "../../elsewhere")
    with pytest.raises(ConfigError, match=f"{ENV_VERSION}.*would leave exp_dir") as raised:
        exp_manager(make_trainer(), {"create_checkpoint_callback": False, "create_tensorboard_logger": False})
    assert raised.value.path == ENV_VERSION
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_absolute_and_inside_sink_paths_are_accepted(make_trainer: Callable[..., pl.Trainer],
                                                     tiny: Callable[..., Any], tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "events.jsonl"
    trainer = make_trainer(max_steps=2)
    log_dir = exp_manager(trainer, {
        "explicit_log_dir": "run", "create_checkpoint_callback": False, "create_tensorboard_logger": False,
        "sinks": {"abs": {"type": "jsonl", "path": str(outside)}, "inner": {"type": "jsonl", "path": "a/../b.jsonl"}},
    })
    assert log_dir is not None
    model, data = tiny()
    trainer.fit(model, datamodule=data)
    assert outside.is_file() and (log_dir / "b.jsonl").is_file()


def test_the_bridge_refuses_an_escaping_sink_path_naming_sink_value_and_fix(
        make_trainer: Callable[..., pl.Trainer], tiny: Callable[..., Any], tmp_path: Path) -> None:
    # Through the plain expbus config the path is refused when the sink opens, before training
    # (or when the config is loaded, should load_config check sink paths as exp_manager does).
    model, data = tiny()
    with pytest.raises((SinkOpenError, ConfigError)) as raised:
        bridge = BridgeCallback({"run_dir": str(tmp_path / "run"),
                                 "sinks": {"events": {"type": "jsonl", "path": "../../outside.jsonl"}}})
        make_trainer(max_steps=2, callbacks=[bridge]).fit(model, datamodule=data)
    message = str(raised.value)
    for part in ("'events'", "'../../outside.jsonl'", "would leave the run directory", "absolute path"):
        assert part in message
    assert not (tmp_path.parent / "outside.jsonl").exists()


def test_sink_context_resolve(tmp_path: Path) -> None:
    context = SinkContext(sink_id="s", run_dir=tmp_path, run_id="r")
    assert context.resolve("a/b.txt") == tmp_path / "a" / "b.txt"
    assert context.resolve("a/../b.txt") == tmp_path / "a" / ".." / "b.txt"  # stays inside
    assert context.resolve(tmp_path.parent / "x") == tmp_path.parent / "x"  # absolute: the user's choice
    with pytest.raises(SinkPathError, match=r"sink 's': option 'path': relative path '\.\./x'"):
        context.resolve("../x", key="path")
    with pytest.raises(SinkPathError):
        context.resolve("a/../../x")
