"""Encoding of events to msgpack and JSON, and resolution of not-yet-resolved values.

JSON has no NaN or infinity. msgspec would write them as ``null`` (losing the value), so
events holding a non-finite float are written with Python's ``json`` conventions
(``NaN``, ``Infinity``, ``-Infinity``), the same as DLLogger, pandas and ``json.loads``
accept. Every event therefore round-trips exactly through both formats.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from typing import Any

import msgspec

from ._events import AnyEvent, Event, Metrics, Timing
from ._redact import REDACTED_EVENT_TYPES, redact_event

__all__ = [
    "resolve_value",
    "resolve_event",
    "resolve_values_in_bulk",
    "ValueResolver",
    "to_msgpack",
    "from_msgpack",
    "to_json",
    "from_json",
    "to_builtins",
]

_msgpack_decoder = msgspec.msgpack.Decoder(AnyEvent)
_json_decoder = msgspec.json.Decoder(AnyEvent)


def resolve_value(value: Any) -> Any:
    """Turn a tensor-like scalar (anything with ``item()``) into a Python number.

    Called in the bus thread, never on the training thread. Plain numbers pass through.

    A one-element value with ``tolist()`` (a 0-dim torch tensor, a numpy scalar) is read with
    ``tolist()``, not ``item()``: torch's ``item()`` lets the GIL go around the read, and a
    thread that lets the GIL go while the training thread runs Python waits up to the
    interpreter's switch interval (5 ms) to get it back, then forces a switch that stalls the
    training thread in turn. One ``item()`` per logged value made the training thread wait
    about 2.5 ms per step at K=100 (workload a); on the 2-core VM, 100 ``item()`` calls took
    95 ms against a busy Python thread, 100 ``tolist()`` calls 37 µs, the same as alone.
    """
    if type(value) is float or type(value) is int:
        return value
    item = getattr(value, "item", None)
    if item is not None:
        tolist = getattr(value, "tolist", None)
        scalar = tolist() if tolist is not None else None
        value = scalar if scalar is not None and not isinstance(scalar, list) else item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return value
    return float(value)


_PLAIN_TYPES = frozenset({float, int})


def _needs_resolution(values: dict[str, Any]) -> bool:
    # set(map(type, ...)) runs in C: several times cheaper than a Python loop at K=100.
    return not _PLAIN_TYPES.issuperset(map(type, values.values()))


_tolist = operator.methodcaller("tolist")


def _resolved(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every value a Python number (see :func:`resolve_value`).

    The common case, every value a 0-dim tensor (what ``self.log`` hands Lightning's
    loggers), is read with one C-level ``map`` of ``tolist``: about 40% less CPU than a
    Python call per value (64 against 109 µs for 100 values), on the thread that shares
    the GIL with training. Anything else (bools, mixed types, a tensor of several
    elements) takes :func:`resolve_value` value by value.
    """
    kinds = set(map(type, values.values()))
    if len(kinds) == 1:
        (kind,) = kinds
        if hasattr(kind, "tolist") and hasattr(kind, "item"):
            numbers = list(map(_tolist, values.values()))
            if _PLAIN_TYPES.issuperset(map(type, numbers)):
                return dict(zip(values, numbers, strict=True))
    return {k: resolve_value(v) for k, v in values.items()}


def resolve_event(event: Event) -> Event:
    """Return the event ready for the journal and the sinks.

    Every metric/timing value is resolved to a Python number, and the events that may
    carry user configuration or free text (``RunStarted``, ``Hyperparams``, ``Text``,
    ``RunFinished``) have their secrets redacted (see :func:`expbus.bus.redact_event`).
    The bus calls this for every event before journaling and fan-out, so no sink and no
    journal ever holds an API key given in the hyperparameters.
    """
    # Metrics and Timing first, and settled by one identity test each: they are the
    # high-volume events, and they never carry a secret.
    if type(event) is Metrics:
        if _needs_resolution(event.values):
            return msgspec.structs.replace(event, values=_resolved(event.values))
        return event
    if type(event) is Timing:
        if _needs_resolution(event.durations):
            return msgspec.structs.replace(event, durations=_resolved(event.durations))
        return event
    if type(event) in REDACTED_EVENT_TYPES:
        return redact_event(event)
    return event


#: Resolves many values in one call (see :func:`resolve_values_in_bulk`): given a list of
#: values (tensors and plain numbers mixed), returns the list of Python numbers in order.
ValueResolver = Callable[[list[Any]], list[Any]]


def resolve_values_in_bulk(items: list[Any], resolver: ValueResolver) -> None:
    """Resolve the values of every ``Metrics`` / ``Timing`` in ``items`` with one ``resolver`` call.

    Why: resolving tensors one ``item()`` at a time costs a dispatcher call per value, and
    each of them lets the GIL go and takes it back (a handoff the training thread may be
    waiting on), or, for device tensors, a device-to-host copy per value. A resolver given
    every pending value of a drain at once (the bridge's stacks them: one call per device
    and dtype) does that work once. ``items`` is updated in place (resolved copies of the
    events replace them); everything else, markers included, is left as it is. If the
    resolver fails or answers with the wrong length, nothing changes and
    :func:`resolve_event` resolves those values one by one, reporting what it cannot.
    """
    slots: list[int] = []
    values: list[Any] = []
    for index, item in enumerate(items):
        kind = type(item)
        if kind is Metrics:
            pending = item.values
        elif kind is Timing:
            pending = item.durations
        else:
            continue
        if pending and _needs_resolution(pending):
            slots.append(index)
            values.extend(pending.values())
    if not values:
        return
    try:
        resolved = resolver(values)
    except Exception:
        return
    if len(resolved) != len(values):
        return
    start = 0
    for index in slots:
        item = items[index]
        if type(item) is Metrics:
            keys = item.values
            stop = start + len(keys)
            items[index] = msgspec.structs.replace(item, values=dict(zip(keys, resolved[start:stop], strict=True)))
        else:
            keys = item.durations
            stop = start + len(keys)
            items[index] = msgspec.structs.replace(item, durations=dict(zip(keys, resolved[start:stop], strict=True)))
        start = stop


def _enc_hook(obj: Any) -> Any:
    # Last resort for values msgspec does not know (tensors, numpy scalars, paths).
    if hasattr(obj, "item"):
        return resolve_value(obj)
    if hasattr(obj, "__fspath__"):
        return str(obj)
    # Anything else (a class in hparams, say) is recorded by its text, never an error.
    return str(obj)


_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def to_msgpack(event: Event) -> bytes:
    """Encode one event as msgpack (the journal's record payload)."""
    return _msgpack_encoder.encode(event)


def from_msgpack(data: bytes) -> Event:
    """Decode one msgpack-encoded event."""
    return _msgpack_decoder.decode(data)  # type: ignore[no-any-return]


def _has_non_finite(event: Event) -> bool:
    values: dict[str, Any]
    if type(event) is Metrics:
        values = event.values
    elif type(event) is Timing:
        values = event.durations
    else:
        # Rare events: check their float fields (a checkpoint's monitor value may be inf).
        return any(
            type(v) is float and not math.isfinite(v)
            for v in (getattr(event, f) for f in event.__struct_fields__)
        )
    try:
        # NaN and infinity carry through a sum, so a finite sum means all are finite
        # (a C-speed fast path); an overflow to inf falls back to the exact scan.
        if math.isfinite(sum(values.values())):
            return False
    except TypeError:
        pass
    for value in values.values():
        if type(value) is float and not math.isfinite(value):
            return True
    return False


def to_builtins(event: Event) -> dict[str, Any]:
    """The event as a plain ``dict`` (with its ``kind`` tag), for sinks that format themselves."""
    return msgspec.to_builtins(event, enc_hook=_enc_hook)  # type: ignore[no-any-return]


def to_json(event: Event) -> bytes:
    """Encode one event as a JSON object (one line, no trailing newline)."""
    if _has_non_finite(event):
        return json.dumps(to_builtins(event), separators=(",", ":")).encode()
    return _json_encoder.encode(event)


def from_json(data: bytes | str) -> Event:
    """Decode one JSON object written by :func:`to_json`."""
    try:
        return _json_decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError:
        # NaN / Infinity literals: valid for Python's json, not for msgspec's.
        return msgspec.convert(json.loads(data), AnyEvent)  # type: ignore[arg-type]
