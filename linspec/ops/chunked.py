"""Chunked form (training, prefill): quadratic inside each group, an exclusive KV cumsum across groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.ops.backend import use_triton
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
    if use_triton(q):
        from linspec.kernels import grouped_terms as triton_grouped_terms

        return triton_grouped_terms(q, k, v, group_size, local_kernel, initial_kv)
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
    """Full-sequence output from position 0, no state: the training path. Same result as ``reference_attention``.

    The terms of ``grouped_terms`` and the conv, regrouped so that most work is one batched matmul per group:
    conv taps that stay inside a group join the G×G local weights (both multiply the group's values), γ scales
    the small per-group S instead of the output, and taps reaching into earlier groups are one small matmul per
    group offset. About twice as fast on CPU as summing the three terms, and fewer ops for threads to sync on.
    """
    if use_triton(q):
        from linspec.kernels import chunked_attention as triton_chunked_attention

        return triton_chunked_attention(q, k, v, conv_weight, global_scale, group_size, local_kernel)
    batch, num_heads, length, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    repeats = num_heads // kv_heads
    taps = conv_weight.shape[1]
    num_groups = -(-length // group_size)
    pad = num_groups * group_size - length
    if pad:  # zero keys and values add nothing to any sum; the padded rows are cut off below
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qg = q.view(batch, kv_heads, repeats, num_groups, group_size, key_dim)  # (B, Hkv, R, NG, G, Dk)
    kg = k.view(batch, kv_heads, 1, num_groups, group_size, key_dim)  # (B, Hkv, 1, NG, G, Dk)
    vg = v.view(batch, kv_heads, 1, num_groups, group_size, value_dim)  # (B, Hkv, 1, NG, G, Dv)
    weight = conv_weight.to(v.dtype)

    def taps_matrix(offset: int, first_source: int = 0) -> torch.Tensor:
        """``(Hkv, R, 1, G, G - first_source)``: ``w[h, offset + i - s]`` where that tap exists, else 0."""
        rows = torch.arange(group_size, device=q.device)
        lag = offset + rows[:, None] - rows[None, first_source:]
        matrix = torch.where((lag >= 0) & (lag < taps), weight[:, lag.clamp(0, taps - 1)], 0.0)
        return matrix.view(kv_heads, repeats, 1, group_size, group_size - first_source)

    causal = torch.ones(group_size, group_size, dtype=torch.bool, device=q.device).tril()
    weights = local_similarity(qg @ kg.transpose(-1, -2), local_kernel).masked_fill(~causal, 0.0)
    out = (weights + taps_matrix(0)) @ vg  # (B, Hkv, R, NG, G, Dv): local + in-group conv
    kv_per_group = kg.transpose(-1, -2) @ vg  # (B, Hkv, 1, NG, Dk, Dv)
    kv_before = kv_per_group.cumsum(dim=3) - kv_per_group  # exclusive: groups strictly before g
    out = out + qg @ (global_scale * kv_before)
    for back in range(1, min(-(-(taps - 1) // group_size), num_groups - 1) + 1):
        first = max(0, back * group_size - (taps - 1))  # earlier rows of that group are out of the taps' reach
        reach = taps_matrix(back * group_size, first) @ vg[:, :, :, : num_groups - back, first:]
        out = out + F.pad(reach, (0, 0, 0, 0, back, 0))  # group g receives from group g - back
    return out.reshape(batch, num_heads, num_groups * group_size, value_dim)[:, :, :length]
