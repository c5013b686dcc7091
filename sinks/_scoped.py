"""Helpers for clients that read process-wide settings or may hang: scoped env vars, bounded calls."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

__all__ = ["scoped_environ", "run_bounded"]

# The environment is process-wide: one lock for every sink that sets variables around a
# client call, so two sinks opening at once never see each other's values.
_ENV_LOCK = threading.Lock()


@contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


def run_bounded(fn: Callable[[], None], timeout: float, name: str) -> bool:
    """Run ``fn`` in a daemon thread; True when it finished within ``timeout`` (its exception re-raised).

    A client call that hangs (ClearML's offline ``Task.close``, Neptune's ``stop``) is then
    abandoned at the deadline; the daemon thread never keeps the process alive.
    """
    done = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    finished = done.wait(timeout)
    if errors:
        raise errors[0]
    return finished
