"""Finding sink classes (entry points or an import path) and building them from YAML options."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any

import msgspec

from expbus.bus import POLICY_KEYS, Sink, SinkPolicy

from ._errors import ConfigError, close_match, unknown_key_error

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_sinks",
    "resolve_sink_class",
    "validate_sink_options",
    "create_sink",
    "RESERVED_KEYS",
    "WORKER_MODES",
    "WORKER_PRIORITIES",
    "check_workers",
    "check_worker_priority",
]

ENTRY_POINT_GROUP = "expbus.sinks"
# Keys of a sink's YAML block that are not its constructor's: ``type``, ``enabled``,
# ``workers`` and the bus policy (``when_full``, ``queue_size``, ...).
RESERVED_KEYS = frozenset({"type", "enabled", "workers", "worker_priority"}) | POLICY_KEYS
# Where a sink's work runs (``workers:``): a thread of the training process, or a child process.
WORKER_MODES = ("thread", "process")
# How a ``workers: process`` child is scheduled (``worker_priority:``): Linux's SCHED_IDLE
# (it never preempts the training process), or like any process.
WORKER_PRIORITIES = ("idle", "normal")


def _check_choice(value: object, path: str, choices: tuple[str, str], meaning: str) -> None:
    """Raise a :class:`ConfigError` naming ``path`` unless ``value`` is one of two ``choices`` or null."""
    if value is None or value in choices:
        return
    match = close_match(value, choices) if isinstance(value, str) else None
    hint = f"did you mean {match}? " if match else ""
    raise ConfigError(f"{path}: expected {choices[0]!r} or {choices[1]!r}, got {value!r}; {hint}({meaning})",
                      path=path, value=value)


def check_workers(value: object, path: str) -> None:
    """Raise a :class:`ConfigError` naming ``path`` unless ``value`` is ``thread``, ``process`` or null."""
    _check_choice(value, path, WORKER_MODES,
                  "'thread': the sink's own thread in the training process; 'process': a child process, "
                  "off the training process's GIL")


def check_worker_priority(value: object, path: str) -> None:
    """Raise a :class:`ConfigError` naming ``path`` unless ``value`` is ``idle``, ``normal`` or null."""
    _check_choice(value, path, WORKER_PRIORITIES,
                  "'idle': the worker process runs only on CPU time the training process leaves; "
                  "'normal': it competes like any process")


def available_sinks() -> dict[str, str]:
    """Registered sink names (entry-point group ``expbus.sinks``) and their targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_target(target: str, *, path: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as exc:  # ":Cls" (empty name), ".mod:Cls" (relative)
        raise ConfigError(
            f"{path}: cannot import module {module_name!r} for sink type {target!r}: {exc}",
            path=path,
            value=target,
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"{path}: module {module_name!r} has no attribute {attr!r} (sink type {target!r})",
                path=path,
                value=target,
            ) from exc
    return obj


def resolve_sink_class(type_name: str, *, path: str = "type") -> Callable[..., Sink]:
    """The class (or factory) for a ``type:`` value: a registered name or ``package.module:Class``.

    Raises:
        ConfigError: unknown name (listing the known ones) or an import path that fails.
    """
    if not isinstance(type_name, str) or not type_name:
        raise ConfigError(f"{path}: a sink needs a type (a registered name or 'package.module:Class'), "
                          f"got {type_name!r}", path=path, value=type_name)
    if ":" in type_name:
        return _import_target(type_name, path=path)  # type: ignore[no-any-return]
    known = available_sinks()
    if type_name not in known:
        match = close_match(type_name, known)
        raise ConfigError(
            f"{path}: unknown sink type {type_name!r}"
            + (f"; did you mean {match}?" if match else "")
            + f" (known: {', '.join(sorted(known))}; or an import path 'package.module:Class')",
            path=path,
            value=type_name,
        )
    try:
        return next(
            ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name
        ).load()  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{path}: sink type {type_name!r} cannot be loaded: {exc}", path=path,
                          value=type_name) from exc


@cache
def _signature(factory: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """(parameter name -> annotation, accepts **kwargs) of a sink's constructor."""
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    params: dict[str, Any] = {}
    var_kw = False
    for name, param in sig.parameters.items():
        if name == "self":
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params[name] = hints.get(name, Any)
    return params, var_kw


def _msgspec_path(exc: msgspec.ValidationError, base: str) -> tuple[str, str]:
    text = str(exc)
    detail, _, where = text.partition(" - at `$")
    where = where.rstrip("`")
    suffix = where.replace("[", ".").replace("]", "").replace("'", "").replace('"', "")
    return base + suffix, detail


def sink_default_policy(factory: Any, *, path: str = "type") -> dict[str, Any]:
    """The bus policy keys a sink class declares as its defaults, in a ``default_policy`` mapping.

    A network sink declares a longer retry budget than the bus's (a server restart must not
    cost a batch), e.g. ``default_policy = {"max_retries": 20}``; keys of the sink's YAML
    block win over these.

    Raises:
        ConfigError: the declared mapping has a key that is not a policy key.
    """
    declared = getattr(factory, "default_policy", None)
    if not isinstance(declared, Mapping):
        return {}
    unknown = sorted(set(declared) - POLICY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {getattr(factory, '__qualname__', factory)!r} declares default_policy keys "
                          f"that are not policy keys: {', '.join(map(str, unknown))} "
                          f"(valid: {', '.join(sorted(POLICY_KEYS))})", path=path)
    return dict(declared)


def validate_sink_options(
    sink_id: str, spec: Mapping[str, Any]
) -> tuple[Callable[..., Sink], dict[str, Any], SinkPolicy]:
    """Check one sink's YAML block; return (factory, constructor kwargs, policy).

    Raises:
        ConfigError: naming ``sinks.<id>.<key>``, the bad value and the fix.
    """
    base = f"sinks.{sink_id}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{base}: expected a mapping with a 'type' key, got {spec!r}", path=base, value=spec)
    factory = resolve_sink_class(spec.get("type"), path=f"{base}.type")  # type: ignore[arg-type]
    check_workers(spec.get("workers"), f"{base}.workers")
    check_worker_priority(spec.get("worker_priority"), f"{base}.worker_priority")
    # The sink class's own defaults (``default_policy``) under the block's keys.
    policy_opts = {**sink_default_policy(factory, path=f"{base}.type"),
                   **{k: v for k, v in spec.items() if k in POLICY_KEYS}}
    kwargs = {k: v for k, v in spec.items() if k not in RESERVED_KEYS}
    try:
        policy = msgspec.convert(policy_opts, SinkPolicy)
    except msgspec.ValidationError as exc:
        where, detail = _msgspec_path(exc, base)
        bad = _lookup(spec, where[len(base) + 1 :])
        raise ConfigError(f"{where}: {detail} (got {bad!r})", path=where, value=bad) from None
    except ValueError as exc:
        raise ConfigError(f"{base}: {exc}", path=base) from None
    params, var_kw = _signature(factory)
    if not var_kw:
        for key in kwargs:
            if key not in params:
                raise unknown_key_error(base, key, set(params) | RESERVED_KEYS)
    typed = {k: params[k] for k in kwargs if k in params and params[k] is not Any}
    if typed:
        model = msgspec.defstruct("Options", [(k, t) for k, t in typed.items()])
        try:
            msgspec.convert({k: kwargs[k] for k in typed}, model, strict=False)
        except msgspec.ValidationError as exc:
            where, detail = _msgspec_path(exc, base)
            bad = _lookup(spec, where[len(base) + 1 :])
            raise ConfigError(f"{where}: {detail} (got {bad!r})", path=where, value=bad) from None
        except TypeError:
            pass  # an annotation msgspec cannot check: the constructor will
    return factory, kwargs, policy


def _lookup(spec: Mapping[str, Any], dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split(".") if dotted else []:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def create_sink(sink_id: str, spec: Mapping[str, Any]) -> tuple[Sink, SinkPolicy]:
    """Validate and build one sink from its YAML block (``type`` plus options)."""
    factory, kwargs, policy = validate_sink_options(sink_id, spec)
    try:
        sink = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sinks.{sink_id}: {exc}", path=f"sinks.{sink_id}") from exc
    return sink, policy
