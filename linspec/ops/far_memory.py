"""The far memory: what a softmax window keeps of the tokens that have left it, read under the window's own
softmax normaliser (LoLCATs, Zhang et al. 2024; Hedgehog, Zhang et al. 2024; Liger, Lan et al. 2025).

Token ``j`` has left the window of token ``t`` when ``t − j ≥ W`` and it is no sink (``j ≥ n``). Per kv head ``g``
the memory holds ``S_g = Σ φ_k(k_j) v_jᵀ`` and ``z_g = Σ φ_k(k_j)`` over those tokens (``k`` RoPE'd and raw, as the
window stores it), and joins the window's softmax as one extra column for query head ``h``::

    logit  b_h + log φ_q(q)ᵀz_g        value  φ_q(q)ᵀS_g / φ_q(q)ᵀz_g

so the layer's output is ``(Σ_window e^{s_i} v_i + e^{b_h} φ_q(q)ᵀS_g) / (Σ_window e^{s_i} + e^{b_h} φ_q(q)ᵀz_g)``:
an evicted token weighs ``e^{b_h} φ_q(q)ᵀφ_k(k_j)`` (``memory_weights``) where the parent gave it ``exp(q·k_j/√d)``,
the mass a plain window drops. Unlike a separately averaged memory added on top, its share competes with the
window's tokens for the same probability mass, so a query that matches a far token strongly can single it out.
A query with nothing evicted (``t < W + n``) has no column: there the layer is the window alone, exactly.
With distance decay (``LinspecConfig.memory_distance_decay``) the column also weighs its ``N_t`` tokens, which sit
at distances ``W … W + N_t − 1`` from the query, as if each weighed ``(d / W₀)^(−α_h)`` (``α_h`` learnt per head, 0
at conversion; ``W₀`` the configured window): the logit gains ``log f``, the mean of that weight over the folded
distances (``FarMemory.log_bias``). The parent's attention to a far token changes with its distance, so its far
mass grows with the context otherwise than the count of folded tokens; ``f`` follows it for any window and
length (a window override in training moves the near end, the context the far end). Relative to ``W₀``, ``α``
changes nothing for the first tokens past the configured window (``b_h`` sets their weight) and only shapes the
growth: measured from distance 1, ``α`` would also shift every weight by ``α log W`` and train as a second, far
steeper bias. ``f`` is a function of the query's position alone, so every mode computes it the same way and the
state does not change.

Feature maps (``LinspecConfig.memory_feature_map``): ``φ(x) = [softmax(xA), softmax(−xA)]`` over the head
dimension — positive, and as spiky as the exp they stand in for — with ``A`` learnable per head, separately for
queries (per query head) and keys (per kv head), initialised to the identity (``hedgehog``), or ``A = I``
(``softmax``, parameter-free). Being positive, ``φ_q(q)ᵀz`` is positive once a token is folded.

Every mode reads one structure. At state position ``p`` the memory holds every token ``j ≤ p − W`` (all that
have left the window's ring); the tokens a query reads beyond it form a contiguous *run*: the ring's entries
(positions ``p − W + 1 … p − 1``, oldest first) followed by the new tokens. Query ``r`` of an extend (position
``p + r``) reads the run's first ``r`` entries, so extend, decode and the whole-sequence form (the same from an
empty state, where the run is the keys shifted by ``W − 1``) are one strictly causal linear attention over the
run with the state's memory as its initial state (``run_readout``, chunked: ``O(T)``), and the state after ``c``
tokens folds the run's first ``c`` entries. A tree node at depth ``d`` reads the first ``min(d, W − 1)`` ring
entries — the same for every node at that depth — and, once ``d ≥ W``, its own ancestors at depth ``≤ d − W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linspec.ops import backend
from linspec.ops.extend import gather_tokens, input_columns, real_first, real_tokens_first
from linspec.ops.memory import with_ones
from linspec.ops.verify import TreeLayout
from linspec.ops.window import MemoryColumn, SoftmaxWindow, WindowState

# Queries per block of the whole-sequence and extend forms: the in-block scores are B·H·T·CHUNK, the block
# states B·Hkv·(T/CHUNK)·2D·(Dv+1).
CHUNK = 64


def initial_memory_bias(head_dim: int, window_size: int) -> float:
    """``b_h`` at conversion: ``log(D / 2) − log(W)``. A flat feature map (``φ = 1/D`` in each half) gives
    ``φ_qᵀφ_k = 2/D``, so each evicted token starts out weighing ``1/W`` of what a logit of zero weighs in the
    window: the whole memory of ``N`` evicted tokens counts like ``N/W`` average tokens, a small share of the
    softmax at any length (untrained maps cannot yet single a token out, and an average over the far past
    weighed like ``N`` window tokens would drown the window's exact scores), yet a share, so b and the maps
    receive gradient from the first step. Per head, the bias that would match the parent's far softmax mass
    spreads over several nats either side of this (heads that attend broadly want more, sharp late heads less):
    attention transfer fits it."""
    return math.log(head_dim / 2) - math.log(window_size)


def spiky_features(x: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """``φ(x) = [softmax(xA), softmax(−xA)]`` over the last dimension of ``x [B, heads, T, D]`` (``[…, 2D]``); ``A``
    is ``projection [heads, D, D]`` or, for None, the identity."""
    if projection is not None:
        x = x @ projection
    return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)


@dataclass(frozen=True)
class FarMemory:
    """The memory's parameters in the compute dtype: ``bias [H]`` (``b_h``), for learnable maps the projections
    ``query_map [H, D, D]`` and ``key_map [Hkv, D, D]`` (None: the parameter-free map), and with distance decay
    ``distance_exponent [H]`` (``α_h``; None: without) and ``reference_window`` (``W₀``, the configured window;
    None: the window of the call)."""

    bias: torch.Tensor
    query_map: torch.Tensor | None = None
    key_map: torch.Tensor | None = None
    distance_exponent: torch.Tensor | None = None
    reference_window: int | None = None

    def log_bias(self, positions: torch.Tensor, window: SoftmaxWindow) -> torch.Tensor:
        """The column's bias for queries at ``positions [B or 1, T]``, ``[B or 1, H, T, 1]``: ``b_h``, plus with
        distance decay ``log f_h(N_t)``, where ``N_t = t − W − n + 1`` tokens (at least 1: a query with none reads
        no column) have left query ``t``'s window. With ``L = log(1 + N/W)`` and ``x = (1 − α) L``,
        ``∫_W^{W+N} (d/W₀)^(−α) dd = W₀^α W^(1−α) · L · expm1(x)/x``, so ``log f = log W + α log(W₀/W) + log L +
        log(expm1(x)/x) − log N``: 0 at ``α = 0`` (the plain count) and, at ``W = W₀``, near 0 while ``N ≪ W``.
        Without it ``[1, H, 1, 1]``."""
        bias = self.bias.view(1, -1, 1, 1)
        if self.distance_exponent is None:
            return bias
        dtype = self.bias.dtype
        count = (positions - (window.size + window.sinks - 1)).clamp_min(1).to(dtype)[:, None, :, None]
        span = torch.log1p(count / window.size)  # L
        alpha = self.distance_exponent.view(1, -1, 1, 1)
        x = (1.0 - alpha) * span
        small = x.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(x), x)
        log_ratio = torch.where(small, x / 2, torch.log(torch.expm1(safe) / safe))  # log(expm1(x)/x)
        reference = self.reference_window or window.size
        shift = alpha * math.log(reference / window.size)
        return bias + math.log(window.size) + shift + torch.log(span) + log_ratio - torch.log(count)

    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        return spiky_features(q, self.query_map)

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        return spiky_features(k, self.key_map)


@dataclass
class WindowWithMemory(WindowState):
    """A window's decode state with its far memory: ``far_memory [B, Hkv, 2D, Dv + 1]`` holds ``S`` with ``z`` as
    its last column, over every token that has left the ring (constant in context length). The window's own
    functions carry it unchanged; the functions here fold into it."""

    far_memory: torch.Tensor


def empty_memory(window: WindowState, value_dim: int) -> WindowWithMemory:
    """``window`` (a window's state before any token) with an empty far memory."""
    batch, kv_heads, _, key_dim = window.sink_keys.shape
    memory = window.keys.new_zeros(batch, kv_heads, 2 * key_dim, value_dim + 1)
    return WindowWithMemory(window.keys, window.values, window.sink_keys, window.sink_values, memory)


def memory_weights(
    q: torch.Tensor, k: torch.Tensor, memory: FarMemory, positions: torch.Tensor, window: SoftmaxWindow
) -> torch.Tensor:
    """``e^{b_h} f_h(N_t) φ_q(q_t)ᵀφ_k(k_j)`` (``FarMemory.log_bias``) for every query ``t`` of ``q [B, H, Tq, D]``
    (at ``positions [B or 1, Tq]``) and key ``j`` of ``k [B, Hkv, Tk, D]``: ``[B, H, Tq, Tk]``, the unnormalised
    weight the memory gives an evicted key where the parent's softmax gave ``exp(q·k/√d)`` (what attention
    transfer fits φ, b and α to)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    features = memory.key_features(k).repeat_interleave(heads // kv_heads, dim=1)
    return memory.log_bias(positions, window).exp() * (memory.query_features(q) @ features.transpose(-1, -2))


def far_memory_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: SoftmaxWindow,
    memory: FarMemory,
    sink_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The window with its far memory over a whole sequence from position 0, from the definition: every pair's
    logit materialised (the window's ``q·k/√d``, a far sink's with ``sink_q`` past ``P``, an evicted token's
    ``log(e^b φ_qᵀφ_k)``) and one softmax per row. The spec every mode is tested against."""
    num_heads, length, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    t = torch.arange(length, device=q.device)
    causal = t[None, :] <= t[:, None]
    outside = t[:, None] - t[None, :] >= window.size
    sink = t[None, :] < window.sinks
    visible = causal & (~outside | sink)
    evicted = causal & outside & ~sink
    keys, values = (x.repeat_interleave(num_heads // kv_heads, dim=1) for x in (k, v))
    scores = q @ keys.transpose(-1, -2)
    if sink_q is not None:
        far = visible & outside & (t[:, None] > window.last_true_position)
        scores = torch.where(far, sink_q @ keys.transpose(-1, -2), scores)
    weights = memory_weights(q, k, memory, t[None], window)
    logits = torch.where(evicted, torch.log(weights), scores * window.scale)
    return torch.softmax(logits.masked_fill(~(visible | evicted), float("-inf")), dim=-1) @ values


def memory_column(readout: torch.Tensor, log_bias: torch.Tensor) -> MemoryColumn:
    """The softmax column of a readout ``[B, H, T, Dv + 1]`` (``φ_qᵀS``, ``φ_qᵀz``): logit ``log_bias + log φ_qᵀz``
    (``FarMemory.log_bias`` of the queries' positions) and value ``φ_qᵀS / φ_qᵀz``. A zero ``φ_qᵀz`` (nothing
    folded yet, or features that share no support) is raised to the dtype's smallest normal: its numerator is zero
    too, so the column weighs nothing and reads zero."""
    den = readout[..., -1:].clamp_min(torch.finfo(readout.dtype).tiny)
    return MemoryColumn(log_bias + torch.log(den), readout[..., :-1] / den)


def _run(
    ring_keys: torch.Tensor,
    ring_values: torch.Tensor,
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: int,
    window: SoftmaxWindow,
    memory: FarMemory,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(φ_k, [v, 1])`` of the run's first ``length`` entries (``[ring; keys]``, the ring's oldest at position
    ``position − W + 1``), zero where an entry is a sink or before the start (it never enters the memory)."""
    run_keys = torch.cat([ring_keys, keys], dim=2)[:, :, :length]
    run_values = torch.cat([ring_values, values], dim=2)[:, :, :length]
    at = position[:, None] - (window.size - 1) + torch.arange(length, device=keys.device)
    valid = (at >= window.sinks)[:, None, :, None]
    return memory.key_features(run_keys) * valid, with_ones(run_values) * valid


def run_readout(
    features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, initial: torch.Tensor | None
) -> torch.Tensor:
    """``[B, H, L, Dv + 1]``: query ``r`` (``features [B, H, L, F]``) reads ``initial [B, Hkv, F, Dv + 1]`` (None:
    zero) plus the run's entries ``u < r`` (``keys [B, Hkv, L, F]``, ``values [B, Hkv, L, Dv + 1]``), in blocks of
    ``CHUNK``: in-block pairs as masked scores, earlier blocks through their summed ``φ_k [v, 1]ᵀ``. The one
    dispatch (``linspec.ops.backend``) may send the call to its Triton twin, which computes the same."""
    if backend.far_readout_on_triton(features):
        from linspec.ops.triton.readout import run_readout as readout_kernel  # imports triton: only when routed

        return readout_kernel(features, keys, values, initial)
    batch, num_heads, length, width = features.shape
    kv_heads, value_width = keys.shape[1], values.shape[-1]
    chunk = max(min(CHUNK, length), 1)
    blocks = -(-length // chunk)
    pad = blocks * chunk - length

    def blocked(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, R, L, ·) -> (B, Hkv, R, NB, C, ·)
        x = F.pad(x, (0, 0, 0, pad))
        return x.view(*x.shape[:3], blocks, chunk, x.shape[-1])

    query = blocked(features.view(batch, kv_heads, num_heads // kv_heads, length, width))
    key, value = blocked(keys[:, :, None]), blocked(values[:, :, None])
    block_sums = key.transpose(-1, -2) @ value  # (B, Hkv, 1, NB, F, Dv + 1)
    before = torch.cat([torch.zeros_like(block_sums[:, :, :, :1]), block_sums[:, :, :, :-1]], dim=3).cumsum(dim=3)
    if initial is not None:
        before = before + initial[:, :, None, None]
    earlier = torch.ones(chunk, chunk, dtype=torch.bool, device=keys.device).tril(-1)
    scores = (query @ key.transpose(-1, -2)).masked_fill(~earlier, 0.0)
    out = scores @ value + query @ before  # (B, Hkv, R, NB, C, Dv + 1)
    return out.reshape(batch, num_heads, blocks * chunk, value_width)[:, :, :length]


def far_memory_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: SoftmaxWindow, memory: FarMemory
) -> MemoryColumn | None:
    """The memory's column for a whole sequence from position 0 (training, full forwards); None when no query
    reads one (the sequence never evicts a token)."""
    batch, kv_heads, length, key_dim = k.shape
    if length <= window.size + window.sinks:
        return None
    ring = (
        k.new_zeros(batch, kv_heads, window.size - 1, key_dim),
        v.new_zeros(batch, kv_heads, window.size - 1, v.shape[-1]),
    )
    start = torch.zeros(batch, dtype=torch.long, device=k.device)
    keys, values = _run(*ring, start, k, v, length, window, memory)
    log_bias = memory.log_bias(torch.arange(length, device=q.device)[None], window)
    return memory_column(run_readout(memory.query_features(q), keys, values, None), log_bias)


def _folded(state: WindowWithMemory, keys: torch.Tensor, values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The memory after folding each row's first ``count`` run entries."""
    taken = (torch.arange(keys.shape[2], device=keys.device)[None, :] < count[:, None])[:, None, :, None]
    return state.far_memory + (keys * taken).transpose(-1, -2) @ values


def far_memory_extend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowWithMemory,
    position: torch.Tensor,
    window: SoftmaxWindow,
    memory: FarMemory,
    token_mask: torch.Tensor | None = None,
) -> tuple[MemoryColumn, torch.Tensor]:
    """``(column, far memory after)`` for ``T`` new tokens (padding allowed) on rows at ``position [B]``; the column
    is in the input's column order (a padding column's is any finite value). One token without a mask is decoding."""
    length = q.shape[2]
    (real_q, real_k, real_v), count = real_tokens_first(token_mask, position, q, k, v)
    keys, values = _run(state.keys, state.values, position, real_k, real_v, length, window, memory)
    log_bias = memory.log_bias(position[:, None] + torch.arange(length, device=q.device), window)  # real first
    column = memory_column(run_readout(memory.query_features(real_q), keys, values, state.far_memory), log_bias)
    if token_mask is not None:  # back to the columns the tokens came in
        column = column.map(lambda x: gather_tokens(x, input_columns(token_mask)))
    return column, _folded(state, keys, values, count)


def step_column(
    q: torch.Tensor, far_memory: torch.Tensor, position: torch.Tensor, window: SoftmaxWindow, memory: FarMemory
) -> MemoryColumn:
    """The column of one query per row (``q [B, H, 1, D]`` at ``position [B]``, decode) that reads ``far_memory``
    as it is: no run entry precedes a step's only query."""
    batch, num_heads, _, _ = q.shape
    kv_heads = far_memory.shape[1]
    features = memory.query_features(q).view(batch, kv_heads, num_heads // kv_heads, -1)
    readout = (features @ far_memory).view(batch, num_heads, 1, -1)
    return memory_column(readout, memory.log_bias(position[:, None], window))


def far_memory_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowWithMemory,
    position: torch.Tensor,
    window: SoftmaxWindow,
    memory: FarMemory,
    in_place: bool = False,
) -> tuple[MemoryColumn, torch.Tensor]:
    """``far_memory_extend`` for one real token per row (decode): the query reads the memory as it is (the ring's
    oldest token is still in its window), then that token folds — one entry, where extend's run would copy the
    whole ring. ``in_place``: fold into ``state.far_memory`` itself (a state nothing else reads again)."""
    column = step_column(q, state.far_memory, position, window, memory)  # read before the fold writes
    keys, values = _run(state.keys[:, :, :1], state.values[:, :, :1], position, k, v, 1, window, memory)
    fold = keys.transpose(-1, -2) @ values
    return column, state.far_memory.add_(fold) if in_place else state.far_memory + fold


def far_memory_verify(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowWithMemory,
    position: torch.Tensor,
    layout: TreeLayout,
    window: SoftmaxWindow,
    memory: FarMemory,
) -> MemoryColumn:
    """The column of every node of a candidate tree (``q``/``k``/``v`` one entry per node) against a state that does
    not change: the state's memory, the ring's oldest ``min(depth, W − 1)`` entries, and the node's ancestors at
    least ``W`` shallower (deep trees under short windows)."""
    batch, num_heads, nodes, _ = q.shape
    kv_heads, ring = k.shape[1], window.size - 1
    depth = layout.depth  # (B, N)
    ring_keys, ring_values = _run(state.keys, state.values, position, k[:, :, :0], v[:, :, :0], ring, window, memory)
    ring_read = torch.arange(ring, device=q.device)[None, None, :] < depth[:, :, None]  # (B, N, W − 1)
    node_read = (
        layout.ancestors
        & (depth[:, :, None] - depth[:, None, :] >= window.size)
        & (position[:, None, None] + depth[:, None, :] >= window.sinks)
    )  # (B, N, N)
    keys = torch.cat([ring_keys, memory.key_features(k)], dim=2)
    values = torch.cat([ring_values, with_ones(v)], dim=2)
    read = torch.cat([ring_read, node_read], dim=-1)[:, None, None]  # (B, 1, 1, N, W − 1 + N)
    features = memory.query_features(q).view(batch, kv_heads, num_heads // kv_heads, nodes, -1)
    scores = (features @ keys[:, :, None].transpose(-1, -2)).masked_fill(~read, 0.0)
    readout = scores @ values[:, :, None] + features @ state.far_memory[:, :, None]
    log_bias = memory.log_bias(position[:, None] + depth, window)
    return memory_column(readout.reshape(batch, num_heads, nodes, -1), log_bias)


def far_memory_commit(
    state: WindowWithMemory,
    position: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: SoftmaxWindow,
    memory: FarMemory,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The far memory after appending already-computed raw keys and values at ``position [B]`` (the commit of
    accepted drafts): the tokens they push out of the ring."""
    if token_mask is None:
        token_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    token_mask = token_mask.bool()
    real_k, real_v = real_first(k, token_mask), real_first(v, token_mask)
    keys, values = _run(state.keys, state.values, position, real_k, real_v, k.shape[2], window, memory)
    return _folded(state, keys, values, token_mask.sum(dim=1))
