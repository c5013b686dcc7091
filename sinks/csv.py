"""The ``csv`` sink: ``metrics.csv`` and ``hparams.yaml`` as Lightning's ``CSVLogger`` writes them."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import UnsupportedValueType, ValidationError

from expbus.bus import Event, Hyperparams, Metrics, SinkContext

from ._files import naming_path

__all__ = ["CsvSink"]


class CsvSink:
    """Writes metrics as CSV rows and hyperparameters as YAML, like Lightning's ``CSVLogger``.

    One row per ``Metrics`` event, as ``CSVLogger`` writes one row per ``log_metrics``
    call: the event's values, ``epoch`` when the event has one (Lightning's logger connector
    adds it before ``log_metrics``) and ``step``. Rows of the same step are not merged (Lightning
    does not merge them either: a validation row and a training row can share a step).
    The columns are every key seen so far, sorted; when a batch brings a new key, the file
    is rewritten with the widened header and the earlier rows get empty cells. Rows are
    appended at the end of every ``write``. Hyperparameters accumulate across
    ``Hyperparams`` events and the YAML file is rewritten each time, as
    ``CSVLogger.log_hyperparams`` does (with OmegaConf, as Lightning does when installed).

    Args:
        path: the CSV file; relative paths are inside the run directory.
        hparams_file: the YAML file of hyperparameters, relative to the CSV file's directory;
            ``None`` writes none.
        append: continue an existing CSV file (resumed runs), keeping its columns. Lightning
            deletes the file of a reused version directory instead.
    """

    #: ``write`` hands everything to the OS before it returns, so the bus may advance this
    #: sink's delivery cursor as soon as a batch is acknowledged (see ``expbus.bus.Bus``).
    durable_writes = True

    def __init__(
        self,
        path: str = "metrics.csv",
        hparams_file: str | None = "hparams.yaml",
        append: bool = True,
    ) -> None:
        self.path_option = path
        self.hparams_file = hparams_file
        self.append = append
        self.path: Path | None = None
        self.hparams_path: Path | None = None
        self.hparams: dict[str, Any] = {}
        self.metrics_keys: list[str] = []

    def open(self, context: SinkContext) -> None:
        """Resolve the files in the run directory; on ``append``, read the existing header."""
        self.path = context.resolve(self.path_option)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.hparams_file:
            self.hparams_path = self.path.parent / Path(self.hparams_file).expanduser()
        self.metrics_keys = []
        if self.path.exists():
            if self.append:
                with open(self.path, newline="", encoding="utf-8") as file:
                    self.metrics_keys = next(csv.reader(file), [])
            else:
                self.path.unlink()

    def write(self, batch: Sequence[Event]) -> None:
        """Append one row per ``Metrics`` event; rewrite the YAML file on ``Hyperparams``."""
        assert self.path is not None, "CsvSink.write before open"
        rows: list[dict[str, Any]] = []
        hparams_changed = False
        for event in batch:
            if isinstance(event, Metrics):
                row: dict[str, Any] = dict(event.values)
                if event.epoch is not None:
                    row.setdefault("epoch", event.epoch)
                # _ExperimentWriter.log_metrics: ``step`` overrides a metric of that name.
                row["step"] = event.step
                rows.append(row)
            elif isinstance(event, Hyperparams):
                self.hparams.update(event.params)
                hparams_changed = True
        if rows:
            self._save(rows)
        if hparams_changed and self.hparams_path is not None:
            _save_hparams_to_yaml(self.hparams_path, self.hparams)

    def flush(self) -> None:
        """Nothing to do: every ``write`` closes the file it appended to."""

    def close(self) -> None:
        """Nothing to release: no file stays open between writes."""

    def _save(self, rows: list[dict[str, Any]]) -> None:
        # _ExperimentWriter.save: widen (and sort) the header, rewrite if it grew, append.
        assert self.path is not None
        current = set().union(*rows)
        new_keys = current - set(self.metrics_keys)
        self.metrics_keys.extend(new_keys)
        self.metrics_keys.sort()
        file_exists = self.path.is_file()
        if new_keys and file_exists:
            self._rewrite_with_new_header()
        # A write error (disk full) surfaces when the file closes, without a file name: name it.
        with naming_path(self.path), open(self.path, "a" if file_exists else "w", newline="",
                                          encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            if not file_exists:
                writer.writeheader()
            writer.writerows(rows)

    def _rewrite_with_new_header(self) -> None:
        assert self.path is not None
        with open(self.path, newline="", encoding="utf-8") as file:
            old_rows = list(csv.DictReader(file))
        # Unlike Lightning (which rewrites in place), write a sibling file and rename it
        # over the old one, so that a crash mid-rewrite cannot lose the earlier rows.
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(old_rows)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _save_hparams_to_yaml(path: Path, hparams: dict[str, Any]) -> None:
    """Lightning's ``save_hparams_to_yaml`` for a dict (OmegaConf first, then plain YAML).

    Written to a temporary file and renamed, because other sinks (tensorboard) write the same
    ``hparams.yaml`` beside it from their own threads: a reader never sees a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fp:
            try:
                OmegaConf.save(hparams, fp)
            except (UnsupportedValueType, ValidationError):
                # Lightning's fallback: drop the values YAML cannot dump, keep the rest.
                fp.seek(0)
                fp.truncate()
                allowed: dict[str, Any] = {}
                for key, value in hparams.items():
                    try:
                        yaml.dump(value)
                    except (TypeError, ValueError):
                        continue
                    allowed[key] = value
                yaml.dump(allowed, fp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
