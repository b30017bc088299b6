"""Triton kernels for the chunked, recurrent and verify modes.

Each entry point has the signature and return of its PyTorch twin in ``linspec.ops``; ``linspec.ops.backend``
routes CUDA tensors here. Entry points load on first use (PEP 562), so importing the package costs nothing on a
machine without Triton.
"""

from __future__ import annotations

import importlib

_ENTRY_POINTS = {
    "causal_depthwise_conv": "conv",
    "chunked_attention": "chunked",
    "grouped_terms": "chunked",
    "interpreting": "utils",
    "recurrent_step": "recurrent",
    "tree_ancestors": "verify",
    "verify_attention": "verify",
}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_ENTRY_POINTS[name]}"), name)
