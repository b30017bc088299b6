"""The far memory's attention-transfer loss: how far a layer's softmax row, with its far memory, is from its
parent's over the tokens that have left the window.

The parent gives token ``j`` of row ``t`` the logit ``s_j = q_t·k_j/√d``. The converted layer keeps the same
logits inside the window (and for the sinks, scored from ``sink_q`` past ``P`` when they are adjacent) and gives
an evicted token ``log w_j`` with ``w = memory_weights(q, k, memory)``: its memory column is exactly the sum of
those weights. So the KL divergence from the parent's row ``p`` to the layer's row,

    KL(t) = log Z_layer − log Z_parent + Σ_{j not in the window} p_j (s_j − l_j),

measures only what the memory (and the sinks' moved positions) lose, and its gradient reaches the feature maps
and ``b_h`` through every evicted token the parent attends to, whether or not the text needed that token to
predict the next one. An output MSE, by contrast, sees the memory only through the value it reads, averaged
over every position including those where the window alone already matches the parent.

Rows are processed in blocks of queries under activation checkpointing: a block's ``[B, H, block, T]`` scores
exist once in the forward and once again in the backward, never for every block and layer at the same time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from linspec.ops.far_memory import FarMemory, memory_weights
from linspec.ops.window import SoftmaxWindow

# Queries per block: the block's scores are B·H·BLOCK·T floats (9 heads × 256 × 1536: 14 MB).
BLOCK = 256


def far_rows(length: int, window: SoftmaxWindow) -> int:
    """Rows of a ``length``-token sequence that have evicted tokens (``t ≥ W + n``)."""
    return max(0, length - window.size - window.sinks)


def far_attention_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    window: SoftmaxWindow,
    memory: FarMemory,
    sink_q: torch.Tensor | None = None,
    block: int = BLOCK,
) -> torch.Tensor | None:
    """Mean over batch, heads and the rows with evicted tokens of ``KL(parent row ‖ layer row)``, for RoPE'd
    ``q [B, H, T, D]`` and ``k [B, Hkv, T, D]`` of a sequence from position 0 (``sink_q``: the queries rotated at
    ``P`` for adjacent sinks, else None). None when no row has an evicted token."""
    batch, heads, length, _ = q.shape
    first = window.size + window.sinks
    rows = far_rows(length, window)
    if rows == 0:
        return None
    total = q.new_zeros(())
    for start in range(first, length, block):
        end = min(start + block, length)
        block_sink_q = None if sink_q is None else sink_q[:, :, start:end]
        total = total + checkpoint(
            _block_kl, q[:, :, start:end], k[:, :, :end], start, window, memory, block_sink_q, use_reentrant=False
        )
    return total / (batch * heads * rows)


def _block_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    start: int,
    window: SoftmaxWindow,
    memory: FarMemory,
    sink_q: torch.Tensor | None,
) -> torch.Tensor:
    """Sum of the KL of queries ``start … start + Tq − 1`` (``q [B, H, Tq, D]``) over their keys ``k [B, Hkv,
    start + Tq, D]``."""
    heads, kv_heads, count, keys = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    t = start + torch.arange(count, device=q.device)[:, None]
    j = torch.arange(keys, device=q.device)[None, :]
    causal = j <= t
    outside = t - j >= window.size
    sink = j < window.sinks
    evicted = causal & outside & ~sink
    expanded = k.repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ expanded.transpose(-1, -2)) * window.scale
    parent = torch.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    logits = scores
    if sink_q is not None:
        moved = causal & outside & sink & (t > window.last_true_position)
        logits = torch.where(moved, (sink_q @ expanded.transpose(-1, -2)) * window.scale, logits)
    far = max(0, start + count - window.size)  # keys any of these queries has evicted: j < far
    weights = memory_weights(q, k[:, :, :far], memory).clamp_min(torch.finfo(q.dtype).tiny)
    far_logits = torch.nn.functional.pad(torch.log(weights), (0, keys - far))
    logits = torch.where(evicted, far_logits, logits)
    layer = torch.log_softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return (parent.exp() * torch.where(causal, parent - layer, 0.0)).sum()
