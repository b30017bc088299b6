"""Nested training state <-> (safetensors tensors, JSON skeleton): checkpoints that are data, never code.

A training state is dicts, lists and tuples of tensors, numbers, strings and NumPy arrays (optimiser moments,
scheduler counters, RNG states). ``encode`` moves every tensor into a flat ``{key: tensor}`` map for safetensors
and leaves a JSON skeleton in which each tensor is ``{"$tensor": key}``; tuples, NumPy arrays and dicts with
non-string keys get similar ``$`` tags, so ``decode`` rebuilds the state exactly. Nothing in either file can
name a type to construct or a function to call, unlike a pickle: a crafted checkpoint can only be wrong, and
``decode`` says so in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from linspec.errors import LinspecError


def encode(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: a JSON-ready structure and the tensors it refers to (contiguous CPU copies)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
            return {"$tensor": key}
        if isinstance(value, np.ndarray):
            return {"$ndarray": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, tuple):
            return {"$tuple": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: walk(v) for k, v in value.items()}
            return {"$items": [[walk(k), walk(v)] for k, v in value.items()]}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, np.integer | np.floating):
            return value.item()
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")

    return walk(state), tensors


_NDARRAY_DTYPES = {"uint32", "int64", "float64", "float32", "int32", "uint8"}


def decode(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state ``encode`` was given; a skeleton that does not fit its tensors raises ``LinspecError``."""
    used: set[str] = set()

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            if value is None or isinstance(value, bool | int | float | str):
                return value
            raise LinspecError(f"unexpected value {value!r:.40}")
        tags = [k for k in value if k.startswith("$")]
        if not tags:
            return {k: walk(v) for k, v in value.items()}
        tag = tags[0]
        if tag == "$tensor" and set(value) == {"$tensor"}:
            key = value["$tensor"]
            if not isinstance(key, str) or key not in tensors:
                raise LinspecError(f"refers to a tensor {key!r:.40} that the tensor file does not hold")
            used.add(key)
            return tensors[key]
        if tag == "$tuple" and set(value) == {"$tuple"} and isinstance(value["$tuple"], list):
            return tuple(walk(v) for v in value["$tuple"])
        if tag == "$items" and set(value) == {"$items"} and isinstance(value["$items"], list):
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in value["$items"]):
                raise LinspecError("a mapping entry is not a [key, value] pair")
            return {_hashable(walk(k)): walk(v) for k, v in value["$items"]}
        if tag == "$ndarray" and set(value) == {"$ndarray", "dtype"} and value["dtype"] in _NDARRAY_DTYPES:
            try:
                return np.asarray(value["$ndarray"], dtype=value["dtype"])
            except (TypeError, ValueError, OverflowError) as error:
                raise LinspecError(f"an array does not fit its dtype ({error})") from None
        raise LinspecError(f"unknown or malformed entry {sorted(value)!r:.60}")

    try:
        state = walk(skeleton)
    except RecursionError:
        raise LinspecError("the state is nested too deeply") from None
    if used != set(tensors):
        raise LinspecError(f"the tensor file holds {len(set(tensors) - used)} tensor(s) the state does not use")
    return state


def _hashable(key: Any) -> Any:
    if isinstance(key, list | dict):
        raise LinspecError(f"a mapping key is a {type(key).__name__}")
    return key
