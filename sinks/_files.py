"""File errors that name the file: what a file sink raises when its disk is full or read-only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["naming_path"]


@contextmanager
def naming_path(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Re-raise an ``OSError`` that does not name its file as one that names ``path``.

    A buffered write or flush that fails (``ENOSPC``, ``EIO``, ``EDQUOT``) raises an
    ``OSError`` without a file name: ``[Errno 28] No space left on device``. The bus logs a
    sink's failure with the sink's id; with this, the error also says which file:
    ``[Errno 28] No space left on device: '/runs/a/events.jsonl'``. The errno (and so the
    class: ``PermissionError``, ...) is kept, and the original error is chained.
    """
    try:
        yield
    except OSError as exc:
        if path is None or exc.filename is not None:
            raise
        if exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc
        raise OSError(f"{exc}: {os.fspath(path)!r}") from exc
