"""expbus.bus: typed events, the non-blocking bus, the journal, and the sink protocol.

Imports msgspec, anyio and the standard library only: no torch, Lightning or backend client.
"""

from ._bus import Bus
from ._codec import (
    ValueResolver,
    from_json,
    from_msgpack,
    resolve_event,
    resolve_value,
    resolve_values_in_bulk,
    to_builtins,
    to_json,
    to_msgpack,
)
from ._cursor import Cursor, CursorStore
from ._events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    AnyEvent,
    CheckpointRemoved,
    CheckpointSaved,
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    RunStarted,
    Text,
    Timing,
    now,
)
from ._health import JournalHealth, SinkHealth, format_health
from ._journal import (
    JOURNAL_NAME,
    JournalReader,
    JournalWriter,
    count_records,
    journal_identity,
    journal_segments,
    read_journal,
)
from ._redact import REDACTED, is_sensitive_key, redact_argv, redact_event, redact_params, redact_text
from ._sink import POLICY_KEYS, Sink, SinkContext, SinkOpenError, SinkPathError, SinkPolicy, TransientSinkError

__all__ = [
    "Bus",
    "Event",
    "AnyEvent",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "RunStarted",
    "Hyperparams",
    "Metrics",
    "Text",
    "CheckpointSaved",
    "CheckpointRemoved",
    "Timing",
    "RunFinished",
    "now",
    "to_msgpack",
    "from_msgpack",
    "to_json",
    "from_json",
    "to_builtins",
    "resolve_event",
    "resolve_value",
    "resolve_values_in_bulk",
    "ValueResolver",
    "redact_event",
    "redact_params",
    "redact_text",
    "redact_argv",
    "is_sensitive_key",
    "REDACTED",
    "JournalReader",
    "JournalWriter",
    "read_journal",
    "journal_segments",
    "count_records",
    "journal_identity",
    "CursorStore",
    "Cursor",
    "JOURNAL_NAME",
    "Sink",
    "SinkContext",
    "SinkPolicy",
    "SinkOpenError",
    "SinkPathError",
    "TransientSinkError",
    "POLICY_KEYS",
    "SinkHealth",
    "JournalHealth",
    "format_health",
]
