"""Masked (causal) depthwise convolution over V with one filter per query head, in PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_depthwise_conv(
    v: torch.Tensor, conv_weight: torch.Tensor, history: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[b, h, t] = Σ_j w[h, j] · v[b, h // R, t - j]`` with ``history`` (the last P−1 values) before ``v``.

    ``v`` is ``[B, Hkv, T, Dv]`` and the output ``[B, H, T, Dv]``. Only causal taps exist, so nothing after ``t``
    can reach ``out[t]``. One grouped ``conv1d`` does all heads: each (kv head, channel) input feeds R outputs,
    one per query head sharing it, so no repeated copy of V is materialised.
    """
    batch, kv_heads, length, head_dim = v.shape
    num_heads, taps = conv_weight.shape
    repeats = num_heads // kv_heads
    if history is None:
        history = v.new_zeros(batch, kv_heads, taps - 1, head_dim)
    padded = torch.cat([history, v], dim=2)  # (B, Hkv, P-1+T, Dv)
    channels = padded.permute(0, 1, 3, 2).reshape(batch, kv_heads * head_dim, taps - 1 + length)
    # Out channel (kvh, d, r) uses filter w[kvh*R + r] reversed: conv1d correlates, tap j must meet t - j.
    filters = conv_weight.flip(-1).view(kv_heads, 1, repeats, taps).expand(kv_heads, head_dim, repeats, taps)
    filters = filters.reshape(kv_heads * head_dim * repeats, 1, taps).to(v.dtype)
    out = F.conv1d(channels, filters, groups=kv_heads * head_dim)  # (B, Hkv*Dv*R, T)
    out = out.view(batch, kv_heads, head_dim, repeats, length).permute(0, 1, 3, 4, 2)
    return out.reshape(batch, num_heads, length, head_dim)
