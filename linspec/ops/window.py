"""The softmax window: the local term of the ``window`` preset, in every execution mode.

Token ``t`` attends, with the pretrained model's own softmax and logits ``q·k/√d`` (RoPE'd, no feature map), to
the ``W`` most recent tokens (itself included) and to the first ``n`` tokens of the sequence (attention sinks)::

    visible(t, s) = s ≤ t  and  (t − s < W  or  s < n)

Why it exists: the paper's in-group term ``relu(q̂·k̂)²`` on L2-normalised features throws away the norms and the
1/√d temperature the pretrained heads were trained with, so a fresh conversion starts far from the model it came
from (SmolLM2-135M: 50 perplexity for block-local softmax at G = 64, against 24 for the original, before any
training). A sliding window of the pretrained softmax reproduces those heads exactly wherever the context fits in
the window, and the sinks keep the first tokens that most heads park their attention on (Xiao et al. 2023,
StreamingLLM: dropping them is what breaks a plain window). The cost stays constant per token: the state keeps
the last ``W − 1`` keys and values and the ``n`` sink entries.

Where the sinks sit (``sink_q``): with absolute positions a sink's RoPE distance to the query grows with the
context, so the logits the heads park on them drift and perplexity creeps up as the context grows. Given
``sink_q`` (the query rotated at position ``P = W + n − 1``), a sink outside the window is scored as if it sat
right before the window's oldest token, its distance frozen at ``P − j`` (StreamingLLM assigns positions inside
the cache for the same reason): past ``P`` every token then sees its sinks and window exactly as token ``P``
does, so the window term is translation-invariant and the curve cannot drift. Queries at ``t ≤ P`` see their
sinks at the true distance either way.

A window's decode state (``WindowState``) holds *raw* keys. Every stateful function here takes each row's
``position`` (real tokens before the new ones) from its caller and never advances it: a layer counts its tokens
once for all of its terms.

A far memory (``linspec.ops.far_memory``) enters the window's softmax as one more column per query
(``MemoryColumn``): every mode below takes it as ``memory`` and merges it with the sinks into ``attend``'s anchor,
so the window and the memory share one normaliser. A query reads it once something has been evicted
(``reads_memory``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from linspec.ops.extend import appended_in_place, gather_tokens, newest, real_first
from linspec.ops.verify import TreeLayout

# New tokens per slice in ``window_extend`` on long prompts: each slice scores n + W − 1 + slice keys per query, so
# smaller slices waste less on keys their first queries cannot see (256: 5% faster than 512 on a 2048-token prefill).
EXTEND_SLICE = 256
# Queries per block in ``window_attention`` past the window (see there).
QUERY_BLOCK = 256


@dataclass(frozen=True)
class SoftmaxWindow:
    """``size`` W (a token sees itself and the W − 1 before it), ``sinks`` n, and the logit ``scale`` (1/√d)."""

    size: int
    sinks: int
    scale: float

    @property
    def last_true_position(self) -> int:
        """``P``: the last query position whose out-of-window sinks keep their true distance (see the module doc)."""
        return self.size + self.sinks - 1


@dataclass
class WindowState:
    """A window's part of a layer's decode state, constant in context length: the raw keys and values of the last
    W − 1 tokens, oldest first, and of the first n tokens (the sinks); zeros where no token has been yet."""

    keys: torch.Tensor  # (B, Hkv, W-1, Dk)
    values: torch.Tensor  # (B, Hkv, W-1, Dv)
    sink_keys: torch.Tensor  # (B, Hkv, n, Dk)
    sink_values: torch.Tensor  # (B, Hkv, n, Dv)


@dataclass(frozen=True)
class MemoryColumn:
    """One more column of the window's softmax whose logit and value differ per query (the far memory's readout,
    ``linspec.ops.far_memory``): ``logit [B, H, T, 1]`` and ``value [B, H, T, Dv]``, in the queries' order."""

    logit: torch.Tensor
    value: torch.Tensor

    def map(self, fn) -> MemoryColumn:
        """The column with ``fn`` applied to both tensors (slicing, padding, packing along the query axis)."""
        return MemoryColumn(fn(self.logit), fn(self.value))


@dataclass(frozen=True)
class ExactColumns:
    """Keys and values a decode step's query reads exactly beside its window, under the same softmax (a sparse
    cache's entries, ``linspec.ops.sparse_cache``): ``keys [B, Hkv, K, Dk]`` and ``values [B, Hkv, K, Dv]`` with
    their logit ``q·k/√d``, and ``empty [B, Hkv, K]``, the slots that hold no token (masked)."""

    keys: torch.Tensor
    values: torch.Tensor
    empty: torch.Tensor


def reads_memory(query_position: torch.Tensor, window: SoftmaxWindow) -> torch.Tensor:
    """Whether a query at ``query_position`` has a far-memory column: some token that is not a sink has left its
    window (``t − j ≥ W`` for some ``j ≥ n``), i.e. ``t ≥ W + n``. Before that the layer is the window alone."""
    return query_position >= window.size + window.sinks


def far_queries(q: torch.Tensor, sink_q: torch.Tensor | None, query_position: torch.Tensor, window: SoftmaxWindow):
    """The queries that score out-of-window sinks: ``sink_q`` past position ``P``, ``q`` up to it; ``None`` when the
    sinks keep absolute positions or no query is past ``P`` (then ``q`` scores them). ``query_position`` is ``[T]``
    or ``[B, T]``."""
    if sink_q is None:
        return None
    past = query_position > window.last_true_position
    if not bool(past.any()):
        return None
    past = past.view(1, 1, -1, 1) if past.dim() == 1 else past[:, None, :, None]
    return torch.where(past, sink_q, q)


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    far_q: torch.Tensor | None = None,
    sink_columns: torch.Tensor | None = None,
    memory: MemoryColumn | None = None,
    memory_seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q [B, H, T, D]`` over ``keys``/``values [B, Hkv, K, D]`` where ``visible`` (``[B or 1,
    T, K]``, bool) allows; query head ``h`` reads kv head ``h // (H // Hkv)``. Every query must see a key.

    With ``far_q``, the sinks are scored with ``far_q`` instead of ``q`` (``far_queries`` gives ``q`` itself to the
    queries that keep true distances); ``sink_columns`` (``[B or 1, S]``, bool) marks which of the first ``S``
    columns hold them. With ``memory``, one more column per query joins the softmax where ``memory_seen`` (``[B or
    1, T]``, the batch size of ``visible``) allows.

    The scores are never materialised (``scaled_dot_product_attention``'s fused kernel). The sinks, a handful of
    columns, are attended on their own (with the memory column beside them), giving their output ``o_s`` and
    log-normaliser ``ℓ_s``; the fused attention then runs over the other columns plus one *anchor* column whose
    logit is ``ℓ_s`` (an extra query dimension holding ``ℓ_s`` meets a key that is 1 there) and whose value is 1
    in an extra channel. Its output is the other columns' share of the softmax, and in that channel the sinks'
    share ``w``: ``out + w · o_s`` is the softmax over all columns, exactly, at one extra dimension instead of a
    second query. Without sinks to set apart, the memory column alone is the anchor."""
    sinks_apart = far_q is not None and sink_columns.shape[-1] > 0
    if not sinks_apart and memory is None:
        return _fused_attention(q, keys, values, visible[:, None], scale)
    batch, kv_heads, value_dim = q.shape[0], keys.shape[1], values.shape[-1]
    if sinks_apart:
        log_norm, anchor_out, seen = _sinks_apart(
            q, keys, values, visible, scale, far_q, sink_columns, memory, memory_seen
        )
        span = sink_columns.shape[-1]
        others = torch.cat([visible[..., :span] & ~sink_columns[:, None, :], visible[..., span:]], dim=-1)
    else:  # the memory column is the anchor; rows that do not read it get a finite logit and a masked anchor
        seen, others = memory_seen, visible
        log_norm, anchor_out = memory.logit.masked_fill(~seen[:, None, :, None], 0.0), memory.value

    def with_anchor(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, K + 1, D + 1): a zero channel, then the anchor row
        anchor = x.new_zeros(batch, kv_heads, 1, x.shape[-1] + 1)
        anchor[..., -1] = 1
        return torch.cat([F.pad(x, (0, 1)), anchor], dim=2)

    mask = torch.cat([others, seen[..., None]], dim=-1)[:, None]
    query = torch.cat([q, log_norm / scale], dim=-1)
    out = _fused_attention(query, with_anchor(keys), with_anchor(values), mask, scale)
    return out[..., :value_dim] + out[..., value_dim:] * anchor_out


def _sinks_apart(q, keys, values, visible, scale, far_q, sink_columns, memory, memory_seen):
    """``(ℓ_s [B, H, T, 1], o_s [B, H, T, Dv], seen [B or 1, T])`` of ``attend``'s sinks, scored with ``far_q``,
    and of the memory column beside them (one softmax over both)."""
    batch, num_heads, length, key_dim = q.shape
    kv_heads, span, value_dim = keys.shape[1], sink_columns.shape[-1], values.shape[-1]
    repeats = num_heads // kv_heads
    sink_visible = visible[..., :span] & sink_columns[:, None, :]  # (B or 1, T, S)
    stacked = far_q.reshape(batch, kv_heads, repeats * length, key_dim)  # the R query heads of a kv head as rows
    scores = (stacked @ keys[:, :, :span].transpose(-1, -2)).view(batch, kv_heads, repeats, length, span) * scale
    if memory is not None:
        scores = torch.cat([scores, memory.logit.view(batch, kv_heads, repeats, length, 1)], dim=-1)
        sink_visible = torch.cat([sink_visible, memory_seen[..., None]], dim=-1)
    seen = sink_visible.any(dim=-1)  # (B or 1, T): rows with a sink to read
    # rows without a visible sink score zeros instead of -inf (no NaN in the backward); their anchor is masked
    scores = scores.masked_fill(~sink_visible[:, None, None] & seen[:, None, None, :, None], float("-inf"))
    scores = scores.masked_fill(~seen[:, None, None, :, None], 0.0)
    log_norm = torch.logsumexp(scores, dim=-1, keepdim=True).view(batch, num_heads, length, 1)
    weights = torch.softmax(scores, dim=-1)
    if memory is None:
        weights = weights.view(batch, kv_heads, repeats * length, span)
        return log_norm, (weights @ values[:, :, :span]).view(batch, num_heads, length, value_dim), seen
    on_sinks = weights[..., :span].reshape(batch, kv_heads, repeats * length, span) @ values[:, :, :span]
    on_memory = weights[..., span:].reshape(batch, num_heads, length, 1) * memory.value
    return log_norm, on_sinks.view(batch, num_heads, length, value_dim) + on_memory, seen


def _fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float):
    """``scaled_dot_product_attention`` with grouped kv heads; query/key and value widths padded to one (the fused
    CPU kernel takes only equal widths, and falls back to materialised scores otherwise)."""
    width, value_dim = max(q.shape[-1], values.shape[-1]), values.shape[-1]

    def padded(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))

    out = F.scaled_dot_product_attention(
        padded(q), padded(keys), padded(values), attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
    )
    return out[..., :value_dim]


def leading_sinks(count: int, device: torch.device) -> torch.Tensor:
    """``attend``'s ``sink_columns`` when the first ``count`` columns hold the sinks (every mode but tree
    verification lays out its keys so)."""
    return torch.ones(1, count, dtype=torch.bool, device=device)


def window_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: SoftmaxWindow, sink_q: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense masked form over a whole sequence from position 0, scores materialised from the definition
    (token ``t`` scores an out-of-window sink with ``sink_q[t]`` once ``t > P``): the spec the other modes are
    tested against."""
    num_heads, length, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    t = torch.arange(length, device=q.device)
    outside = t[:, None] - t[None, :] >= window.size
    visible = (t[None, :] <= t[:, None]) & (~outside | (t[None, :] < window.sinks))
    keys, values = (x.repeat_interleave(num_heads // kv_heads, dim=1) for x in (k, v))
    scores = q @ keys.transpose(-1, -2)
    if sink_q is not None:
        far = visible & outside & (t[:, None] > window.last_true_position)
        scores = torch.where(far, sink_q @ keys.transpose(-1, -2), scores)
    scores = (scores * window.scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: SoftmaxWindow,
    sink_q: torch.Tensor | None = None,
    memory: MemoryColumn | None = None,
) -> torch.Tensor:
    """A whole sequence from position 0 (training, full forwards) in ``O(T · (W + S + n))``.

    A sequence no longer than the window is plain causal attention (the fused kernel's causal form skips the
    upper triangle). A longer one is cut into blocks of ``S = min(W, QUERY_BLOCK)`` queries; block ``b`` reads the
    ``W − 1`` keys before it, its own ``S`` and, first, the sinks, for the queries that have left them behind.
    Smaller blocks waste less of each block's key range on keys its first queries cannot see (``T · (W + S)``
    scored pairs instead of ``T · 2W``), at more, smaller products. A sequence whose ``T²`` scores cost no more
    than that takes the dense masked form instead. ``memory``: the far memory's column for every query.
    """
    batch, num_heads, length, _ = q.shape
    kv_heads = k.shape[1]
    size = window.size
    if length <= size:  # every key is inside every window: causal, and no query is past P (no far sinks)
        enable_gqa = num_heads != kv_heads
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=window.scale, enable_gqa=enable_gqa)
    far_q = far_queries(q, sink_q, torch.arange(length, device=q.device), window)
    span = min(size, QUERY_BLOCK)
    if length <= size + span:
        t = torch.arange(length, device=q.device)
        visible = (t[None, :] <= t[:, None]) & ((t[:, None] - t[None, :] < size) | (t[None, :] < window.sinks))
        sinks = leading_sinks(min(window.sinks, length), q.device)
        return attend(q, k, v, visible[None], window.scale, far_q, sinks, memory, reads_memory(t, window)[None])
    blocks = -(-length // span)
    pad = blocks * span - length
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        far_q = None if far_q is None else F.pad(far_q, (0, 0, 0, pad))
        memory = None if memory is None else memory.map(lambda x: F.pad(x, (0, 0, 0, pad)))
    reach = size - 1 + span  # keys per block: the W − 1 before it and its own

    def banded(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, NB, W − 1 + S, D)
        return F.pad(x, (0, 0, size - 1, 0)).unfold(2, reach, span).transpose(-1, -2)

    sinks = min(window.sinks, length)

    def with_sinks(x: torch.Tensor) -> torch.Tensor:
        head = x[:, :, None, :sinks].expand(batch, kv_heads, blocks, sinks, x.shape[-1])
        keys = torch.cat([head, banded(x)], dim=3).transpose(1, 2)  # (B, NB, Hkv, n + W − 1 + S, D)
        return keys.reshape(batch * blocks, kv_heads, sinks + reach, x.shape[-1])

    keys, values = with_sinks(k), with_sinks(v)
    block = torch.arange(blocks, device=q.device).view(-1, 1, 1)
    query = block * span + torch.arange(span, device=q.device).view(1, -1, 1)  # (NB, S, 1) positions
    key = block * span - (size - 1) + torch.arange(reach, device=q.device).view(1, 1, -1)  # (NB, 1, W − 1 + S)
    band_visible = (key >= 0) & (key <= query) & (query - key < size)
    sink = torch.arange(sinks, device=q.device).view(1, 1, -1)
    sink_visible = query - sink >= size  # (NB, S, n): a sink inside the window is read from the band
    visible = torch.cat([sink_visible, band_visible], dim=-1)  # (NB, S, n + W − 1 + S)

    def by_block(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, num_heads, blocks, span, -1).transpose(1, 2).reshape(batch * blocks, num_heads, span, -1)

    far = None if far_q is None else by_block(far_q)
    seen = reads_memory(query[..., 0], window).repeat(batch, 1)  # (B · NB, S)
    out = attend(
        by_block(q), keys, values, visible.repeat(batch, 1, 1), window.scale, far, leading_sinks(sinks, q.device),
        None if memory is None else memory.map(by_block), seen,
    )  # fmt: skip
    out = out.view(batch, blocks, num_heads, span, -1).transpose(1, 2).reshape(batch, num_heads, blocks * span, -1)
    return out[:, :, :length]


def empty_window(
    batch: int, kv_heads: int, key_dim: int, value_dim: int, window: SoftmaxWindow, dtype: torch.dtype, device=None
) -> WindowState:
    """A window's state before any token: zero keys and values (positions before the start)."""

    def zeros(length: int, dim: int) -> torch.Tensor:
        return torch.zeros(batch, kv_heads, length, dim, dtype=dtype, device=device)

    return WindowState(
        keys=zeros(window.size - 1, key_dim),
        values=zeros(window.size - 1, value_dim),
        sink_keys=zeros(window.sinks, key_dim),
        sink_values=zeros(window.sinks, value_dim),
    )


def _advanced(
    state: WindowState,
    position: torch.Tensor,
    real_k: torch.Tensor,
    real_v: torch.Tensor,
    count: torch.Tensor,
    in_place: bool = False,
) -> WindowState:
    """The window after appending each row's first ``count`` entries of ``real_k``/``real_v`` at ``position``
    (any other field of ``state`` — a far memory's — is carried as it is). ``in_place`` (one entry per row): the
    ring moves along its own buffer (``appended_in_place``)."""
    batch, kv_heads, length, _ = real_k.shape
    sinks = state.sink_keys.shape[2]
    if in_place and state.keys.shape[2]:
        ring = {"keys": appended_in_place(state.keys, real_k), "values": appended_in_place(state.values, real_v)}
    else:
        ring = {"keys": newest(state.keys, real_k, count), "values": newest(state.values, real_v, count)}
    if not bool((position < sinks).any()):  # every sink slot is filled already (the common case)
        return replace(state, **ring)
    source = torch.arange(sinks, device=count.device)[None, :] - position[:, None]  # (B, n): new-token rank
    taken = ((source >= 0) & (source < count[:, None]))[:, None, :, None]
    index = source.clamp(0, max(length - 1, 0))[:, None, :, None]

    def sink(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.where(taken, new.gather(2, index.expand(batch, kv_heads, sinks, new.shape[-1])), old)

    return replace(state, **ring, sink_keys=sink(state.sink_keys, real_k), sink_values=sink(state.sink_values, real_v))


def _sinks_and_ring_visible(
    sink_count: torch.Tensor, position: torch.Tensor, query_position: torch.Tensor, size: int, sinks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, Q, n], [B, Q, W − 1])``: which sink slots and ring slots queries at ``query_position [B, Q]`` see,
    for a ring whose newest entry sits at ``position − 1`` and sink slots of which the first ``sink_count [B]``
    are filled.

    A sink is read from its slot only once it has left the query's window (inside the window the ring, or the new
    tokens, hold it): every visible sink slot is an out-of-window one.
    """
    query = query_position[:, :, None]
    sink = torch.arange(sinks, device=query.device)
    sink_visible = (sink < sink_count[:, None, None]) & (query - sink >= size)
    position = position[:, None, None]
    ring = position - (size - 1) + torch.arange(size - 1, device=query.device)  # ring slots' positions
    ring_visible = (ring >= 0) & (query - ring < size)
    return sink_visible, ring_visible


def _extend_slice(
    q, k, v, sink_q, state: WindowState, position: torch.Tensor, token_mask: torch.Tensor, window: SoftmaxWindow,
    memory: MemoryColumn | None = None,
):  # fmt: skip
    """One slice: the sinks are read from the state *after* it (a sink among the new tokens is a slot already)."""
    length = q.shape[2]
    count = token_mask.sum(dim=1)
    real_q, real_k, real_v = (real_first(x, token_mask) for x in (q, k, v))
    after = _advanced(state, position, real_k, real_v, count)
    rank = torch.arange(length, device=q.device)
    query_position = position[:, None] + rank  # (B, T): real token j sits at position + j
    new_visible = (rank[None, :] <= rank[:, None]) & (rank[:, None] - rank[None, :] < window.size)
    sink_visible, ring_visible = _sinks_and_ring_visible(
        position + count, position, query_position, window.size, window.sinks
    )
    visible = torch.cat([sink_visible, ring_visible, new_visible.expand(q.shape[0], -1, -1)], dim=-1)
    keys = torch.cat([after.sink_keys, state.keys, real_k], dim=2)
    values = torch.cat([after.sink_values, state.values, real_v], dim=2)
    far_q = far_queries(real_q, None if sink_q is None else real_first(sink_q, token_mask), query_position, window)
    packed = None if memory is None else memory.map(lambda x: real_first(x, token_mask))
    out_real = attend(
        real_q,
        keys,
        values,
        visible,
        window.scale,
        far_q,
        leading_sinks(window.sinks, q.device),
        packed,
        reads_memory(query_position, window),
    )  # real tokens first; fmt: skip
    out = gather_tokens(out_real, (token_mask.long().cumsum(dim=1) - 1).clamp(min=0))  # back to the columns
    return out * token_mask[:, None, :, None], after, count


def window_extend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowState,
    position: torch.Tensor,
    window: SoftmaxWindow,
    token_mask: torch.Tensor | None = None,
    sink_q: torch.Tensor | None = None,
    memory: MemoryColumn | None = None,
) -> tuple[torch.Tensor, WindowState]:
    """Outputs for ``T`` new tokens on a window whose rows sit at ``position [B]`` (padding allowed, zeros out),
    and the window after them. Long inputs run in slices of ``EXTEND_SLICE`` tokens, in order. ``memory``: the
    far memory's column for each of the ``T`` columns."""
    batch, _, length, _ = q.shape
    if token_mask is None:
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    token_mask = token_mask.bool()
    if length == 0:
        return q.new_zeros(batch, q.shape[1], 0, v.shape[-1]), state
    outs = []
    for start in range(0, length, EXTEND_SLICE):
        part = slice(start, start + EXTEND_SLICE)
        q_part, k_part, v_part = q[:, :, part], k[:, :, part], v[:, :, part]
        sink_part = None if sink_q is None else sink_q[:, :, part]
        memory_part = None if memory is None else memory.map(lambda x, part=part: x[:, :, part])
        out, state, count = _extend_slice(
            q_part, k_part, v_part, sink_part, state, position, token_mask[:, part], window, memory_part
        )
        outs.append(out)
        position = position + count
    return torch.cat(outs, dim=2), state


def window_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowState,
    position: torch.Tensor,
    window: SoftmaxWindow,
    sink_q: torch.Tensor | None = None,
    memory: MemoryColumn | None = None,
    exact: ExactColumns | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, WindowState]:
    """``window_extend`` for one real token per row (decode), as a handful of ops instead of the general form's
    packing and masks: scores against the sink slots, the ring and the token itself (and ``exact``'s columns and
    the far memory's column), one softmax, and the ring shifted by one slot. Masks are built only while some row
    is within ``P`` of the start (host checks; every row past ``P`` sees all its sinks — scored with ``sink_q`` —
    and its whole ring). ``position [B]``: the new token's position in each row. ``in_place``: the ring moves
    along its own buffer (``appended_in_place``; ``state``'s entries stay as they were, but nothing else may
    append to it)."""
    batch, num_heads, _, key_dim = q.shape
    kv_heads = k.shape[1]
    query = q.view(batch, kv_heads, num_heads // kv_heads, key_dim)  # (B, Hkv, R, D)
    far = query
    if sink_q is not None:
        past = position > window.last_true_position
        far_rows = sink_q.view(query.shape)
        far = far_rows if bool(past.all()) else torch.where(past.view(-1, 1, 1, 1), far_rows, query)
    scores = (
        torch.cat(
            [
                far @ state.sink_keys.transpose(-1, -2),
                query @ state.keys.transpose(-1, -2),
                query @ k.transpose(-1, -2),
            ],
            dim=-1,
        )
        * window.scale
    )  # (B, Hkv, R, n + W - 1 + 1)
    sinks, ring = window.sinks, window.size - 1
    visible = None
    if not bool((position >= window.last_true_position).all()):
        slot = torch.arange(sinks + ring, device=q.device)
        at = position[:, None]
        visible = torch.where(slot < sinks, at - slot >= window.size, slot - sinks >= ring - at)  # (B, n + W - 1)
        visible = torch.cat([visible, visible.new_ones(batch, 1)], dim=1)
    cached = 0 if exact is None else exact.keys.shape[2]
    if exact is not None:
        exact_scores = (query @ exact.keys.transpose(-1, -2)).masked_fill(exact.empty[:, :, None], float("-inf"))
        scores = torch.cat([scores, exact_scores * window.scale], dim=-1)
        visible = None if visible is None else torch.cat([visible, visible.new_ones(batch, cached)], dim=1)
    if memory is not None:
        scores = torch.cat([scores, memory.logit.view(batch, kv_heads, num_heads // kv_heads, 1)], dim=-1)
        seen = reads_memory(position, window)
        if visible is None and not bool(seen.all()):
            visible = seen.new_ones(batch, sinks + ring + 1 + cached)
        visible = None if visible is None else torch.cat([visible, seen[:, None]], dim=1)
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    own = sinks + ring
    out = (
        weights[..., :sinks] @ state.sink_values
        + weights[..., sinks:own] @ state.values
        + weights[..., own : own + 1] * v
    )  # (B, Hkv, R, Dv)
    if exact is not None:
        out = out + weights[..., own + 1 : own + 1 + cached] @ exact.values
    if memory is not None:
        out = out + weights[..., -1:] * memory.value.view(out.shape)
    after = _advanced(state, position, k, v, torch.ones_like(position), in_place)  # the ring shifted by one slot
    return out.reshape(batch, num_heads, 1, v.shape[-1]), after


def window_append(
    state: WindowState,
    position: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> WindowState:
    """The window with already-computed raw keys and values appended at ``position [B]`` (the commit of accepted
    drafts)."""
    if token_mask is None:
        token_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    token_mask = token_mask.bool()
    count = token_mask.sum(dim=1)
    return _advanced(state, position, real_first(k, token_mask), real_first(v, token_mask), count)


def window_verify(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowState,
    position: torch.Tensor,
    layout: TreeLayout,
    window: SoftmaxWindow,
    sink_q: torch.Tensor | None = None,
    memory: MemoryColumn | None = None,
) -> torch.Tensor:
    """Every node of a candidate tree at once: node ``a`` (true position ``position + depth(a)``) sees the state's
    sinks and ring as a token at that position would, and its own ancestors — never a sibling. ``memory``: the
    far memory's column for every node."""
    depth = layout.depth  # (B, N)
    query_position = position[:, None] + depth
    outside = depth[:, :, None] - depth[:, None, :] >= window.size
    node_visible = layout.ancestors & (~outside | (query_position[:, None, :] < window.sinks))
    sink_visible, ring_visible = _sinks_and_ring_visible(
        position.clamp(max=window.sinks), position, query_position, window.size, window.sinks
    )
    # sinks, then nodes (a node can be an out-of-window sink of its descendants on short prompts), then the ring
    visible = torch.cat([sink_visible, node_visible, ring_visible], dim=-1)
    keys = torch.cat([state.sink_keys, k, state.keys], dim=2)
    values = torch.cat([state.sink_values, v, state.values], dim=2)
    # the sink slots, and the nodes at sink positions (descendants more than W deeper read them as sinks)
    sinks = torch.cat(
        [leading_sinks(window.sinks, q.device).expand(q.shape[0], -1), query_position < window.sinks], dim=-1
    )
    far_q = far_queries(q, sink_q, query_position, window)
    return attend(q, keys, values, visible, window.scale, far_q, sinks, memory, reads_memory(query_position, window))
