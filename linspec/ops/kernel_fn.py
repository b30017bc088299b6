"""The in-group similarity kernel κ applied to q̂·k̂ for the local term."""

from __future__ import annotations

import torch

LOCAL_KERNELS = ("relu2", "identity", "none")


def local_similarity(scores: torch.Tensor, local_kernel: str) -> torch.Tensor:
    """κ(q̂·k̂): ``relu(x)²`` for the paper preset, ``x`` for plain linear attention inside the group, zero for
    ``none`` (the ``window`` preset, whose local term is ``linspec.ops.window``)."""
    if local_kernel == "relu2":
        return torch.relu(scores).square()
    if local_kernel == "identity":
        return scores
    if local_kernel == "none":
        return torch.zeros_like(scores)
    raise ValueError(f"local_kernel must be one of {LOCAL_KERNELS}, got {local_kernel!r}")
