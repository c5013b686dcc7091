"""The ``tensorboard`` sink: one TensorBoard event file per run (scalars, text, hparams) plus ``hparams.yaml``."""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import msgspec
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import UnsupportedValueType, ValidationError

from expbus.bus import (
    Event,
    Hyperparams,
    Metrics,
    RunFinished,
    SinkContext,
    Text,
    Timing,
)

from ._files import naming_path
from ._flatten import flatten_params
from ._optional import require
from ._state import load_state, save_state

__all__ = ["TensorBoardSink"]

log = logging.getLogger("expbus.sinks.tensorboard")

# Lightning's TensorBoardLogger.LOGGER_JOIN_CHAR: ``prefix`` + "-" + metric name.
_PREFIX_JOIN = "-"
# tf_record framing: uint64 length, uint32 masked CRC of it, data, uint32 masked CRC of data.
_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")
# Records up to this many bytes get their CRCs from the vectorised table (16 MiB at most);
# longer ones (a huge text) fall back to tensorboard's own pure-Python CRC.
_MAX_TABLE_BYTES = 16384
_file_counter = itertools.count()
# Seconds between rewrites of the state file when only the event file's offset changed.
_STATE_EVERY = 10.0


class TensorBoardSink:
    """Writes TensorBoard event files the way Lightning's ``TensorBoardLogger`` does, batched.

    Every ``Metrics`` event becomes one TensorBoard ``Event`` record at the event's step (the
    global step) and wall time, holding one ``simple_value`` per metric (what
    ``SummaryWriter.add_scalar`` writes, so TensorBoard's scalar dashboard and
    ``EventAccumulator.Scalars`` read them); the event's ``epoch`` is added as an ``epoch``
    scalar, as Lightning's logger connector adds it to every ``log_metrics`` call. ``Timing``
    events become scalars the same way; ``Text`` events become text-plugin summaries under
    ``<name>/text_summary`` (``SummaryWriter.add_text``'s tag). A batch is encoded and
    framed in bulk and reaches the file in one write.

    ``Hyperparams`` are written as ``log_hyperparams`` writes them: flattened with ``/``,
    non-primitive values as strings, in the hparams plugin's experiment and session-start
    summaries at step 0, with the ``hp_metric`` placeholder (-1) unless
    ``default_hp_metric`` is off; the nested dict also goes to ``hparams.yaml`` beside the
    event file (OmegaConf's YAML, like ``save_hparams_to_yaml``), rewritten with the
    accumulated parameters on every ``Hyperparams`` event (Lightning writes it once). A
    ``RunFinished`` of a completed run writes the session-end summary (``STATUS_SUCCESS``);
    failed or interrupted runs write none, because TensorBoard keeps only the first
    session-end of a file and a resumed run continues the same file.

    One event file per run directory: the file's name is kept in the sink's state
    (``.expbus/sinks/<id>.json``) and a resumed run appends to it, after cutting off a
    record torn by a crash. On the first step written after a resume, a ``SessionLog.START``
    at that step tells TensorBoard to drop what the previous attempt logged at that step and
    later (the steps a resume from an earlier checkpoint repeats), so no step shows twice.
    Under ``rank_zero_only: false``, ranks other than 0 write to ``rank_<r>`` inside the log
    directory (TensorBoard shows them as separate runs).

    There is no ``**kwargs`` pass-through: the sink frames its own records instead of going
    through a ``SummaryWriter``, and the writer options that apply here (``flush_secs``,
    ``max_queue``, ``filename_suffix``, ``purge_step``) are named options, so a misspelt one
    fails the configuration check instead of being ignored.

    Args:
        log_dir: directory of the event file; relative paths are inside the run directory,
            and the default is the run directory itself (NeMo's layout:
            ``exp_dir/name/version``).
        sub_dir: a sub-directory of ``log_dir`` for the event file and ``hparams.yaml``
            (``TensorBoardLogger``'s ``sub_dir``).
        prefix: put before every metric, timing and text tag, joined with ``-``
            (``TensorBoardLogger``'s ``prefix``).
        default_hp_metric: log the ``hp_metric`` placeholder (-1 at step 0) with the
            hyperparameters and name it as the experiment's metric, as ``TensorBoardLogger``
            does (with a ``prefix``, both are ``<prefix>-hp_metric``; Lightning prefixes only
            the scalar); off, the hyperparameters are written with no metric (Lightning then
            writes no hparams summaries at all).
        hparams_file: the YAML file of hyperparameters, relative to the event file's
            directory; ``None`` writes none.
        log_epoch: add each ``Metrics`` event's epoch as an ``epoch`` scalar (unless the event
            has a value of that name).
        flush_secs: accepted and validated for ``SummaryWriter`` compatibility; the sink
            hands every batch to the OS (the bus batches, and its delivery cursor must
            never count a record a crash loses), which is at least as often.
        max_queue: likewise accepted for ``SummaryWriter`` compatibility.
        filename_suffix: appended to the new event file's name (``SummaryWriter``'s
            ``filename_suffix``).
        purge_step: write a ``SessionLog.START`` at this step on open, so TensorBoard hides
            what is logged at this step or later before it in the file (``SummaryWriter``'s
            ``purge_step``); overrides ``purge_on_resume``.
        purge_on_resume: when continuing an existing event file, write that
            ``SessionLog.START`` at the first metric or timing step of the resumed run.
    """

    #: ``write`` hands everything to the OS before it returns, so the bus may advance this
    #: sink's delivery cursor as soon as a batch is acknowledged (see ``expbus.bus.Bus``).
    durable_writes = True

    def __init__(
        self,
        log_dir: str = ".",
        sub_dir: str | None = None,
        prefix: str = "",
        default_hp_metric: bool = True,
        hparams_file: str | None = "hparams.yaml",
        log_epoch: bool = True,
        flush_secs: float = 120.0,
        max_queue: int = 10,
        filename_suffix: str = "",
        purge_step: int | None = None,
        purge_on_resume: bool = True,
    ) -> None:
        if flush_secs < 0:
            raise ValueError(f"flush_secs must be >= 0 seconds, got {flush_secs}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if purge_step is not None and purge_step < 0:
            raise ValueError(f"purge_step must be >= 0, got {purge_step}")
        if "/" in filename_suffix or os.sep in filename_suffix:
            raise ValueError(f"filename_suffix must not contain a path separator, got {filename_suffix!r}")
        self.log_dir_option = log_dir
        self.sub_dir = sub_dir
        self.prefix = prefix
        self.default_hp_metric = default_hp_metric
        self.hparams_file = hparams_file
        self.log_epoch = log_epoch
        self.flush_secs = float(flush_secs)
        self.max_queue = max_queue
        self.filename_suffix = filename_suffix
        self.purge_step = purge_step
        self.purge_on_resume = purge_on_resume
        #: The directory of the event file, once open.
        self.log_dir: Path | None = None
        #: The event file, once open.
        self.event_file: Path | None = None
        #: The hyperparameters received so far (nested, as published).
        self.hparams: dict[str, Any] = {}
        self._context: SinkContext | None = None
        self._file: IO[bytes] | None = None
        self._pb: _Protos | None = None
        self._framer: _Framer | None = None
        self._state: dict[str, Any] = {}
        self._saved_state: dict[str, Any] = {}
        self._state_saved_at = 0.0
        self._offset = 0
        self._pending = 0
        self._last_flush = 0.0
        self._purge_at_next_step = False
        self._tags: dict[str, str] = {}
        self._text_tags_seen: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------
    def open(self, context: SinkContext) -> None:
        """Open (or continue) the run's event file in the log directory."""
        require("tensorboard", sink="tensorboard", extra="tensorboard")
        self._pb = _Protos()
        self._framer = _Framer(self._pb.crc_table, self._pb.masked_crc32c)
        log_dir = context.resolve(self.log_dir_option, key="log_dir")
        if self.sub_dir:
            # Resolved as one path, so a relative sub_dir cannot climb out of the run directory.
            log_dir = context.resolve(Path(self.log_dir_option) / Path(self.sub_dir).expanduser(), key="sub_dir")
        if context.global_rank > 0:
            # Only under rank_zero_only: false; a run of its own per rank keeps the steps of
            # different ranks apart (and each rank's file and state its own).
            log_dir = log_dir / f"rank_{context.global_rank}"
            context = msgspec.structs.replace(context, sink_id=f"{context.sink_id}.rank_{context.global_rank}")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._context = context
        self._state = load_state(context)
        self._tags = {}
        self._text_tags_seen = set()

        previous = self._previous_file(context)
        if previous is not None:
            self.event_file = previous
            self._offset = self._truncate_torn_tail(previous, self._state.pop("offset", None))
            self._file = open(previous, "ab")
            self._purge_at_next_step = self.purge_on_resume and self.purge_step is None
            if self._offset == 0:
                # Created but never written (a crash right after the first open).
                self._append([self._pb.file_version_event(time.time())])
        else:
            # EventFileWriter's naming, so tools that parse it (and the reader's sort by
            # name, which it takes for creation order) see an ordinary TensorBoard file.
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_file_counter)}{self.filename_suffix}"
            )
            self.event_file = log_dir / name
            self._file = open(self.event_file, "xb")
            self._offset = 0
            self._state = {"event_file": self._relative(self.event_file, context)}
            self._purge_at_next_step = False
            self._append([self._pb.file_version_event(time.time())])
        if self.purge_step is not None:
            self._append([self._pb.session_start_event(self.purge_step, time.time())])
        self._flush_file()
        # Name the file in the state now: a crash before the first flush still resumes it.
        self._save_state()

    def write(self, batch: Sequence[Event]) -> None:
        """Encode the batch (metrics, timings, text, hyperparameters) and append it in one write."""
        assert self._file is not None and self._pb is not None, "TensorBoardSink.write before open"
        pb = self._pb
        records: list[bytes] = []
        hparams_at: int | None = None
        hparams_time = 0.0
        for event in batch:
            if isinstance(event, Metrics):
                values: Any = event.values
                if self.log_epoch and event.epoch is not None and "epoch" not in values:
                    values = {**values, "epoch": float(event.epoch)}
                if values:
                    self._maybe_purge(records, event.step, event.time)
                    records.append(pb.scalars_event(self._tagged(values), event.step, event.time))
            elif isinstance(event, Timing):
                if event.durations:
                    self._maybe_purge(records, event.step, event.time)
                    records.append(pb.scalars_event(self._tagged(event.durations), event.step, event.time))
            elif isinstance(event, Text):
                tag = f"{self._tag(event.name)}/text_summary"
                first = tag not in self._text_tags_seen
                self._text_tags_seen.add(tag)
                records.append(pb.text_event(tag, event.text, event.step, event.time, with_metadata=first))
            elif isinstance(event, Hyperparams):
                # Lightning updates its hparams shallowly; several events of one batch become
                # one set of hparams summaries (TensorBoard reads only the first of a file).
                self.hparams.update(event.params)
                if hparams_at is None:
                    hparams_at, hparams_time = len(records), event.time
            elif isinstance(event, RunFinished):
                if event.status == "completed" and (hparams_at is not None or self._state.get("hparams_logged")):
                    records.append(pb.session_end_event(event.time))
        if hparams_at is not None:
            records[hparams_at:hparams_at] = self._hparams_records(hparams_time)
        if records:
            self._append(records)
        if hparams_at is not None and self.hparams_file:
            assert self.log_dir is not None
            _save_hparams_to_yaml(self.log_dir / Path(self.hparams_file).expanduser(), self.hparams)
        # Every batch reaches the OS before write returns: the bus's delivery cursor then
        # never counts a record a crash loses. The state file is rewritten when what it says
        # changes (the hyperparameters written), and otherwise every _STATE_EVERY seconds
        # only: its offset just spares a resume re-checking complete records, and each
        # rewrite is five system calls, each one a round of the GIL against training.
        self._flush_file()
        if self._state != self._saved_state or time.monotonic() - self._state_saved_at >= _STATE_EVERY:
            self._save_state()

    def flush(self) -> None:
        """Hand everything written to the OS and record how far the file is complete."""
        if self._file is not None:
            self._flush_file()
            self._save_state()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        if self._file is not None:
            try:
                self.flush()
            finally:
                self._file.close()
                self._file = None

    # -- encoding -----------------------------------------------------------------------
    def _tag(self, name: str) -> str:
        tag = self._tags.get(name)
        if tag is None:
            tag = self._tags[name] = f"{self.prefix}{_PREFIX_JOIN}{name}" if self.prefix else name
        return tag

    def _tagged(self, values: dict[str, float]) -> list[tuple[str, float]]:
        if not self.prefix:
            return list(values.items())
        return [(self._tag(k), v) for k, v in values.items()]

    def _maybe_purge(self, records: list[bytes], step: int, wall_time: float) -> None:
        if self._purge_at_next_step:
            assert self._pb is not None
            self._purge_at_next_step = False
            # At the front of the batch: what this attempt wrote before it (hyperparameters
            # at step 0, text) must not be purged with the previous attempt's data.
            records.insert(0, self._pb.session_start_event(step, wall_time))

    def _hparams_records(self, wall_time: float) -> list[bytes]:
        """``TensorBoardLogger.log_hyperparams``'s records (at step 0, as it logs with no step)."""
        assert self._pb is not None
        params = _sanitize_params(flatten_params(self.hparams))
        metric_tags = [self._tag("hp_metric")] if self.default_hp_metric else []
        records = self._pb.hparams_events(params, metric_tags, wall_time)
        if self.default_hp_metric and not self._state.get("hp_metric_logged"):
            # Once per event file: a resumed run publishing the same hyperparameters must not
            # add a second placeholder point at step 0.
            records.insert(0, self._pb.scalars_event([(metric_tags[0], -1.0)], 0, wall_time))
            self._state["hp_metric_logged"] = True
        self._state["hparams_logged"] = True
        return records

    # -- the file -----------------------------------------------------------------------
    def _append(self, records: list[bytes]) -> None:
        assert self._file is not None and self._framer is not None
        data = self._framer.frame(records)
        with naming_path(self.event_file):
            self._file.write(data)
        self._offset += len(data)
        self._pending += len(records)

    def _flush_file(self) -> None:
        assert self._file is not None
        with naming_path(self.event_file):
            self._file.flush()
        self._pending = 0
        self._last_flush = time.monotonic()

    def _save_state(self) -> None:
        assert self._context is not None
        # Everything up to ``offset`` is complete records: a resume scans only past it (an
        # older offset is still right, the scan just starts earlier).
        save_state(self._context, {**self._state, "offset": self._offset})
        self._saved_state = dict(self._state)
        self._state_saved_at = time.monotonic()

    @staticmethod
    def _relative(path: Path, context: SinkContext) -> str:
        try:
            return str(path.relative_to(context.run_dir))
        except ValueError:
            return str(path)

    def _previous_file(self, context: SinkContext) -> Path | None:
        """This sink's event file from an earlier attempt of the run, if it is still here."""
        name = self._state.get("event_file")
        if not isinstance(name, str) or not name:
            return None
        path = context.resolve(name)
        assert self.log_dir is not None
        # Only continue it where this configuration writes (log_dir/sub_dir may have changed).
        if path.parent.resolve() != self.log_dir.resolve() or not path.is_file():
            return None
        return path

    def _truncate_torn_tail(self, path: Path, known_good: Any) -> int:
        """Cut off a partial or corrupt record at the end of ``path``; return the new size.

        A crash can leave half a record (or zeros) at the end. TensorBoard's readers wait at
        a partial record for the rest to arrive, so appending after one would make the new
        records unreadable; cut the file back to its last complete record first.
        """
        assert self._pb is not None
        size = path.stat().st_size
        start = known_good if isinstance(known_good, int) and 0 <= known_good <= size else 0
        if start == size:
            return size
        crc = self._pb.masked_crc32c
        valid = start
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            pos = start
            last: tuple[int, int] | None = None
            while pos + 12 <= size:
                (length,) = _HEADER.unpack_from(view, pos)
                if _CRC.unpack_from(view, pos + 8)[0] != crc(view[pos : pos + 8]):
                    break
                end = pos + 12 + length + 4
                if end > size:
                    break
                last = (pos, end)
                pos = end
            valid = pos
            if last is not None:
                # The last record's data is where a torn write would be: check it too.
                begin, end = last
                if _CRC.unpack_from(view, end - 4)[0] != crc(view[begin + 12 : end - 4]):
                    valid = begin
        if valid < size:
            log.warning(
                "tensorboard sink: cutting %d bytes of a partial record off the end of %s before continuing it",
                size - valid,
                path,
            )
            os.truncate(path, valid)
        return valid


class _Protos:
    """tensorboard's protos and plugin metadata, imported when the sink opens."""

    def __init__(self) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import CRC_TABLE, masked_crc32c
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from tensorboard.plugins.hparams import metadata as hparams_metadata
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.plugins.text import plugin_data_pb2 as text_plugin_data_pb2

        self.event_pb2 = event_pb2
        self.summary_pb2 = summary_pb2
        self.api_pb2 = api_pb2
        self.plugin_data_pb2 = plugin_data_pb2
        self.hparams_metadata = hparams_metadata
        self.crc_table = CRC_TABLE
        self.masked_crc32c = masked_crc32c
        self._Event = event_pb2.Event
        self._scalars = _ScalarsEncoder()
        self._Summary = summary_pb2.Summary
        self._Value = summary_pb2.Summary.Value
        self._TensorProto = tensor_pb2.TensorProto
        self._shape_1 = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])
        # SummaryWriter.add_text's metadata: the text plugin, no display name.
        self._text_metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=text_metadata.PLUGIN_NAME,
                content=text_plugin_data_pb2.TextPluginData(version=text_metadata.PROTO_VERSION).SerializeToString(),
            )
        )

    def file_version_event(self, wall_time: float) -> bytes:
        # EventFileWriter's first record; ``brain.Event:2`` makes readers honour SessionLog.START.
        return self._Event(
            wall_time=wall_time,
            file_version="brain.Event:2",
            source_metadata=self.event_pb2.SourceMetadata(writer="expbus.sinks.tensorboard"),
        ).SerializeToString()

    def session_start_event(self, step: int, wall_time: float) -> bytes:
        log_ = self.event_pb2.SessionLog(status=self.event_pb2.SessionLog.START)
        return self._Event(wall_time=wall_time, step=step, session_log=log_).SerializeToString()

    def scalars_event(self, values: list[tuple[str, float]], step: int, wall_time: float) -> bytes:
        """An ``Event`` of ``simple_value`` scalars, serialised by hand: the bytes protobuf writes.

        The fields are fixed (``Event.wall_time`` double, ``step`` varint, ``summary``; each
        ``Summary.Value`` a tag and a float32), so the encoding is a cached prefix per tag
        plus four bytes per value: about 4x less CPU than building the messages (68 -> 18 µs
        for 100 values), in a thread that shares the training process's GIL.
        """
        if wall_time == 0.0:
            # proto3 leaves a zero wall_time out; never seen from the bus, left to protobuf.
            value = self._Value
            summary = self._Summary(value=[value(tag=k, simple_value=v) for k, v in values])
            return self._Event(wall_time=wall_time, step=step, summary=summary).SerializeToString()
        return self._scalars.event(values, step, wall_time)

    def text_event(self, tag: str, text: str, step: int, wall_time: float, *, with_metadata: bool) -> bytes:
        # SummaryWriter.add_text's summary; the plugin metadata is only needed on a tag's first
        # value (readers keep the first), as TensorFlow's FileWriter strips it from the rest.
        tensor = self._TensorProto(dtype="DT_STRING", string_val=[text.encode("utf-8")], tensor_shape=self._shape_1)
        value = self._Value(tag=tag, tensor=tensor)
        if with_metadata:
            value.metadata.CopyFrom(self._text_metadata)
        return self._Event(wall_time=wall_time, step=step, summary=self._Summary(value=[value])).SerializeToString()

    def hparams_events(self, params: dict[str, Any], metric_tags: list[str], wall_time: float) -> list[bytes]:
        """The experiment and session-start summaries of ``torch.utils.tensorboard.summary.hparams``."""
        api, data = self.api_pb2, self.plugin_data_pb2
        start = data.SessionStartInfo()
        infos = []
        for key, value in params.items():
            # torch's hparams(): bool is an int, so it goes in as a number, like Lightning's.
            if isinstance(value, (int, float)):
                start.hparams[key].number_value = value
                infos.append(api.HParamInfo(name=key, type=api.DataType.DATA_TYPE_FLOAT64))
            elif isinstance(value, str):
                start.hparams[key].string_value = value
                infos.append(api.HParamInfo(name=key, type=api.DataType.DATA_TYPE_STRING))
        experiment = api.Experiment(
            hparam_infos=infos, metric_infos=[api.MetricInfo(name=api.MetricName(tag=t)) for t in metric_tags]
        )
        return [
            self._plugin_event(self.hparams_metadata.EXPERIMENT_TAG, data.HParamsPluginData(experiment=experiment),
                               wall_time),
            self._plugin_event(self.hparams_metadata.SESSION_START_INFO_TAG,
                               data.HParamsPluginData(session_start_info=start), wall_time),
        ]

    def session_end_event(self, wall_time: float) -> bytes:
        end = self.plugin_data_pb2.SessionEndInfo(status=self.api_pb2.Status.STATUS_SUCCESS, end_time_secs=wall_time)
        return self._plugin_event(
            self.hparams_metadata.SESSION_END_INFO_TAG, self.plugin_data_pb2.HParamsPluginData(session_end_info=end),
            wall_time,
        )

    def _plugin_event(self, tag: str, plugin_data: Any, wall_time: float) -> bytes:
        # tensorboard's own hparams summaries (summary_v2._summary_pb) carry a null tensor, so
        # that readers which skip value-less summaries (the Rust data server) keep them.
        value = self._Value(
            tag=tag,
            metadata=self.hparams_metadata.create_summary_metadata(plugin_data),
            tensor=self.hparams_metadata.NULL_TENSOR,
        )
        return self._Event(wall_time=wall_time, step=0, summary=self._Summary(value=[value])).SerializeToString()


_F32 = struct.Struct("<f").pack
_F64 = struct.Struct("<d").pack


def _varint(number: int) -> bytes:
    """Protobuf's base-128 varint (negative int64s as their 64-bit two's complement)."""
    if number < 0:
        number += 1 << 64
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


class _ScalarsEncoder:
    """Serialises ``Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value)...]))``.

    Byte for byte what protobuf writes for a non-zero ``wall_time`` (tested against it): field
    1 (``wall_time``, fixed64), field 2 (``step``, varint; left out when 0), field 5
    (``summary``, length-delimited) holding one ``value`` (field 1) per scalar, each its
    ``tag`` (field 1) and ``simple_value`` (field 2, fixed32: a float32, so a number beyond
    its range is an infinity, as protobuf converts it).
    """

    def __init__(self) -> None:
        self._prefixes: dict[str, bytes] = {}

    def _prefix(self, tag: str) -> bytes:
        encoded = tag.encode("utf-8")
        inner = b"\x0a" + _varint(len(encoded)) + encoded + b"\x15"
        prefix = self._prefixes[tag] = b"\x0a" + _varint(len(inner) + 4) + inner
        return prefix

    def event(self, values: list[tuple[str, float]], step: int, wall_time: float) -> bytes:
        prefixes = self._prefixes
        parts: list[bytes] = []
        append = parts.append
        for tag, value in values:
            append(prefixes.get(tag) or self._prefix(tag))
            try:
                append(_F32(value))
            except OverflowError:  # beyond float32: protobuf stores the infinity of that sign
                append(_F32(math.copysign(math.inf, value)))
        summary = b"".join(parts)
        step_field = b"\x10" + _varint(step) if step else b""
        return b"\x09" + _F64(wall_time) + step_field + b"\x2a" + _varint(len(summary)) + summary


class _Framer:
    """tf_record framing (tensorboard's ``RecordWriter`` format) of many records at once.

    Each record is ``length | masked_crc32c(length) | data | masked_crc32c(data)``.
    tensorboard computes CRC-32C in pure Python, about 0.1 us a byte, which alone would cap a
    sink at ~100k small records/s. Here the CRCs of a whole batch come from one vectorised
    numpy pass: CRC-32C is linear, so a record's CRC register is the XOR, over its bytes, of
    ``M[k][byte]``, the register of that byte followed by ``k`` zero bytes (``k`` = bytes
    after it in the record), plus the contribution of the all-ones preset for that length.
    """

    def __init__(self, table: Sequence[int], masked_crc32c: Any) -> None:
        import numpy as np

        self._np = np
        self._table = np.array(table, dtype=np.uint32)
        self._table_py = table
        self._masked_crc32c = masked_crc32c
        # M[k][b]; grown on demand. Z[n]: the register after n zero bytes from the preset.
        self._m = self._table[None, :].copy()
        self._z = np.array([0xFFFFFFFF, table[0xFF] ^ 0x00FFFFFF], dtype=np.uint32)

    def _grow(self, width: int) -> None:
        """Extend ``M`` and ``Z`` to records of ``width`` bytes, by doubling.

        ``M[k][b]`` is ``f^(k+1)(b)``, where ``f(r) = table[r & 0xFF] ^ (r >> 8)`` feeds the
        register one zero byte. ``f`` is linear and shifts a register's byte ``p`` down to
        byte 0 in ``p`` steps, so for ``j >= 4``
        ``f^j(r) = M[j-1][r0] ^ M[j-2][r1] ^ M[j-3][r2] ^ M[j-4][r3]`` (``ri``: the bytes of
        ``r``). With ``h`` rows known, rows ``h .. 2h-1`` are ``f^h`` of rows ``0 .. h-1``:
        one vectorised step per doubling instead of one numpy call per row (a K=100 batch's
        first write took ~30 ms growing the table row by row, on the sink's thread, holding
        the GIL the training thread needs).
        """
        np = self._np
        have = self._m.shape[0]
        if have >= width:
            return
        new = min(max(width, 2 * have), _MAX_TABLE_BYTES)
        m = self._m
        table = self._table
        while m.shape[0] < min(4, new):
            m = np.vstack([m, table[m[-1] & 0xFF] ^ (m[-1] >> 8)])
        while m.shape[0] < new:
            h = m.shape[0]
            base = m[: min(h, new - h)]
            rows = (m[h - 1][base & 0xFF] ^ m[h - 2][(base >> 8) & 0xFF]
                    ^ m[h - 3][(base >> 16) & 0xFF] ^ m[h - 4][base >> 24])
            m = np.concatenate([m, rows])
        self._m = m
        # Z[n] = f^n(0xFFFFFFFF): every byte of the preset is 0xFF.
        z = np.empty(new + 1, dtype=np.uint32)
        reg = 0xFFFFFFFF
        for k in range(min(4, new + 1)):
            z[k] = reg
            reg = self._table_py[reg & 0xFF] ^ (reg >> 8)
        if new >= 4:
            col = m[:, 0xFF]
            z[4:] = col[3:new] ^ col[2 : new - 1] ^ col[1 : new - 2] ^ col[0 : new - 3]
        self._z = z

    def masked_crcs(self, flat: bytes, lengths: Any) -> Any:
        """Masked CRC-32C of consecutive records in ``flat`` (lengths > 0, <= the table's size)."""
        np = self._np
        self._grow(int(lengths.max()))
        data = np.frombuffer(flat, dtype=np.uint8)
        ends = np.cumsum(lengths)
        after = np.repeat(ends - 1, lengths) - np.arange(data.size)
        contributions = self._m.ravel()[after * 256 + data]
        register = np.bitwise_xor.reduceat(contributions, ends - lengths)
        crc = register ^ self._z[lengths] ^ np.uint32(0xFFFFFFFF)
        return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)

    def frame(self, records: list[bytes]) -> bytes:
        """The framed bytes of ``records``, ready to append to an event file."""
        np = self._np
        n = len(records)
        lengths = np.fromiter(map(len, records), dtype=np.int64, count=n)
        if int(lengths.sum()) < 512:
            # So few bytes that numpy's fixed cost would dominate.
            return b"".join(self._frame_one(record) for record in records)
        headers = lengths.astype("<u8")
        header_crcs = self.masked_crcs(headers.tobytes(), np.full(n, 8, dtype=np.int64))
        in_table = (lengths > 0) & (lengths <= _MAX_TABLE_BYTES)
        if in_table.all():
            crcs = self.masked_crcs(b"".join(records), lengths)
        else:
            # A record too long for the table (a huge text) gets tensorboard's own CRC.
            crcs = np.empty(n, dtype=np.uint32)
            small = np.flatnonzero(in_table)
            if small.size:
                crcs[small] = self.masked_crcs(b"".join(records[i] for i in small), lengths[small])
            for i in np.flatnonzero(~in_table).tolist():
                crcs[i] = self._masked_crc32c(records[i])
        data_crcs = crcs.astype("<u4").tobytes()
        prefix = np.empty((n, 12), dtype=np.uint8)
        prefix[:, :8] = headers.view(np.uint8).reshape(n, 8)
        prefix[:, 8:] = header_crcs.astype("<u4").view(np.uint8).reshape(n, 4)
        heads = prefix.tobytes()
        parts: list[bytes] = []
        for i, record in enumerate(records):
            parts += (heads[12 * i : 12 * i + 12], record, data_crcs[4 * i : 4 * i + 4])
        return b"".join(parts)

    def _frame_one(self, record: bytes) -> bytes:
        # tensorboard's RecordWriter.write, into bytes instead of a file.
        header = _HEADER.pack(len(record))
        crc = self._masked_crc32c
        return header + _CRC.pack(crc(header)) + record + _CRC.pack(crc(record))


def _sanitize_params(params: dict[str, Any]) -> dict[str, Any]:
    """Lightning's ``_sanitize_params``: anything but bool/int/float/str becomes its ``str``."""
    return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in params.items()}


def _save_hparams_to_yaml(path: Path, hparams: dict[str, Any]) -> None:
    """Lightning's ``save_hparams_to_yaml`` for a dict (OmegaConf first, then plain YAML), atomically.

    Another sink (``csv``) may keep an ``hparams.yaml`` in the same directory: writing a
    sibling file and renaming it means a reader never sees a half-written file.
    """
    try:
        text = OmegaConf.to_yaml(OmegaConf.create(hparams))
    except (UnsupportedValueType, ValidationError, ValueError):
        allowed = {}
        for key, value in hparams.items():
            try:
                yaml.dump(value)
            except (TypeError, ValueError, yaml.YAMLError):
                continue
            allowed[key] = value
        text = yaml.dump(allowed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process and thread (not mkstemp's 0600 file): the YAML keeps the
    # permissions Lightning's file would have.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
