"""The weights-only export (NeMo's ``.nemo`` file) of any module, and ``restore_weights`` that loads it back."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from expbus.bus import redact_params

from .._hparams import to_plain

__all__ = ["MODEL_CONFIG_YAML", "MODEL_WEIGHTS_CKPT", "export_weights", "restore_weights"]

log = logging.getLogger("expbus.exp_manager")

MODEL_CONFIG_YAML = "model_config.yaml"
MODEL_WEIGHTS_CKPT = "model_weights.ckpt"


def _config_yaml(module: Any) -> bytes:
    hparams = getattr(module, "hparams", None)
    try:
        plain = to_plain(dict(hparams)) if isinstance(hparams, Mapping) else {}
    except Exception as exc:  # odd hyperparameters must not lose the weights
        log.warning("Weights export: hyperparameters not written (%s: %s)", type(exc).__name__, exc)
        plain = {}
    # A record of the hyperparameters (restore_weights reads only the weights): redacted
    # like every other copy the run keeps (API keys, tokens, URI credentials become ***).
    return yaml.safe_dump(redact_params(plain), sort_keys=False).encode()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_tar(module: torch.nn.Module, path: Path) -> None:
    weights = io.BytesIO()
    torch.save(module.state_dict(), weights)
    # Uncompressed, as current NeMo writes .nemo files: weights barely compress and gzip is slow.
    with tarfile.open(path, "w:") as archive:
        _add(archive, MODEL_CONFIG_YAML, _config_yaml(module))
        _add(archive, MODEL_WEIGHTS_CKPT, weights.getvalue())


def export_weights(module: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the module's weights-only export to ``path``, replacing any file there only once complete.

    The module's own ``save_to(path)`` writes it when the module has one (a NeMo model);
    otherwise it is a tar holding ``model_config.yaml`` (the module's ``hparams``) and
    ``model_weights.ckpt`` (its plain ``state_dict()``, ``torch.save``). The export is
    written into a hidden sibling folder and then renamed over ``path``, so a crash never
    leaves a partial file under the final name, and at most one export exists.

    Args:
        module: the model (its weights as they are now).
        path: the export file, e.g. ``checkpoints/default.nemo``.

    Returns:
        ``path``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        tmp = staging / final.name
        save_to = getattr(module, "save_to", None)
        if callable(save_to):
            save_to(str(tmp))
        else:
            _write_tar(module, tmp)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _state_dict_from_tar(path: Path, map_location: Any) -> Mapping[str, Any]:
    with tarfile.open(path, "r:*") as archive:
        # NeMo archives name members ``./model_weights.ckpt``; ours ``model_weights.ckpt``.
        member = next((m for m in archive.getmembers()
                       if m.isfile() and os.path.basename(m.name) == MODEL_WEIGHTS_CKPT), None)
        if member is None:
            raise ValueError(f"{path}: no {MODEL_WEIGHTS_CKPT} inside this archive")
        handle = archive.extractfile(member)
        assert handle is not None  # a regular file member always has one
        data = handle.read()
    loaded = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: {MODEL_WEIGHTS_CKPT} does not hold a state dict")
    return loaded


def restore_weights(
    path: str | os.PathLike[str],
    module: torch.nn.Module,
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> torch.nn.Module:
    """Load weights into ``module`` from a weights-only export or a Lightning checkpoint.

    Args:
        path: a ``.nemo``-style tar written by :func:`export_weights` (or by NeMo), or a
            ``.ckpt`` file (its ``state_dict`` entry is loaded).
        module: the module to load into (same architecture).
        strict: passed to ``load_state_dict``: every key must match.
        map_location: where tensors are loaded (``"cpu"`` by default).
        weights_only: ``torch.load``'s safety switch for ``.ckpt`` files; set ``False`` only
            for a trusted checkpoint that holds other Python objects.

    Returns:
        ``module``, with the weights loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"restore_weights: {source} does not exist")
    if source.is_dir():
        raise ValueError(f"restore_weights: {source} is a directory checkpoint; load it with its CheckpointIO "
                         "(Trainer(...).strategy.load_checkpoint) instead")
    if tarfile.is_tarfile(source):
        state = _state_dict_from_tar(source, map_location)
    else:
        loaded = torch.load(source, map_location=map_location, weights_only=weights_only)
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            state = loaded["state_dict"]
        elif isinstance(loaded, Mapping):
            state = loaded
        else:
            raise ValueError(f"restore_weights: {source} holds a {type(loaded).__name__}, not a state dict")
    module.load_state_dict(state, strict=strict)
    return module
