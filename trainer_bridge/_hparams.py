"""The hyperparameters a run reports: the module's and data module's, merged the way Lightning's loggers get them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["collect_hparams", "to_plain"]

log = logging.getLogger("expbus.trainer_bridge")


def _enc_hook(obj: Any) -> Any:
    # Values msgspec cannot turn into builtins by itself. This runs once per run (at setup),
    # never per step, so converting a tensor here costs nothing that matters.
    if isinstance(obj, Mapping):
        container = _omegaconf_container(obj)
        return container if container is not None else dict(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return str(obj)


def _omegaconf_container(obj: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return None
    if isinstance(obj, DictConfig):
        try:
            return OmegaConf.to_container(obj, resolve=True)
        except Exception:
            return OmegaConf.to_container(obj, resolve=False)
    return None


def to_plain(value: Any) -> Any:
    """``value`` as JSON-like builtins (nested dicts, lists, numbers, strings); unknown objects become text."""
    return msgspec.to_builtins(value, enc_hook=_enc_hook, str_keys=True)


def collect_hparams(trainer: Any) -> dict[str, Any] | None:
    """What ``lightning.pytorch.loggers.utilities._log_hyperparams`` hands to loggers, as builtins.

    Follows Lightning: the module's ``hparams_initial`` and the data module's are merged
    when both opted in (``save_hyperparameters(logger=True)``), LightningCLI's
    ``_class_path`` is dropped, and nothing is reported when
    ``Trainer(enable_autolog_hparams=False)``. Where Lightning raises on keys the two define
    differently, this logs a warning and lets the data module's value win (as Lightning's
    merge would): reporting must never stop a run that has no loggers.

    Returns:
        The parameters, or ``None`` when there is nothing to report.
    """
    if not getattr(trainer, "enable_autolog_hparams", True):
        return None
    module = trainer.lightning_module
    datamodule = trainer.datamodule
    module_opted = bool(getattr(module, "_log_hyperparams", False))
    dm_opted = bool(getattr(datamodule, "_log_hyperparams", False)) if datamodule is not None else False
    params: dict[str, Any] | None = None
    if module_opted and dm_opted:
        module_hp = dict(module.hparams_initial)
        dm_hp = dict(datamodule.hparams_initial)
        clashing = [k for k in module_hp.keys() & dm_hp.keys()
                    if k != "_class_path" and not _same(module_hp[k], dm_hp[k])]
        if clashing:
            log.warning("expbus: hyperparameters %s differ between the LightningModule and the "
                        "LightningDataModule; reporting the data module's values", sorted(clashing))
        params = {**module_hp, **dm_hp}
    elif module_opted:
        params = dict(module.hparams_initial)
    elif dm_opted:
        params = dict(datamodule.hparams_initial)
    if params is None:
        return None
    params.pop("_class_path", None)
    plain = to_plain(params)
    return plain if isinstance(plain, dict) else {"hparams": plain}


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if hasattr(a, "tolist") and not isinstance(a, (int, float, bool, str)):
        return a is b  # tensors: Lightning compares identity
    try:
        return bool(a == b)
    except Exception:
        return a is b
