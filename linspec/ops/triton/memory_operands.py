"""The decayed and normalised memory (``linspec.ops.memory``) as the small per-row operands the kernels read.

The kernels carry S per (row, kv head) and fold it once per group; what a ``GlobalMemory`` adds to the paper's
plain sum reaches them as two fp32 tensors computed here with PyTorch ops, so autograd carries their gradients back
to ``log λ`` without a kernel of its own:

* ``row_log_decay``: ``log λ`` per (row, kv head), ``[B·Hkv]`` — the chunked and decode kernels take ``λ = exp``
  of it, verify takes the log and raises λ to each node's number of folds.
* ``group_scales``: ``1 / (n_g + eps)`` per (row, kv head, query group), ``[B·Hkv, N]`` — the "mean" normaliser,
  which depends on the group index and λ only (``linspec.ops.memory.folded_count``), so it is one scalar per group
  that multiplies that group's readout ``q̂ᵀ S_g``.

Memories the kernels do not carry (norm "key") never get here: ``capabilities.missing`` refuses them first.
"""

from __future__ import annotations

import torch

from linspec.ops.memory import GlobalMemory, folded_count


def row_log_decay(memory: GlobalMemory | None, batch: int, kv_heads: int) -> torch.Tensor | None:
    """``log λ`` as fp32 ``[B·Hkv]`` (a ``(Hkv,)`` decay is shared by the rows, a ``(B, Hkv)`` one is per row);
    None without decay. Differentiable: the kernels' gradient for it flows back to ``memory.log_decay``."""
    if memory is None or memory.log_decay is None:
        return None
    log_decay = memory.log_decay.float()
    rows = log_decay.view(-1, kv_heads)
    return rows.expand(batch, kv_heads).reshape(batch * kv_heads)


def group_scales(
    memory: GlobalMemory | None, groups: torch.Tensor, group_size: int, kv_heads: int
) -> torch.Tensor | None:
    """``1 / (n_g + eps)`` as fp32 ``[B·Hkv, N]`` for complete-group counts ``groups [B, N]``; None unless the
    memory is normalised by the folded-token count (norm "mean")."""
    if memory is None or memory.norm != "mean":
        return None
    batch, count = groups.shape
    folded = folded_count(memory, groups.view(batch, 1, count), group_size)  # (B, Hkv or 1, N)
    scales = 1.0 / (folded.float() + memory.eps)
    return scales.expand(batch, kv_heads, count).reshape(batch * kv_heads, count)
