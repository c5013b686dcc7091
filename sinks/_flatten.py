"""Flattening of nested hyperparameters into ``a/b`` keys, rule for rule as Lightning's loggers do."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

__all__ = ["flatten_params"]


def flatten_params(params: Mapping[Any, Any], delimiter: str = "/", parent_key: str = "") -> dict[str, Any]:
    """Lightning's ``_flatten_dict`` (what its TensorBoard, MLflow and NeMo's DLLogger apply).

    Nested mappings, dataclasses and ``Namespace`` objects become ``a/b`` keys; so do lists
    made only of mappings (``a/0/b``), which also means an empty list disappears, exactly as
    in Lightning. Any other value is kept as is.
    """
    result: dict[str, Any] = {}
    for key, value in params.items():
        new_key = f"{parent_key}{delimiter}{key}" if parent_key else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            result.update(flatten_params(value, delimiter, new_key))
        elif isinstance(value, list) and all(isinstance(item, Mapping) for item in value):
            for i, item in enumerate(value):
                result.update(flatten_params(item, delimiter, f"{new_key}/{i}"))
        else:
            result[new_key] = value
    return result
