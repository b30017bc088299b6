"""Chunked form in PyTorch (training, prefill): quadratic inside each group, an exclusive KV cumsum across groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.ops.kernel_fn import local_similarity
from linspec.ops.memory import GlobalMemory, augmented, is_plain, normalise, scan_groups


def grouped_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    initial_kv: torch.Tensor | None = None,
    memory: GlobalMemory | None = None,
    initial_key_sum: torch.Tensor | None = None,
    first_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The local and global terms for a sequence that starts at a group boundary.

    Returns ``(local, global, kv_through, key_sum_through)``: ``local``/``global`` are ``[B, H, T, Dv]``;
    ``kv_through[:, :, g]`` is ``S`` after groups ``0..g`` (inclusive, ``initial_kv`` included),
    ``[B, Hkv, NG, Dk, Dv]``, which is what a caller needs to pick the state after any number of complete
    groups; ``key_sum_through`` (``[B, Hkv, NG, Dk]``) is the same for z when ``memory`` keeps it, else None.
    ``first_group`` (``[B]``, default 0): complete groups before the sequence, which a "mean" memory counts.
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

    global_term, kv_through, key_sum_through = global_memory_terms(
        qg, kg, vg, group_size, memory, initial_kv, initial_key_sum, first_group
    )

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, num_heads, num_groups * group_size, value_dim)[:, :, :length]

    return heads_first(local), heads_first(global_term), kv_through, key_sum_through


def global_memory_terms(
    qg: torch.Tensor,
    kg: torch.Tensor,
    vg: torch.Tensor,
    group_size: int,
    memory: GlobalMemory | None = None,
    initial_kv: torch.Tensor | None = None,
    initial_key_sum: torch.Tensor | None = None,
    first_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(global, kv_through, key_sum_through)`` for grouped ``qg (B, Hkv, R, NG, G, Dk)``, ``kg``/``vg``
    ``(B, Hkv, NG, G, ·)``: the global term ``(B, Hkv, R, NG, G, Dv)`` read from the memory before each group
    (decayed and normalised as ``memory`` says) and the memory after each group (see ``grouped_terms``)."""
    batch, _, _, num_groups, _, _ = qg.shape
    kv_per_group = torch.einsum("bknsd,bknse->bknde", kg, augmented(memory, vg))  # (B, Hkv, NG, Dk, Dv (+1))
    initial = None if initial_kv is None else augmented(memory, initial_kv, _key_sum(memory, initial_key_sum, kg))
    kv_before, kv_through = scan_groups(memory, kv_per_group, initial)  # before: groups strictly before g
    global_term = torch.einsum("bkrngd,bknde->bkrnge", qg, kv_before)
    key_sum_through = None
    if not is_plain(memory):
        groups = torch.arange(num_groups, device=qg.device) + (0 if first_group is None else first_group[:, None])
        groups = groups.view(-1, 1, 1, num_groups, 1).expand(batch, 1, 1, num_groups, group_size)  # (B, 1, 1, NG, G)
        global_term = normalise(memory, global_term, groups, group_size)
        if memory.keeps_key_sum:
            kv_through, key_sum_through = kv_through[..., :-1], kv_through[..., -1]
    return global_term, kv_through, key_sum_through


def _key_sum(memory: GlobalMemory | None, key_sum: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """z of the initial memory when ``memory`` keeps one (zeros if the caller has none yet)."""
    if memory is None or not memory.keeps_key_sum or key_sum is not None:
        return key_sum
    return like.new_zeros(like.shape[0], like.shape[1], like.shape[-1])


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """Full-sequence output from position 0, no state: the training path. Same result as ``reference_attention``.

    The terms of ``grouped_terms`` and the conv, regrouped so that most work is one batched matmul per group:
    conv taps that stay inside a group join the G×G local weights (both multiply the group's values), γ scales
    the small per-group S instead of the output, and taps reaching into earlier groups are one small matmul per
    group offset. About twice as fast on CPU as summing the three terms, and fewer ops for threads to sync on.
    """
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
    if is_plain(memory):
        kv_per_group = kg.transpose(-1, -2) @ vg  # (B, Hkv, 1, NG, Dk, Dv)
        kv_before = kv_per_group.cumsum(dim=3) - kv_per_group  # exclusive: groups strictly before g
        out = out + qg @ (global_scale * kv_before)
    else:  # a normalised term cannot fold γ into S: den depends on the query
        out = out + global_scale * global_memory_terms(qg, kg.squeeze(2), vg.squeeze(2), group_size, memory)[0]
    for back in range(1, min(-(-(taps - 1) // group_size), num_groups - 1) + 1):
        first = max(0, back * group_size - (taps - 1))  # earlier rows of that group are out of the taps' reach
        reach = taps_matrix(back * group_size, first) @ vg[:, :, :, : num_groups - back, first:]
        out = out + F.pad(reach, (0, 0, 0, 0, back, 0))  # group g receives from group g - back
    return out.reshape(batch, num_heads, num_groups * group_size, value_dim)[:, :, :length]
