"""The quadratic, masked form of DESIGN §2, written for clarity: the spec every fast path is tested against."""

from __future__ import annotations

import torch

from linspec.ops.kernel_fn import local_similarity


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, H, T, D]``, head ``h`` taking kv head ``h // (H // Hkv)`` (HF ``repeat_kv``)."""
    repeats = num_heads // x.shape[1]
    return x.repeat_interleave(repeats, dim=1) if repeats > 1 else x


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
) -> torch.Tensor:
    """``o_t = Σ_{same group, s≤t} κ(q̂_t·k̂_s) v_s + γ Σ_{s < grp(t)·G} (q̂_t·k̂_s) v_s + Σ_j w[j] v_{t-j}``."""
    num_heads, length = q.shape[1], q.shape[2]
    k = expand_kv_heads(k, num_heads)
    v = expand_kv_heads(v, num_heads)
    scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
    t = torch.arange(length, device=q.device)
    group = t // group_size
    causal = t[None, :] <= t[:, None]
    same_group = group[None, :] == group[:, None]
    earlier_groups = t[None, :] < (group * group_size)[:, None]
    local = (local_similarity(scores, local_kernel) * (causal & same_group)) @ v
    global_term = (scores * earlier_groups) @ v
    taps = conv_weight.shape[1]
    conv = torch.zeros_like(v)
    for j in range(min(taps, length)):
        conv[:, :, j:] += conv_weight[None, :, j, None, None] * v[:, :, : length - j]
    return local + global_scale * global_term + conv
