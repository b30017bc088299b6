"""The quadratic, masked form of docs/design.md §2, written for clarity: the spec every fast path is tested against."""

from __future__ import annotations

import torch

from linspec.ops.kernel_fn import local_similarity
from linspec.ops.memory import GlobalMemory, is_plain


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, H, T, D]``, head ``h`` taking kv head ``h // (H // Hkv)`` (HF ``repeat_kv``)."""
    repeats = num_heads // x.shape[1]
    return x.repeat_interleave(repeats, dim=1) if repeats > 1 else x


def reference_global(
    scores: torch.Tensor,
    v: torch.Tensor,
    group: torch.Tensor,
    earlier_groups: torch.Tensor,
    memory: GlobalMemory,
    repeats: int,
) -> torch.Tensor:
    """The decayed/normalised global term from all scores ``[B, H, T, T]`` and values ``[B, H, T, Dv]``."""
    weights = earlier_groups.to(scores.dtype)  # (T, T): 1 where s is in a group before t's
    if memory.log_decay is not None:
        log_decay = memory.log_decay.repeat_interleave(repeats).view(-1, 1, 1)  # (H, 1, 1), per query head
        age = (group[:, None] - 1 - group[None, :]).clamp(min=0)  # (T, T): folds since s's group
        weights = weights * torch.exp(log_decay * age)  # (H, T, T)
    numerator = (weights * scores) @ v
    if memory.norm == "none":
        return numerator
    denominator = (weights * scores).sum(-1) if memory.norm == "key" else weights.sum(-1).expand(scores.shape[:-1])
    return numerator / (denominator.unsqueeze(-1) + memory.eps)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """``o_t = Σ_{same group, s≤t} κ(q̂_t·k̂_s) v_s + γ Σ_{s < grp(t)·G} (q̂_t·k̂_s) v_s + Σ_j w[j] v_{t-j}``.

    With a decayed/normalised ``memory`` source ``s`` of the global sum is weighted ``λ^(grp(t) − 1 − grp(s))``
    and the sum divided by the same weights summed (``mean``) or by ``Σ weights · q̂_t·k̂_s`` (``key``), + eps.
    """
    num_heads, length, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    k = expand_kv_heads(k, num_heads)
    v = expand_kv_heads(v, num_heads)
    scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
    t = torch.arange(length, device=q.device)
    group = t // group_size
    causal = t[None, :] <= t[:, None]
    same_group = group[None, :] == group[:, None]
    earlier_groups = t[None, :] < (group * group_size)[:, None]
    local = (local_similarity(scores, local_kernel) * (causal & same_group)) @ v
    if is_plain(memory):
        global_term = (scores * earlier_groups) @ v
    else:
        global_term = reference_global(scores, v, group, earlier_groups, memory, num_heads // kv_heads)
    taps = conv_weight.shape[1]
    conv = torch.zeros_like(v)
    for j in range(min(taps, length)):
        conv[:, :, j:] += conv_weight[None, :, j, None, None] * v[:, :, : length - j]
    return local + global_scale * global_term + conv
