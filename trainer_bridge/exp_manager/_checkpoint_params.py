"""``checkpoint_callback_params``: NeMo's ``CallbackParams`` with its field names and defaults."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["CallbackParams"]


class CallbackParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``exp_manager.checkpoint_callback_params`` block (NeMo's ``CallbackParams``).

    Every field of NeMo's dataclass (``nemo/utils/exp_manager.py``) with the same default, so a
    NeMo YAML block works unchanged. The optional types mirror NeMo's (``Optional[...]``
    everywhere) so that an explicit ``null`` in a real config is accepted.

    Attributes:
        filepath: deprecated; its parent becomes ``dirpath`` and its name ``filename`` where
            those are unset (a deprecation warning is logged).
        dirpath: checkpoint folder; ``None`` means ``<log_dir>/checkpoints``.
        filename: ``ModelCheckpoint`` filename template; ``None`` means
            ``<name>--{<monitor>:.4f}-{epoch}`` (``<name>--{epoch}-{step}`` without a monitor).
        monitor: the logged metric ranking checkpoints; ``None`` saves without ranking.
        verbose: log each save.
        save_last: also keep ``<filename>-last.ckpt``, the checkpoint resumes start from.
        save_top_k: checkpoints kept by score (``-1``: all, ``0``: none).
        save_weights_only: checkpoints hold the weights only (no optimizer/loop state).
        mode: ``min`` or ``max``: which scores are best (``None``: ``min``).
        auto_insert_metric_name: ``{epoch}`` becomes ``epoch=3`` in file names.
        every_n_epochs: save every N epochs (``0``/``None``: not by epoch).
        every_n_train_steps: save every N training steps.
        train_time_interval: save every this long (a ``timedelta``, seconds, or ``"HH:MM:SS"``).
        prefix: file name of the weights-only export, without ``postfix``; ``None`` means the
            experiment name.
        postfix: extension of the weights-only export.
        save_best_model: at train end, load the best checkpoint's weights into the module
            before the weights-only export.
        always_save_nemo: write the weights-only export at every checkpoint save.
        save_nemo_on_train_end: write the weights-only export at train end.
        model_parallel_size: NeMo model parallelism (accepted; not used).
        save_on_train_epoch_end: check for saves at the end of the training epoch rather than
            after validation.
        async_save: NeMo's asynchronous saves (accepted; saves are synchronous here).
        save_last_n_optim_states: NeMo distributed checkpoints (accepted; not used).
    """

    filepath: str | None = None
    dirpath: str | None = None
    filename: str | None = None
    monitor: str | None = "val_loss"
    verbose: bool | None = True
    save_last: bool | None = True
    save_top_k: int | None = 3
    save_weights_only: bool | None = False
    mode: Literal["min", "max"] | None = "min"
    auto_insert_metric_name: bool = True
    every_n_epochs: int | None = 1
    every_n_train_steps: int | None = None
    train_time_interval: Any | None = None
    prefix: str | None = None
    postfix: str = ".nemo"
    save_best_model: bool = False
    always_save_nemo: bool = False
    save_nemo_on_train_end: bool | None = True
    model_parallel_size: int | None = None
    save_on_train_epoch_end: bool | None = False
    async_save: bool | None = False
    save_last_n_optim_states: int | None = -1
