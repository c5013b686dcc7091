"""Redaction of secrets from what a run records: hyperparameters, configuration, argv, text, URIs.

Pure Python (``re`` only): it runs in the bus thread for every event and must not import
torch, Lightning or a backend client.

What counts as a secret
-----------------------

* **By key.** A mapping key that contains, case-insensitively, ``key``, ``token``,
  ``secret`` or ``password`` (``api_key``, ``WANDB_API_KEY``, ``hf_token``,
  ``db_password``, ``client_secret``) is *sensitive*: every string under it, at any depth,
  is replaced by ``"***"`` (so ``api_keys: {wandb: ..., hf: ...}`` is covered too).
  One exception: the words ``tokenizer``/``tokenize``/``tokenization`` do not make a key
  sensitive, because every NeMo NLP and ASR config has a ``tokenizer:`` section whose
  ``type``, ``model`` and ``vocab_file`` are essential, secret-free hyperparameters
  (``tokenizer_api_token`` is still sensitive: it contains ``token`` besides the word).
* **Only strings are redacted.** Numbers, booleans and ``None`` under a sensitive key are
  kept: credentials are strings, while ``max_tokens: 512``, ``key_dim: 64`` or
  ``use_secret_sharing: false`` are hyperparameters a user needs to see. Mappings and
  lists are walked; keys themselves are never changed. The substring rule has false
  positives on strings (``monitor_key: val_loss`` is shown as ``***``); hiding a
  display value is the cheaper mistake.
* **In any string**, sensitive or not: the credentials of a URI
  (``https://user:pass@host`` becomes ``https://user:***@host``; a user part alone,
  ``https://ghp_abc@github.com``, may be a token and becomes ``https://***@github.com``)
  and the values of query parameters whose name contains one of the words
  (``?token=abc&x=1`` becomes ``?token=***&x=1``; also ``sig`` and ``signature``, as in
  pre-signed URLs).

Redaction is idempotent, never raises on odd input, and returns its input object
unchanged (the same object) when there is nothing to redact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ._events import Event, Hyperparams, RunFinished, RunStarted, Text

__all__ = [
    "REDACTED",
    "is_sensitive_key",
    "redact_text",
    "redact_params",
    "redact_argv",
    "redact_event",
    "REDACTED_EVENT_TYPES",
]

#: What a secret is replaced with.
REDACTED = "***"

_WORDS = ("key", "token", "secret", "password")
# Removed from a key before the word test (see the module docstring for why).
_NOT_SECRET = re.compile(r"tokeni[sz](?:er|ation|e)", re.IGNORECASE)
# scheme://userinfo@ : userinfo runs to the last '@' before the path, query or fragment,
# so an unencoded '@' in a password is still covered.
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@]*(?:@[^\s/?#@]*)*)@")
_QUERY_SECRET = re.compile(
    r"(?P<lead>[?&;](?P<name>[^=&;#\s]*?(?:key|token|secret|password|signature|sig(?=[=]))[^=&;#\s]*)=)"
    r"(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)
# ``name: value`` / ``name=value`` inside one argument (``x={api_key: abc}``, ``--json={"token": "t"}``).
_INLINE_SECRET = re.compile(
    r"""(?P<name>["']?[A-Za-z0-9_.\-]*(?:key|token|secret|password)[A-Za-z0-9_.\-]*["']?)"""
    r"""(?P<sep>\s*[:=]\s*)(?P<value>"[^"]*"|'[^']*'|[^,;}\]\s&]+)""",
    re.IGNORECASE,
)
# Deeper than this, a structure is replaced as a whole: a cyclic or absurdly nested value
# must not crash the bus thread (which would drop the event) nor leak.
_MAX_DEPTH = 64


def is_sensitive_key(key: object) -> bool:
    """Whether a mapping key (or a dotted/CLI option name) names a secret.

    ``api_key``, ``WANDB_API_KEY``, ``--db-password``, ``exp_manager.wandb_logger_kwargs.api_key``
    are; ``tokenizer``, ``lr`` are not. See the module docstring for the rule.
    """
    text = key if isinstance(key, str) else str(key)
    lowered = _NOT_SECRET.sub("", text.lower()) if "tokeni" in text.lower() else text.lower()
    return any(word in lowered for word in _WORDS)


def _userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, colon, _ = userinfo.partition(":")
    # With a password, the user name stays (it helps to know who); alone it may be a token.
    kept = f"{user}:{REDACTED}" if colon and user and user != REDACTED else REDACTED
    return f"{match.group('scheme')}{kept}@"


def redact_text(text: str) -> str:
    """``text`` with URI credentials and secret query-parameter values replaced by ``***``.

    Cheap for ordinary strings: the patterns run only when the text contains ``://`` or
    ``=`` after a ``?``/``&``/``;``.
    """
    if "://" in text and "@" in text:
        text = _URI_USERINFO.sub(_userinfo, text)
    if "=" in text and ("?" in text or "&" in text or ";" in text):
        text = _QUERY_SECRET.sub(lambda m: m.group("lead") + REDACTED, text)
    return text


def _redact(value: Any, sensitive: bool, depth: int) -> Any:
    """``value`` redacted; the very same object when nothing changed."""
    if isinstance(value, str):
        if sensitive:
            return REDACTED if value != REDACTED else value
        return redact_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return REDACTED if sensitive else value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        changed = False
        out: dict[Any, Any] = {}
        for key, item in value.items():
            new = _redact(item, sensitive or is_sensitive_key(key), depth + 1)
            changed = changed or new is not item
            out[key] = new
        return out if changed or not isinstance(value, dict) else value
    if isinstance(value, (list, tuple)):
        items = [_redact(item, sensitive, depth + 1) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return tuple(items) if type(value) is tuple else items
    if isinstance(value, (set, frozenset)):
        return _redact(sorted(value, key=repr), sensitive, depth)
    # Anything else (a path, an enum, an object) is recorded by its text downstream; judge that text.
    try:
        text = str(value)
    except Exception:
        return REDACTED
    redacted = REDACTED if sensitive else redact_text(text)
    return value if redacted == text else redacted


def redact_params(params: Any) -> Any:
    """Nested hyperparameters (mappings, lists, scalars) with their secrets replaced by ``***``.

    Returns ``params`` itself when it holds no secret; otherwise a redacted copy (the input
    is never modified). Never raises.

    Example:
        >>> redact_params({"lr": 0.1, "wandb": {"api_key": "abc"}, "uri": "https://u:p@h/x"})
        {'lr': 0.1, 'wandb': {'api_key': '***'}, 'uri': 'https://u:***@h/x'}
    """
    try:
        return _redact(params, False, 0)
    except Exception:
        # A mapping whose items() or __str__ misbehaves: record nothing of it rather than leak.
        return REDACTED


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with its secrets replaced by ``***``, for ``cmd-args.log``.

    * ``name=value`` (Hydra overrides ``+a.b.api_key=x``, ``--password=x``): the value, when
      the name is sensitive;
    * ``--api-key VALUE``: the argument after an option whose name is sensitive (unless it
      is itself an option);
    * ``name: value`` or ``name=value`` pairs inside an argument, when the name is sensitive
      (``a.b={api_key: abc}``, ``--json={"token": "t"}``);
    * URI credentials and secret query parameters anywhere.
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        arg = str(arg)
        if hide_next and not arg.startswith("-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        name, eq, _ = arg.partition("=")
        if eq and name and is_sensitive_key(name):
            out.append(f"{name}={REDACTED}")
            continue
        if arg.startswith("-") and not eq and is_sensitive_key(arg.lstrip("-")):
            hide_next = True
        out.append(_redact_inline(redact_text(arg)))
    return out


def _inline(match: re.Match[str]) -> str:
    name, value = match.group("name"), match.group("value")
    if not is_sensitive_key(name.strip("\"'")) or value.strip("\"'") == REDACTED:
        return match.group(0)
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{name}{match.group('sep')}{quote}{REDACTED}{quote}"


def _redact_inline(arg: str) -> str:
    # Only where a separator follows one of the words: most arguments pay one scan for ':'/'='.
    if ":" not in arg and "=" not in arg:
        return arg
    return _INLINE_SECRET.sub(_inline, arg)


def _redact_run_started(event: RunStarted) -> Event:
    config = redact_params(event.config)
    if config is event.config:
        return event
    return msgspec.structs.replace(event, config=config if isinstance(config, dict) else {})


def _redact_hyperparams(event: Hyperparams) -> Event:
    params = redact_params(event.params)
    if params is event.params:
        return event
    return msgspec.structs.replace(event, params=params if isinstance(params, dict) else {})


def _redact_text_event(event: Text) -> Event:
    # The name is a label; a text that is a URI or a command line may carry credentials.
    text = redact_text(event.text) if isinstance(event.text, str) else event.text
    return event if text is event.text else msgspec.structs.replace(event, text=text)


def _redact_run_finished(event: RunFinished) -> Event:
    # An error message can quote the URI of the server that failed.
    error = event.error
    if not isinstance(error, str):
        return event
    redacted = redact_text(error)
    return event if redacted is error else msgspec.structs.replace(event, error=redacted)


_HANDLERS: dict[type[Any], Any] = {
    RunStarted: _redact_run_started,
    Hyperparams: _redact_hyperparams,
    Text: _redact_text_event,
    RunFinished: _redact_run_finished,
}

#: The event types that may carry user configuration or free text, and so are redacted.
REDACTED_EVENT_TYPES: frozenset[type[Event]] = frozenset(_HANDLERS)


def redact_event(event: Event) -> Event:
    """A copy of ``event`` with its secrets redacted, or ``event`` itself when there are none.

    Only ``RunStarted`` (its config), ``Hyperparams``, ``Text`` and ``RunFinished`` (its
    error) can carry secrets; every other event is returned as is after one dictionary
    lookup. The bus applies this to every event before the journal and the sinks see it.
    """
    handler = _HANDLERS.get(type(event))
    if handler is None:
        return event
    # Every handler is total (redact_params never raises). Were one to fail, the bus drops
    # the event and logs it: losing a hyperparameter record is better than leaking a secret.
    return handler(event)  # type: ignore[no-any-return]
