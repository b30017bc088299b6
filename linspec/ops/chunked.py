"""Chunked form (training, prefill): quadratic inside each group, an exclusive KV cumsum across groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.ops.conv import causal_depthwise_conv
from linspec.ops.kernel_fn import local_similarity


def grouped_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    initial_kv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The local and global terms for a sequence that starts at a group boundary.

    Returns ``(local, global, kv_through)``: ``local``/``global`` are ``[B, H, T, Dv]``; ``kv_through[:, :, g]``
    is ``S`` after groups ``0..g`` (inclusive, ``initial_kv`` included), ``[B, Hkv, NG, Dk, Dv]``, which is
    what a caller needs to pick the state after any number of complete groups.
    """
    batch, num_heads, length, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    repeats = num_heads // kv_heads
    num_groups = -(-length // group_size)
    pad = num_groups * group_size - length
    if pad:  # zero keys and values add nothing to any sum; the padded rows are cut off below
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qg = q.view(batch, kv_heads, repeats, num_groups, group_size, key_dim)  # (B, Hkv, R, NG, G, Dk)
    kg = k.view(batch, kv_heads, num_groups, group_size, key_dim)  # (B, Hkv, NG, G, Dk)
    vg = v.view(batch, kv_heads, num_groups, group_size, value_dim)  # (B, Hkv, NG, G, Dv)

    scores = torch.einsum("bkrngd,bknsd->bkrngs", qg, kg)  # (B, Hkv, R, NG, G, G)
    causal = torch.ones(group_size, group_size, dtype=torch.bool, device=q.device).tril()
    weights = local_similarity(scores, local_kernel).masked_fill(~causal, 0.0)
    local = torch.einsum("bkrngs,bknse->bkrnge", weights, vg)

    kv_per_group = torch.einsum("bknsd,bknse->bknde", kg, vg)  # (B, Hkv, NG, Dk, Dv)
    kv_through = kv_per_group.cumsum(dim=2)
    if initial_kv is not None:
        kv_through = kv_through + initial_kv.unsqueeze(2)
    kv_before = kv_through - kv_per_group  # exclusive: groups strictly before g
    global_term = torch.einsum("bkrngd,bknde->bkrnge", qg, kv_before)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, num_heads, num_groups * group_size, value_dim)[:, :, :length]

    return heads_first(local), heads_first(global_term), kv_through


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
) -> torch.Tensor:
    """Full-sequence output from position 0, no state: the training path. Same result as ``reference_attention``."""
    local, global_term, _ = grouped_terms(q, k, v, group_size, local_kernel)
    return local + global_scale * global_term + causal_depthwise_conv(v, conv_weight)
