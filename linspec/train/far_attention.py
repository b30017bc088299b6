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
    ``P`` for adjacent sinks, else None). None when no row has an evicted token.

    Split by what depends on the memory: per row, ``log Z_parent``, the window's and sinks' share of the layer's
    normaliser and ``Σ_far p_j s_j`` are constants; the memory enters through its column's logit (``b_h +
    log φ_q(q)ᵀz``, a cumulative sum of key features) and the cross term ``Σ_far p_j log w_j``, the one pairwise
    term, recomputed in the backward instead of kept."""
    batch, heads, length, _ = q.shape
    first = window.size + window.sinks
    rows = far_rows(length, window)
    if rows == 0:
        return None
    expanded = k.repeat_interleave(heads // k.shape[1], dim=1)
    constants, parent_logz = _row_constants(q[:, :, first:], expanded, first, window, sink_q, block)
    column = _column_logits(q[:, :, first:], k, first, window, memory)
    cross = q.new_zeros(())
    for start in range(first, length, block):
        end = min(start + block, length)
        rows_at = slice(start - first, end - first)
        cross = cross + checkpoint(
            _cross_term, q[:, :, start:end], k[:, :, :end], parent_logz[:, :, rows_at], start, window, memory,
            use_reentrant=False,
        )  # fmt: skip
    layer_logz = torch.logaddexp(constants["visible_logz"], column)
    total = (layer_logz + constants["rest"]).sum() - cross
    return total / (batch * heads * rows)


@torch.no_grad()
def _row_constants(
    q: torch.Tensor,
    keys: torch.Tensor,
    first: int,
    window: SoftmaxWindow,
    sink_q: torch.Tensor | None,
    block: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per row ``t ≥ first`` (``q [B, H, R, D]``, ``keys [B, H, T, D]`` expanded to the query heads):
    ``visible_logz`` (the log-sum-exp of the layer's window and sink logits), ``rest`` (``− log Z_parent +
    Σ_far p_j s_j + Σ_sinks p_j (s_j − l_j)``: everything of the KL the memory does not change) and
    ``log Z_parent``, each ``[B, H, R]``. Every sink is out of the window here, so adjacent sinks are scored
    from ``sink_q`` for every row."""
    count = q.shape[2]
    sinks = window.sinks
    visible, rest, parent = [], [], []
    for start in range(0, count, block):
        end = min(start + block, count)
        t = first + start + torch.arange(end - start, device=q.device)[:, None]
        j = torch.arange(first + end, device=q.device)[None, :]
        scores = (q[:, :, start:end] @ keys[:, :, : first + end].transpose(-1, -2)) * window.scale
        logz = torch.logsumexp(scores.masked_fill(j > t, float("-inf")), dim=-1)
        p = torch.exp(scores - logz[..., None]).masked_fill(j > t, 0.0)
        inside = (t - j < window.size) & (j <= t)
        evicted = (t - j >= window.size) & (j >= sinks)
        sink_logits = scores[..., :sinks]
        if sink_q is not None:
            sink_logits = (sink_q[:, :, first + start : first + end] @ keys[:, :, :sinks].transpose(-1, -2)) * (
                window.scale
            )
        window_logz = torch.logsumexp(scores.masked_fill(~inside, float("-inf")), dim=-1)
        visible.append(torch.logaddexp(window_logz, torch.logsumexp(sink_logits, dim=-1)))
        far = (p * scores).masked_fill(~evicted, 0.0).sum(dim=-1)
        moved = (p[..., :sinks] * (scores[..., :sinks] - sink_logits)).sum(dim=-1)
        rest.append(far + moved - logz)
        parent.append(logz)
    return {"visible_logz": torch.cat(visible, dim=-1), "rest": torch.cat(rest, dim=-1)}, torch.cat(parent, dim=-1)


def _column_logits(q: torch.Tensor, k: torch.Tensor, first: int, window: SoftmaxWindow, memory: FarMemory):
    """``b_h + log f_h(N_t) + log φ_q(q_t)ᵀz_t`` (``FarMemory.log_bias``) for rows ``t ≥ first`` (``q [B, H, R,
    D]``): ``z_t`` sums ``φ_k`` over the ``N_t`` tokens ``n ≤ j ≤ t − W``, a cumulative sum over the keys."""
    heads, kv_heads, length = q.shape[1], k.shape[1], k.shape[2]
    features = memory.key_features(k)
    folded = (torch.arange(length, device=k.device) >= window.sinks)[:, None]
    sums = (features * folded).cumsum(dim=2)[:, :, window.sinks : length - window.size]  # z for t = first …
    sums = sums.repeat_interleave(heads // kv_heads, dim=1)
    reads = (memory.query_features(q) * sums).sum(dim=-1)
    log_bias = memory.log_bias(first + torch.arange(q.shape[2], device=q.device)[None], window)[..., 0]
    return log_bias + torch.log(reads.clamp_min(torch.finfo(reads.dtype).tiny))


def _cross_term(
    q: torch.Tensor,
    k: torch.Tensor,
    parent_logz: torch.Tensor,
    start: int,
    window: SoftmaxWindow,
    memory: FarMemory,
) -> torch.Tensor:
    """``Σ_t Σ_far p_j log w_j`` of queries ``start …`` (``q [B, H, Tq, D]``, keys ``k [B, Hkv, start + Tq, D]``,
    ``parent_logz [B, H, Tq]``): the parent's far probabilities (constants) against the memory's log weights."""
    heads, kv_heads, count = q.shape[1], k.shape[1], q.shape[2]
    far = start + count - window.size  # keys any of these queries has evicted: sinks ≤ j < far
    far_keys = k[:, :, window.sinks : far]
    t = start + torch.arange(count, device=q.device)[:, None]
    j = window.sinks + torch.arange(far - window.sinks, device=q.device)[None, :]
    evicted = t - j >= window.size
    with torch.no_grad():
        scores = q @ far_keys.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) * window.scale
        p = torch.exp(scores - parent_logz[..., None]).masked_fill(~evicted, 0.0)
    weights = memory_weights(q, far_keys, memory, t.view(1, -1), window).clamp_min(torch.finfo(q.dtype).tiny)
    return (p * torch.log(weights)).sum()
