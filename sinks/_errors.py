"""Configuration errors that name the key, the bad value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ConfigError", "close_match", "unknown_key_error"]


class ConfigError(ValueError):
    """A configuration problem: names the key path, the value and what to do instead.

    Attributes:
        path: dotted key path (``sinks.tb.flush_sec``).
        value: the offending value, when there is one.
    """

    def __init__(self, message: str, *, path: str = "", value: object = None) -> None:
        self.path = path
        self.value = value
        super().__init__(message)


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word`` (case-insensitive), if any is close."""
    options = list(choices)
    lowered = {c.lower(): c for c in options}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def unknown_key_error(path: str, key: str, valid: Iterable[str], *, what: str = "key") -> ConfigError:
    """``sinks.tb.flush_sec: unknown key; did you mean flush_secs? (valid: ...)``."""
    valid = sorted(valid)
    full = f"{path}.{key}" if path else key
    message = f"{full}: unknown {what}"
    match = close_match(key, valid)
    if match is not None:
        message += f"; did you mean {match}?"
    if valid:
        message += f" (valid: {', '.join(valid)})"
    return ConfigError(message, path=full, value=key)
