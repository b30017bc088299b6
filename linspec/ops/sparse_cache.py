"""The sparse cache: ``K`` tokens per kv head that have left the softmax window, attended exactly (LoLA, McDermott
et al. 2025) — training-free retrieval past the window in constant state.

A linear memory recalls a token well when its key looks like the keys folded before it, and badly when it stands
out; the tokens it recalls worst are the ones a query cannot get back from it. So each layer keeps, per kv head,
the ``K`` evicted tokens with the largest *self-recall error* in a small exact cache and reads them with the
window's own logit ``q·k/√d`` (RoPE'd keys at their true positions) in the window's softmax, beside the far
memory's column (``linspec.ops.far_memory``). The rest fold into the far memory as before, or are dropped when
the layer has none.

The schedule, token by token (every mode follows it exactly). When token ``j ≥ n`` leaves the window (the moment
the far memory would fold it) it is a candidate with score ``e_j``:

* ``recall-error``: ``‖v_j − φ_k(k_j)ᵀS / φ_k(k_j)ᵀz‖²`` against the far memory at that moment (the layer's own
  key features; ``‖v_j‖²`` while the memory is empty, and always without a far memory: a memory that holds
  nothing recalls zero, so the tokens that would carry most are kept);
* ``recency``: ``j`` (the cache is the ``K`` most recently evicted tokens);
* ``random``: a fixed hash of ``(j, kv head)`` in ``[0, 1)`` (seeded, the same in every mode and every run).

While the cache has a free slot the candidate enters. Once full, it enters only if ``e_j`` beats the smallest
stored score strictly, and that entry leaves (of equal smallest scores, the oldest token); the token that leaves
— or ``j`` itself when it does not enter — folds into the far memory. Scores are kept from entry, never
recomputed. Each eviction so folds at most one token, so the far memory is the far-memory run of
``linspec.ops.far_memory`` with its entries replaced by the folded tokens in fold order (zero where nothing is
folded) and the same chunked readout serves it; the cache part is an exact masked attention over the old cache
and this call's run entries, each query seeing the entries in the cache at its time. The schedule itself is a
loop over the evictions of a call (vectorised over rows and heads).

Both parts join the window's softmax as one column (``MemoryColumn``): the log-sum-exp of the cache's logits and
the memory's logit, with the matching mix of their values — the same softmax as one column per cached token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linspec.errors import LinspecError
from linspec.ops.extend import gather_tokens, input_columns, real_first, real_tokens_first
from linspec.ops.far_memory import (
    FarMemory,
    memory_column,
    memory_weights,
    run_readout,
    spiky_features,
    step_column,
)
from linspec.ops.memory import with_ones
from linspec.ops.verify import TreeLayout
from linspec.ops.window import ExactColumns, MemoryColumn, SoftmaxWindow, WindowState
from linspec.utils.threads import on_calling_thread

# The seed of the ``random`` policy's hash (any fixed number: the choice must repeat across modes and runs).
RANDOM_SEED = 0x5EED
# Queries per block of the cache's masked attention (its scores are B·H·block·columns).
QUERY_BLOCK = 256


@dataclass(frozen=True)
class SparseCache:
    """``size`` K (tokens per kv head) and the ``policy`` that chooses them (``recall-error``, ``recency`` or
    ``random``)."""

    size: int
    policy: str


@dataclass
class WindowWithCache(WindowState):
    """A window's decode state with its sparse cache (and its far memory, or None without one): per kv head the
    cached tokens' RoPE'd keys and values, the score each entered with and its position (−1: an empty slot), in
    slot order. Constant in context length: ``K`` entries per kv head and layer."""

    far_memory: torch.Tensor | None
    cache_keys: torch.Tensor  # (B, Hkv, K, Dk)
    cache_values: torch.Tensor  # (B, Hkv, K, Dv)
    cache_scores: torch.Tensor  # (B, Hkv, K)
    cache_positions: torch.Tensor  # (B, Hkv, K), long


def empty_cache(window: WindowState, far_memory: torch.Tensor | None, cache: SparseCache) -> WindowWithCache:
    """``window`` (before any token) with an empty cache of ``cache.size`` slots and ``far_memory`` (or None)."""
    batch, kv_heads, _, key_dim = window.sink_keys.shape
    value_dim = window.sink_values.shape[-1]
    like = window.keys
    return WindowWithCache(
        window.keys, window.values, window.sink_keys, window.sink_values, far_memory,
        cache_keys=like.new_zeros(batch, kv_heads, cache.size, key_dim),
        cache_values=like.new_zeros(batch, kv_heads, cache.size, value_dim),
        cache_scores=like.new_zeros(batch, kv_heads, cache.size),
        cache_positions=torch.full((batch, kv_heads, cache.size), -1, dtype=torch.long, device=like.device),
    )  # fmt: skip


def random_scores(positions: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``random`` policy's scores ``[B, Hkv, L]`` for tokens at ``positions [B, L]``: an integer hash of
    ``(position, kv head)`` mapped to ``[0, 1)`` (every product stays below 2⁶³)."""
    head = torch.arange(kv_heads, device=positions.device)[None, :, None]
    x = torch.remainder(positions[:, None, :] * 2654435761 + head * 40503 + RANDOM_SEED, 2**32)
    for _ in range(2):
        x = torch.remainder((x ^ (x >> 16)) * 0x45D9F3B, 2**32)
    x = x ^ (x >> 16)
    return (x.double() / 2**32).to(dtype)


def recall_error(features: torch.Tensor, values: torch.Tensor, far_memory: torch.Tensor | None) -> torch.Tensor:
    """``‖v − φᵀS / φᵀz‖²``: how badly ``far_memory [B, Hkv, F, Dv + 1]`` recalls each value ``values [B, Hkv,
    Dv]`` from its key features ``features [B, Hkv, F]``. A memory that holds nothing (``φᵀz = 0``, or None)
    recalls zero: the error is ``‖v‖²``."""
    if far_memory is None:
        return values.square().sum(dim=-1)
    readout = (features[..., None, :] @ far_memory)[..., 0, :]
    recalled = readout[..., :-1] / readout[..., -1:].clamp_min(torch.finfo(readout.dtype).tiny)
    return (values - recalled).square().sum(dim=-1)


@dataclass(frozen=True)
class Schedule:
    """Who is in the cache when, for one call. The *pool* is the old cache's ``K`` slots followed by the call's
    ``L`` run entries; event ``u`` is run entry ``u`` leaving the window, and query ``r`` reads the state after
    events ``0 … r − 1``. Pool entry ``c`` is in the cache for query ``r`` iff ``enter[c] < r ≤ leave[c]``."""

    enter: torch.Tensor  # (B, Hkv, K + L) long: −1 for a filled old slot, u for a run entry that entered, else BIG
    leave: torch.Tensor  # (B, Hkv, K + L) long: the event that evicts it (BIG: it stays)
    fold: torch.Tensor  # (B, Hkv, L) long: the pool entry folded into the far memory at each event, −1 none
    slots: torch.Tensor  # (B, Hkv, K) long: the pool entry in each slot after the call's events
    scores: torch.Tensor  # (B, Hkv, K): their scores
    positions: torch.Tensor  # (B, Hkv, K): their positions (−1: empty)


def schedule(
    state: WindowWithCache,
    pool_features: torch.Tensor | None,
    pool_values: torch.Tensor,
    run_positions: torch.Tensor,
    valid: torch.Tensor,
    events: int,
    cache: SparseCache,
) -> Schedule:
    """Run the first ``events`` evictions of a call in order. ``pool_values [B, Hkv, K + L, Dv]`` and, with a far
    memory, ``pool_features`` (φ_k of the pool's keys; None without one); ``run_positions [B, L]`` the run
    entries' positions and ``valid [B, L]`` which of them are evicted tokens (not a sink, not before the start,
    not past the row's real tokens)."""
    batch, kv_heads, _, _ = pool_values.shape
    size, length = cache.size, run_positions.shape[1]
    device = run_positions.device
    run_values = pool_values[:, :, size:]
    memory = state.far_memory
    tracks_memory = cache.policy == "recall-error" and memory is not None
    if cache.policy == "recency":
        scores = run_positions[:, None, :].expand(batch, kv_heads, length).to(pool_values.dtype)
    elif cache.policy == "random":
        scores = random_scores(run_positions, kv_heads, pool_values.dtype)
    elif not tracks_memory:
        scores = recall_error(None, run_values, None)
    slots = torch.arange(size, device=device).expand(batch, kv_heads, size)
    slot_scores, slot_positions = state.cache_scores, state.cache_positions
    filling = _filling_events(slot_positions, valid, events)
    if filling:
        if tracks_memory:  # nothing has folded while the cache fills: the memory is the call's first
            fill_scores = recall_error(pool_features[:, :, size : size + filling], run_values[:, :, :filling],
                                       memory[:, :, None])  # fmt: skip
        else:
            fill_scores = scores[:, :, :filling]
        slots, slot_scores, slot_positions = _fill(
            slots, slot_scores, slot_positions, fill_scores, run_positions[:, :filling], valid[:, :filling], size
        )
    if events > filling:
        candidates = None if tracks_memory else scores[:, :, filling:events]
        entered, folds, slots, slot_scores, slot_positions = _evictions(
            slots, slot_scores, slot_positions, candidates, memory, pool_features, pool_values, run_positions,
            valid, filling, events,
        )  # fmt: skip
    big = size + length + 1
    run = torch.arange(length, device=device)
    entered_at = torch.zeros(batch, kv_heads, length, dtype=torch.bool, device=device)
    fold = torch.full((batch, kv_heads, length), -1, dtype=torch.long, device=device)
    entered_at[:, :, :filling] = valid[:, None, :filling]
    if events > filling:
        entered_at[:, :, filling:events] = entered
        fold[:, :, filling:events] = folds
    old = torch.where(state.cache_positions >= 0, -1, big)
    enter = torch.cat([old, torch.where(entered_at, run, big)], dim=-1)
    leave = torch.full((batch, kv_heads, size + length + 1), big, dtype=torch.long, device=device)
    leave.scatter_(-1, torch.where(fold >= 0, fold, size + length), run.expand(batch, kv_heads, length).clone())
    return Schedule(enter, leave[..., :-1], fold, slots, slot_scores, slot_positions)


def _evictions(
    slots: torch.Tensor,
    slot_scores: torch.Tensor,
    slot_positions: torch.Tensor,
    candidates: torch.Tensor | None,
    memory: torch.Tensor | None,
    pool_features: torch.Tensor | None,
    pool_values: torch.Tensor,
    run_positions: torch.Tensor,
    valid: torch.Tensor,
    first: int,
    events: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``schedule``'s events ``first … events − 1`` in order, from the slots ``[B, Hkv, K]`` after the fill:
    ``(entered, folded [B, Hkv, U], slots, scores, positions)``. ``candidates [B, Hkv, U]`` are the events'
    scores, or None for recall errors against ``memory`` as it folds (``pool_features`` then give the pool's φ_k).

    A long chain of tiny steps, so each step issues few ops and allocates little: the loop runs flat over rows
    and kv heads (``R = B·Hkv``) on what is laid out per event before it (whether it is an eviction, its
    position, its candidate's φ_k and value); the slots are written in place, one scatter per field, a candidate
    that stays out writing into a spare last column that is never read; the far memory folds in place from the
    pool, whose extra zero entry stands for "nothing folded"; and once every slot of every row is filled the rule
    skips counting them."""
    batch, kv_heads, size = slots.shape
    count, rows = events - first, batch * kv_heads

    def spared(field: torch.Tensor) -> torch.Tensor:  # [R, K + 1]
        return torch.cat([field, field[..., :1]], dim=-1).flatten(0, 1)

    slots_all, scores_all, positions_all = spared(slots), spared(slot_scores), spared(slot_positions)
    slot_ids, kept_scores, kept_positions = slots_all[:, :size], scores_all[:, :size], positions_all[:, :size]
    per_row = valid[:, first:events].repeat_interleave(kv_heads, dim=0)  # (R, U)
    evicted = per_row.t()
    at = run_positions[:, first:events].repeat_interleave(kv_heads, dim=0).t()[..., None]  # (U, R, 1)
    live = per_row.any(dim=0).tolist()
    # each eviction of a row with a free slot fills one, so every row is full from the event on where its
    # earlier evictions number at least its free slots
    free = (kept_positions < 0).sum(dim=-1)
    before = per_row.long().cumsum(dim=1) - per_row.long()
    all_full = (before >= free[:, None]).all(dim=0)
    full_from = int(all_full.long().argmax()) if bool(all_full.any()) else count
    nothing = -1
    if candidates is None:
        folding = memory.flatten(0, 1).clone()  # (R, F, Dv + 1)
        features = pool_features.flatten(0, 1)
        values = with_ones(pool_values).flatten(0, 1)
        nothing = features.shape[1]
        features = torch.cat([features, features.new_zeros(rows, 1, features.shape[-1])], dim=1)
        values = torch.cat([values, values.new_zeros(rows, 1, values.shape[-1])], dim=1)
        run_features = features[:, size + first : size + events].transpose(0, 1)  # (U, R, F)
        run_values = pool_values[:, :, size + first : size + events].flatten(0, 1).transpose(0, 1)  # (U, R, Dv)
        row = torch.arange(rows, device=slots.device)
    else:
        scores = candidates.flatten(0, 1).t().to(scores_all.dtype)  # (U, R)
    no_entry = torch.zeros(rows, dtype=torch.bool, device=slots.device)
    no_fold = torch.full((rows,), -1, dtype=torch.long, device=slots.device)
    entered, folds = [], []
    with on_calling_thread(slots.device.type == "cpu"):  # thousands of tiny steps
        for u in range(count):
            if not live[u]:
                entered.append(no_entry)
                folds.append(no_fold)
                continue
            ok, entry = evicted[u], size + first + u
            candidate = scores[u] if candidates is not None else recall_error(run_features[u], run_values[u], folding)
            enters, slot, full = admission(candidate, ok, kept_scores, kept_positions, all_full=u >= full_from)
            leaving = torch.where(enters, slot_ids.gather(1, slot[:, None])[:, 0], entry)
            folded = torch.where(ok & full, leaving, nothing)
            target = torch.where(enters, slot, size)[:, None]
            slots_all.scatter_(1, target, entry)
            scores_all.scatter_(1, target, candidate[:, None])
            positions_all.scatter_(1, target, at[u])
            entered.append(enters)
            folds.append(folded)
            if candidates is None:
                folding.baddbmm_(features[row, folded][:, :, None], values[row, folded][:, None, :])
    folded = torch.stack(folds, dim=-1)
    if nothing >= 0:
        folded = folded.masked_fill(folded == nothing, -1)

    def shaped(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, kv_heads, -1)

    return shaped(torch.stack(entered, dim=-1)), shaped(folded), *map(shaped, (slot_ids, kept_scores, kept_positions))


def _filling_events(slot_positions: torch.Tensor, valid: torch.Tensor, events: int) -> int:
    """How many of a call's first ``events`` evictions find a free slot in every row (or are no evictions there).
    Such an eviction enters the next free slot, displaces nothing and folds nothing (``admission``), so those
    events need no loop: ``_fill`` places them at once, and the far memory is unchanged throughout them."""
    free = (slot_positions < 0).sum(dim=-1).min(dim=-1).values  # (B,): the fewest free slots of a row's heads
    arrivals = valid[:, :events].long().cumsum(dim=1)
    overflow = (valid[:, :events] & (arrivals > free[:, None])).any(dim=0)
    return int(overflow.long().argmax()) if bool(overflow.any()) else events


def _fill(
    slots: torch.Tensor,
    slot_scores: torch.Tensor,
    slot_positions: torch.Tensor,
    scores: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slots after events ``0 … U − 1`` that all find a free slot (``_filling_events``): each row's evictions
    take the free slots in order. ``scores [B, Hkv, U]`` are theirs, ``positions``/``valid [B, U]`` the run
    entries' positions and which are evictions; pool entry ``size + u`` is event ``u``'s token."""
    batch, kv_heads, _ = slots.shape
    count = positions.shape[1]
    filled = (slot_positions >= 0).sum(dim=-1)  # (B, Hkv)
    order = valid.long().cumsum(dim=1) - 1
    target = torch.where(valid[:, None], filled[..., None] + order[:, None], size)  # ``size``: a slot dropped after

    def placed(current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        spare = current.new_zeros(batch, kv_heads, 1)
        return torch.cat([current, spare], dim=-1).scatter(-1, target, new)[..., :size]

    entries = size + torch.arange(count, device=slots.device).expand(batch, kv_heads, count)
    return (
        placed(slots, entries),
        placed(slot_scores, scores.to(slot_scores.dtype)),
        placed(slot_positions, positions[:, None].expand(batch, kv_heads, count)),
    )


def admission(
    candidate: torch.Tensor,
    ok: torch.Tensor,
    slot_scores: torch.Tensor,
    slot_positions: torch.Tensor,
    all_full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | bool]:
    """The rule of one eviction, per row and kv head: ``(enters, target slot, full)`` for a ``candidate`` score
    (``ok``: an evicted token) against the slots' scores and positions (−1: empty). While a slot is free the
    candidate enters the first one (slots fill in order and never empty); once full it must beat the smallest
    score strictly, and replaces that entry (of equal smallest scores, the oldest token's). ``all_full``: the
    caller knows that every slot is filled (``full`` is then True)."""
    lowest = slot_scores.min(dim=-1).values
    ties = slot_scores == lowest[..., None]
    lowest_slot = torch.where(ties, slot_positions, torch.iinfo(torch.long).max).argmin(dim=-1)
    if all_full:
        return ok & (candidate > lowest), lowest_slot, True
    size = slot_scores.shape[-1]
    filled = (slot_positions >= 0).sum(dim=-1)
    full = filled >= size
    enters = ok & (~full | (candidate > lowest))
    return enters, torch.where(full, lowest_slot, filled.clamp(max=size - 1)), full


def _cache_readout(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Schedule, query_index: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ [B, H, T, 1], o [B, H, T, Dv])``: the log-normaliser (−inf where nothing is cached) and the output of
    the softmax over the pool entries each query ``q`` (at schedule index ``query_index [B, T]``) finds in the
    cache, in blocks of ``QUERY_BLOCK`` queries over the columns a block can see: the pool entries (old slots and
    run entries) in the cache at some time the block spans, in some row and kv head — not the old cache's empty
    slots, nor entries gone before the block (a prefill from an empty state has only run entries to read)."""
    batch, num_heads, length, key_dim = q.shape
    kv_heads = keys.shape[1]
    repeats = num_heads // kv_heads
    query = q.view(batch, kv_heads, repeats, length, key_dim)
    lse_parts, out_parts = [], []
    for start in range(0, length, QUERY_BLOCK):
        index = query_index[:, start : start + QUERY_BLOCK]
        first, last = int(index.min()), int(index.max())
        # the pool entries some query of the block may see (in the cache at some time between its first and last)
        seen_here = (plan.enter < last) & (plan.leave >= first)
        columns = seen_here.flatten(0, 1).any(dim=0).nonzero()[:, 0]
        at = index[:, None, :, None]
        seen = (plan.enter[..., None, columns] < at) & (at <= plan.leave[..., None, columns])  # (B, Hkv, T', C)
        block = query[:, :, :, start : start + QUERY_BLOCK]
        scores = (block @ keys[:, :, None, columns].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~seen[:, :, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        anything = seen.any(dim=-1)[:, :, None, :, None]
        weights = torch.exp(scores - torch.where(anything, lse, 0.0))
        out_parts.append(weights @ values[:, :, None, columns])
        lse_parts.append(torch.where(anything, lse, float("-inf")))
    lse = torch.cat(lse_parts, dim=3).reshape(batch, num_heads, length, 1)
    return lse, torch.cat(out_parts, dim=3).reshape(batch, num_heads, length, values.shape[-1])


def _joined(cache_part: tuple[torch.Tensor, torch.Tensor], memory: MemoryColumn | None) -> MemoryColumn:
    """The window's one extra column: the cache's softmax and the far memory's column merged (log-sum-exp of the
    logits, the values mixed by their shares). A query with neither (nothing evicted yet) gets a zero column,
    which the window masks."""
    lse, out = cache_part
    if memory is not None:
        total = torch.logaddexp(lse, memory.logit)
        out = torch.exp(lse - total).nan_to_num(0.0) * out + torch.exp(memory.logit - total) * memory.value
        return MemoryColumn(total, out)
    empty = torch.isinf(lse)
    return MemoryColumn(lse.masked_fill(empty, 0.0), out.masked_fill(empty, 0.0))


@dataclass(frozen=True)
class _Call:
    """One call's pool (the old cache, then the run), its schedule and the fields of the state after it."""

    keys: torch.Tensor
    values: torch.Tensor
    features: torch.Tensor | None
    plan: Schedule

    def after(self, state: WindowWithCache) -> dict[str, torch.Tensor | None]:
        """The cache's fields after the call's events, and the far memory with their folds."""
        plan = self.plan
        fields = {
            "cache_keys": _slots(self.keys, plan.slots),
            "cache_values": _slots(self.values, plan.slots),
            "cache_scores": plan.scores,
            "cache_positions": plan.positions,
        }
        if state.far_memory is not None:
            keys, values = self.folded()
            fields["far_memory"] = state.far_memory + keys.transpose(-1, -2) @ values
        return fields

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(φ_k, [v, 1])`` of the token folded at each event, zero where none is: the far memory's run."""
        taken = (self.plan.fold >= 0)[..., None]
        index = self.plan.fold.clamp(min=0)[..., None]
        features = self.features.gather(2, index.expand(-1, -1, -1, self.features.shape[-1])) * taken
        values = with_ones(self.values.gather(2, index.expand(-1, -1, -1, self.values.shape[-1]))) * taken
        return features, values


def _slots(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return pool.gather(2, slots[..., None].expand(-1, -1, -1, pool.shape[-1]))


def _call(
    state: WindowWithCache,
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    count: torch.Tensor,
    length: int,
    events: int,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
) -> _Call:
    """The pool and schedule of a call whose run is the ring followed by ``keys``/``values`` (each row's real
    tokens first), cut to ``length`` entries, of which the first ``count [B]`` are this row's evictions."""
    run_keys = torch.cat([state.keys, keys], dim=2)[:, :, :length]
    run_values = torch.cat([state.values, values], dim=2)[:, :, :length]
    run = torch.arange(length, device=keys.device)
    run_positions = position[:, None] - (window.size - 1) + run
    valid = (run_positions >= window.sinks) & (run[None, :] < count[:, None])
    pool_keys = torch.cat([state.cache_keys, run_keys], dim=2)
    pool_values = torch.cat([state.cache_values, run_values], dim=2)
    features = None if memory is None else memory.key_features(pool_keys)
    if state.far_memory is not None and features is None:
        raise ValueError("a state with a far memory needs the memory's parameters")
    plan = schedule(state, features, pool_values, run_positions, valid, events, cache)
    return _Call(pool_keys, pool_values, features, plan)


def _column(
    q: torch.Tensor, state: WindowWithCache, call: _Call, position: torch.Tensor, query_index: torch.Tensor,
    window: SoftmaxWindow, memory: FarMemory | None, memory_readout,
) -> MemoryColumn:  # fmt: skip
    """The cache's and the far memory's column for queries ``q`` at ``position[b] + query_index[b, i]``."""
    cache_part = _cache_readout(q, call.keys, call.values, call.plan, query_index, window.scale)
    far = None
    if memory is not None:
        keys, values = call.folded()
        readout = memory_readout(memory.query_features(q), keys, values, state.far_memory)
        far = memory_column(readout, memory.log_bias(position[:, None] + query_index, window))
    return _joined(cache_part, far)


def sparse_cache_extend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowWithCache,
    position: torch.Tensor,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
    token_mask: torch.Tensor | None = None,
) -> tuple[MemoryColumn, dict[str, torch.Tensor | None]]:
    """``(column, fields after)`` for ``T`` new tokens (padding allowed) on rows at ``position [B]``: the window's
    extra column (the cache and the far memory) in the input's column order, and the cache's and far memory's
    fields of the state after them (the window's own fields are the window's to advance)."""
    length = q.shape[2]
    if length == 0:
        return MemoryColumn(q.new_zeros(*q.shape[:3], 1), q.new_zeros(*q.shape[:3], v.shape[-1])), {}
    (real_q, real_k, real_v), count = real_tokens_first(token_mask, position, q, k, v)
    call = _call(state, position, real_k, real_v, count, length, length, window, cache, memory)
    query_index = torch.arange(length, device=q.device).expand(q.shape[0], length)
    column = _column(real_q, state, call, position, query_index, window, memory, run_readout)
    if token_mask is not None:
        column = column.map(lambda x: gather_tokens(x, input_columns(token_mask)))
    return column, call.after(state)


def sparse_cache_reads(
    q: torch.Tensor,
    state: WindowWithCache,
    position: torch.Tensor,
    window: SoftmaxWindow,
    memory: FarMemory | None,
) -> tuple[ExactColumns, MemoryColumn | None]:
    """What one query per row (decode, ``position [B]``) reads past its window: the cache's entries as they are,
    as exact columns of the window's own softmax (``window_step``; empty slots masked), and the far memory's
    column. The ring's oldest token is still in the query's window, so its eviction (``sparse_cache_event``)
    comes after the read."""
    far = None if memory is None else step_column(q, state.far_memory, position, window, memory)
    return ExactColumns(state.cache_keys, state.cache_values, state.cache_positions < 0), far


def sparse_cache_event(
    state: WindowWithCache,
    k: torch.Tensor,
    v: torch.Tensor,
    position: torch.Tensor,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
    in_place: bool = False,
) -> dict[str, torch.Tensor | None]:
    """The cache's and far memory's fields after a decode step at ``position [B]``: the ring's oldest token (at
    ``position − W + 1``; the new token ``k``, ``v`` itself when ``W = 1`` and the ring is empty) leaves the
    window, ``schedule``'s rule for one event, applied in place of a replay. Only the target slot of each row
    and kv head changes (its old content is written back where nothing enters): one scatter per field.

    ``in_place``: write into ``state``'s own tensors (a slot per row and kv head, and the far memory's fold)
    instead of new copies of them: a step then moves a few hundred bytes per kv head instead of the whole cache.
    Only for a state nothing else reads again (a cache's, advanced by its owner, with autograd off), and only
    after ``sparse_cache_reads``'s columns have been read."""
    at = position - (window.size - 1)  # (B,)
    valid = (at >= window.sinks)[:, None]  # (B, 1): an evicted token, not a sink or an empty ring slot
    ring_keys, ring_values = (state.keys, state.values) if state.keys.shape[2] else (k, v)
    key, value = ring_keys[:, :, :1], ring_values[:, :, :1]  # (B, Hkv, 1, D)
    features = None if memory is None else memory.key_features(key)
    if state.far_memory is not None and features is None:
        raise ValueError("a state with a far memory needs the memory's parameters")
    kv_heads = key.shape[1]
    if cache.policy == "recency":
        candidate = at[:, None].expand(-1, kv_heads).to(value.dtype)
    elif cache.policy == "random":
        candidate = random_scores(at[:, None], kv_heads, value.dtype)[..., 0]
    else:
        candidate = recall_error(None if features is None else features[:, :, 0], value[:, :, 0], state.far_memory)
    enters, target, full = admission(candidate, valid, state.cache_scores, state.cache_positions)
    slot = target[..., None]  # (B, Hkv, 1)
    inside = enters[..., None]

    def written(field: torch.Tensor, entry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(field with entry in each row's target slot where it enters, the slot's content before)``."""
        index = slot if field.dim() == 3 else slot[..., None].expand(-1, -1, -1, field.shape[-1])
        before = field.gather(2, index)
        into = field if in_place else field.clone()
        return into.scatter_(
            2, index, torch.where(inside if field.dim() == 3 else inside[..., None], entry, before)
        ), before

    cache_keys, old_key = written(state.cache_keys, key)
    cache_values, old_value = written(state.cache_values, value)
    fields = {
        "cache_keys": cache_keys,
        "cache_values": cache_values,
        "cache_scores": written(state.cache_scores, candidate[..., None])[0],
        "cache_positions": written(state.cache_positions, at[:, None, None].expand(-1, kv_heads, 1))[0],
    }
    if state.far_memory is not None:
        displaced = inside[..., None]
        leaving_key = torch.where(displaced, old_key, key)  # the displaced entry, or the candidate that stayed out
        leaving_value = torch.where(displaced, old_value, value)
        fold = memory.key_features(leaving_key).transpose(-1, -2) @ with_ones(leaving_value)
        fold = fold * (valid & full)[..., None, None]
        fields["far_memory"] = state.far_memory.add_(fold) if in_place else state.far_memory + fold
    return fields


def sparse_cache_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
    empty: WindowWithCache,
) -> MemoryColumn | None:
    """The column for a whole sequence from position 0 (``empty``: the state before any token); None when no
    query reads one (the sequence never evicts a token)."""
    if k.shape[2] <= window.size + window.sinks:
        return None
    start = torch.zeros(k.shape[0], dtype=torch.long, device=k.device)
    return sparse_cache_extend(q, k, v, empty, start, window, cache, memory)[0]


def _indexed_readout(
    features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, initial: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``[B, H, N, Dv + 1]``: query ``i`` reads ``initial`` plus the run's entries ``u < index[b, i]``."""
    batch, num_heads, nodes, width = features.shape
    kv_heads = keys.shape[1]
    read = torch.arange(keys.shape[2], device=keys.device)[None, None, :] < index[:, :, None]  # (B, N, L)
    query = features.view(batch, kv_heads, num_heads // kv_heads, nodes, width)
    scores = (query @ keys[:, :, None].transpose(-1, -2)).masked_fill(~read[:, None, None], 0.0)
    readout = scores @ values[:, :, None] + query @ initial[:, :, None]
    return readout.reshape(batch, num_heads, nodes, -1)


def sparse_cache_verify(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WindowWithCache,
    position: torch.Tensor,
    layout: TreeLayout,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
) -> MemoryColumn:
    """The column of every node of a candidate tree against a state that does not change: a node at depth ``d``
    reads the cache and memory after the ring's first ``d`` evictions (the same for every node at that depth).
    Trees as deep as the window would evict their own nodes, each path differently: refused."""
    depth = layout.depth
    deepest = int(depth.max()) if depth.numel() else 0
    if deepest >= window.size:
        raise LinspecError(
            f"a sparse cache verifies trees shallower than the window ({window.size} tokens); this tree is "
            f"{deepest + 1} levels deep"
        )
    ring = window.size - 1
    none = torch.zeros_like(position)
    call = _call(state, position, k[:, :, :0], v[:, :, :0], none + ring, ring, deepest, window, cache, memory)
    return _column(q, state, call, position, depth, window, memory, lambda f, key, val, init: _indexed_readout(
        f, key, val, init, depth))  # fmt: skip


def sparse_cache_commit(
    state: WindowWithCache,
    position: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
    token_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """The cache's and far memory's fields after appending already-computed raw keys and values at ``position
    [B]`` (the commit of accepted drafts): the evictions they cause, in order."""
    if token_mask is None:
        token_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    token_mask = token_mask.bool()
    real_k, real_v = real_first(k, token_mask), real_first(v, token_mask)
    length = k.shape[2]
    call = _call(state, position, real_k, real_v, token_mask.sum(dim=1), length, length, window, cache, memory)
    return call.after(state)


def sparse_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: SoftmaxWindow,
    cache: SparseCache,
    memory: FarMemory | None,
    sink_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The window with its sparse cache (and far memory) over a whole sequence from position 0, from the
    definition: the schedule replayed token by token as Python lists per row and kv head (scores from explicit
    sums over the tokens folded so far), then every pair's logit materialised — the window's, a cached token's
    ``q·k/√d``, a folded token's ``log(e^b φ_qᵀφ_k)`` — and one softmax per row. The spec every mode is tested
    against."""

    batch, num_heads, length, _ = q.shape
    kv_heads = k.shape[1]
    cached = torch.zeros(batch, kv_heads, length, length, dtype=torch.bool)
    folded = torch.zeros_like(cached)
    for b in range(batch):
        for g in range(kv_heads):
            entries: list[tuple[float, int]] = []  # (score, position): min() picks the oldest of equal scores
            gone: list[int] = []
            for t in range(length):
                j = t - window.size
                if j >= window.sinks:
                    score = _reference_score(k[b, g], v[b, g], j, gone, g, kv_heads, cache.policy, memory)
                    if len(entries) < cache.size:
                        entries.append((score, j))
                    elif score > min(entries)[0]:
                        gone.append(min(entries)[1])
                        entries.remove(min(entries))
                        entries.append((score, j))
                    else:
                        gone.append(j)
                cached[b, g, t, [j for _, j in entries]] = True
                folded[b, g, t, gone] = True
    repeats = num_heads // kv_heads
    cached, folded = (x.repeat_interleave(repeats, dim=1).to(q.device) for x in (cached, folded))
    t = torch.arange(length, device=q.device)
    causal = t[None, :] <= t[:, None]
    outside = t[:, None] - t[None, :] >= window.size
    visible = causal & (~outside | (t[None, :] < window.sinks))
    keys, values = (x.repeat_interleave(repeats, dim=1) for x in (k, v))
    scores = q @ keys.transpose(-1, -2)
    if sink_q is not None:
        far = visible & outside & (t[:, None] > window.last_true_position)
        scores = torch.where(far, sink_q @ keys.transpose(-1, -2), scores)
    logits = (scores * window.scale).masked_fill(~(visible | cached), float("-inf"))
    if memory is not None:
        logits = torch.where(folded, torch.log(memory_weights(q, k, memory, t[None], window)), logits)
    return torch.softmax(logits, dim=-1) @ values


def _reference_score(keys, values, j, gone, kv_head, kv_heads, policy, memory) -> float:
    """``e_j`` of token ``j`` (``keys``/``values [T, D]`` of one kv head) with the tokens ``gone`` folded."""
    if policy == "recency":
        return float(j)
    if policy == "random":
        return float(random_scores(torch.tensor([[j]]), kv_heads, values.dtype)[0, kv_head, 0])
    if memory is None or not gone:
        return float(values[j].square().sum())
    key_map = None if memory.key_map is None else memory.key_map[kv_head : kv_head + 1]
    features = spiky_features(keys[None, None], key_map)[0, 0]
    total = sum(features[i][:, None] * torch.cat([values[i], values.new_ones(1)])[None, :] for i in gone)
    readout = features[j] @ total
    return float((values[j] - readout[:-1] / readout[-1]).square().sum())
