"""Secret redaction: which keys and strings are secrets, argv, URIs, events, and the bus applying it before journal and sinks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expbus.bus import (
    REDACTED,
    Bus,
    CheckpointSaved,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    Text,
    Timing,
    is_sensitive_key,
    read_journal,
    redact_argv,
    redact_event,
    redact_params,
    redact_text,
    resolve_event,
)
from expbus.sinks.jsonl import JsonlSink
from expbus.sinks.testing import MemorySink


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "WandbApiKey", "api_token", "hf_token", "db_password",
                                 "client_secret", "secrets", "--db-password", "a.b.api_key", "keys",
                                 "tokenizer_api_token", "monitor_key", "pad_token"])
def test_sensitive_keys(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize("key", ["lr", "name", "tokenizer", "Tokenizer_Name", "tokenization", "model", "path",
                                 "passes", "monitor", 3])
def test_keys_that_are_not_secrets(key: object) -> None:
    assert not is_sensitive_key(key)


def test_params_redact_strings_under_sensitive_keys_at_any_depth() -> None:
    params = {
        "lr": 0.1,
        "wandb_api_key": "sk-1",
        "db_password": "pw",
        "nested": {"api_token": "tok", "depth": 3, "list": [{"secret": "s"}]},
        "api_keys": {"wandb": "k1", "hf": ["k2", "k3"], "count": 2},  # a container named like a secret
        "max_tokens": 512,  # numbers, booleans and None stay: they cannot be credentials
        "key_dim": 64,
        "use_secret_sharing": False,
        "password_file": None,
        "tokenizer": {"type": "bpe", "model": "/data/tok.model", "hf_token": "t2"},
        "optimizer": "adam",
    }
    redacted = redact_params(params)
    assert redacted == {
        "lr": 0.1,
        "wandb_api_key": REDACTED,
        "db_password": REDACTED,
        "nested": {"api_token": REDACTED, "depth": 3, "list": [{"secret": REDACTED}]},
        "api_keys": {"wandb": REDACTED, "hf": [REDACTED, REDACTED], "count": 2},
        "max_tokens": 512,
        "key_dim": 64,
        "use_secret_sharing": False,
        "password_file": None,
        "tokenizer": {"type": "bpe", "model": "/data/tok.model", "hf_token": REDACTED},
        "optimizer": "adam",
    }
    assert params["wandb_api_key"] == "sk-1"  # the input is not modified


def test_uri_credentials_and_query_secrets_anywhere() -> None:
    params = {
        "tracking_uri": "https://alice:s3cret@mlflow.example.com:5000/path",
        "db": "postgresql://bob:p@ss@db:5432/x",  # an unencoded '@' in the password
        "repo": "https://ghp_abcdef@github.com/org/repo.git",  # a user part alone may be a token
        "signed": "https://bucket.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Expires=60&sig=zz",
        "hook": "https://example.com/hook?token=t0k&x=1",
        "plain": "https://example.com/a@b",  # '@' in the path is not userinfo
        "note": "mail me at someone@example.com",
    }
    assert redact_params(params) == {
        "tracking_uri": "https://alice:***@mlflow.example.com:5000/path",
        "db": "postgresql://bob:***@db:5432/x",
        "repo": "https://***@github.com/org/repo.git",
        "signed": "https://bucket.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Expires=60&sig=***",
        "hook": "https://example.com/hook?token=***&x=1",
        "plain": "https://example.com/a@b",
        "note": "mail me at someone@example.com",
    }


def test_nothing_to_redact_returns_the_same_objects() -> None:
    params = {"lr": 0.1, "layers": [1, 2, {"act": "relu"}], "name": "exp"}
    assert redact_params(params) is params
    text = "no secrets here"
    assert redact_text(text) is text


def test_odd_values_never_raise() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    deep: Any = "x"
    for _ in range(5000):
        deep = {"k": deep}
    assert redact_params({"api_key": Unprintable()})["api_key"] == REDACTED
    assert redact_params({"obj": Unprintable()})["obj"] == REDACTED
    redact_params(cyclic)
    redact_params(deep)
    assert redact_params({"secret": b"raw", "key_set": {"a", "b"}, "path": Path("/x")}) == {
        "secret": REDACTED, "key_set": [REDACTED, REDACTED], "path": Path("/x")}


def test_argv() -> None:
    argv = ["train.py", "exp_manager.wandb_logger_kwargs.api_key=abc", "+db.password=pw", "--password=x",
            "--api-key", "k1", "--lr", "0.1", "token=zz", "model.tokenizer.type=bpe",
            "trainer.max_steps=10", "mlflow.tracking_uri=https://u:p@h/x",
            "exp_manager.wandb_logger_kwargs={project: p, api_key: k2}", '--json={"secret": "s", "n": 1}']
    assert redact_argv(argv) == [
        "train.py", "exp_manager.wandb_logger_kwargs.api_key=***", "+db.password=***", "--password=***",
        "--api-key", "***", "--lr", "0.1", "token=***", "model.tokenizer.type=bpe",
        "trainer.max_steps=10", "mlflow.tracking_uri=https://u:***@h/x",
        "exp_manager.wandb_logger_kwargs={project: p, api_key: ***}", '--json={"secret": "***", "n": 1}']


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
    | st.sampled_from(["https://u:p@h/x", "a?token=1&b=2", "***", "https://***@h", "x=1;key=2"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.text(max_size=8) | st.sampled_from(["api_key", "token", "tokenizer", "lr"]), c, max_size=3),
    max_leaves=15,
)


@pytest.mark.timeout(60)
@settings(deadline=None, max_examples=200, database=None)
@given(params=_json, argv=st.lists(st.text(max_size=30) | st.sampled_from(["--token", "a.key=1", "x={key: v}"]),
                                   max_size=6))
def test_redaction_is_idempotent(params: Any, argv: list[str]) -> None:
    once = redact_params(params)
    assert redact_params(once) == once
    assert redact_argv(redact_argv(argv)) == redact_argv(argv)


# -- events --------------------------------------------------------------------------------
def _secret_events() -> list[Any]:
    return [
        RunStarted(time=1.0, run_id="r", host="h", pid=1,
                   config={"sinks": {"n": {"type": "neptune", "api_token": "NEPTUNE-SECRET"},
                                     "m": {"type": "mlflow", "tracking_uri": "https://u:URI-SECRET@h"}}}),
        Hyperparams(time=1.0, params={"lr": 0.1, "wandb_api_key": "WANDB-SECRET"}),
        Text(time=1.0, step=1, name="note", text="pushed to https://me:TEXT-SECRET@git.example.com/r"),
        RunFinished(time=1.0, status="failed", error="ConnectionError: https://u:ERROR-SECRET@h refused"),
    ]


def test_redact_event_covers_the_events_that_carry_config_or_text() -> None:
    for event in _secret_events():
        redacted = redact_event(event)
        assert redacted is not event and type(redacted) is type(event)
        assert "SECRET" not in repr(redacted)
    assert redact_event(_secret_events()[1]).params["lr"] == 0.1  # type: ignore[attr-defined]


def test_other_events_pass_through_untouched() -> None:
    events = [
        Metrics(time=1.0, step=1, values={"api_key_loss": 0.5}),
        Timing(time=1.0, step=1, durations={"t": 0.1}),
        CheckpointSaved(time=1.0, path="/ckpt/a.ckpt", step=1),
        Hyperparams(time=1.0, params={"lr": 0.1}),
        RunFinished(time=1.0, status="completed"),
    ]
    for event in events:
        assert redact_event(event) is event
        assert resolve_event(event) is event


def test_the_bus_redacts_before_the_journal_and_every_sink(run_dir: Path) -> None:
    memory = MemorySink()
    with Bus(run_dir, sinks={"events": JsonlSink(), "memory": memory}) as bus:
        for event in _secret_events():
            bus.publish(event)
        bus.publish(Metrics(time=1.0, step=1, values={"loss": 0.5}))
        assert bus.flush(10)
    for path in (run_dir / "journal.msgpack", run_dir / "events.jsonl"):
        data = path.read_bytes()
        assert b"SECRET" not in data, path
        assert b"https://u:***@h" in data and b"lr" in data and b"WANDB" not in data
    assert len(read_journal(run_dir)) == 5
    assert "SECRET" not in repr(memory.events)
    assert any(isinstance(e, Hyperparams) and e.params == {"lr": 0.1, "wandb_api_key": REDACTED}
               for e in memory.events)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_jsonl_output_is_private_to_the_user(run_dir: Path) -> None:
    with Bus(run_dir, sinks={"events": JsonlSink("sub/events.jsonl")}) as bus:
        bus.publish(Metrics(time=1.0, step=1, values={"loss": 0.5}))
        assert bus.flush(10)
    assert os.stat(run_dir / "sub" / "events.jsonl").st_mode & 0o077 == 0
