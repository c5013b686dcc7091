"""The exceptions exp_manager raises, with NeMo's names so existing ``except`` clauses still match."""

from __future__ import annotations

__all__ = ["CheckpointMisconfigurationError", "LoggerMisconfigurationError", "NotFoundError"]


class NotFoundError(FileNotFoundError):
    """A resume was requested but there is no checkpoint (or log dir) to resume from.

    A subclass of ``FileNotFoundError`` so callers that catch the built-in also catch this.
    """


class LoggerMisconfigurationError(ValueError):
    """The Trainer already has a logger while exp_manager was asked to manage logging.

    The message says how to fix it: create the Trainer with ``logger=False``.
    """


class CheckpointMisconfigurationError(ValueError):
    """The Trainer already has a ``ModelCheckpoint`` while exp_manager was asked to create one.

    The message says how to fix it: ``enable_checkpointing=False`` on the Trainer, or
    ``create_checkpoint_callback: false`` in the exp_manager config.
    """
