"""Many tokens on top of a recurrent state, with padding: prefill, continuation, and the commit of accepted drafts.

Rows may sit at different positions and carry padding anywhere (left padding from batched generation, or
rejected candidates). Each row is packed so that it starts at its current group's boundary — the committed
group buffer first, then its real new tokens, right-aligned to nothing — which turns every case into the
plain chunked form with an initial S. Padding is dropped by the packing, so it never reaches S, the group
buffer or the ring.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from linspec.ops.backend import causal_depthwise_conv, grouped_terms
from linspec.ops.memory import GlobalMemory, scan_groups
from linspec.ops.state import LinearAttentionState


def _scatter_tokens(x: torch.Tensor, dest: torch.Tensor, length: int, prefix: torch.Tensor | None = None):
    """Place ``x[:, :, t]`` at ``dest[:, t]`` of a zero ``[B, heads, length, D]`` buffer (``dest == length``: drop).

    ``prefix`` (``[B, heads, P, D]``) fills the first ``P`` positions before the scatter.
    """
    batch, heads, _, dim = x.shape
    out = x.new_zeros(batch, heads, length + 1, dim)
    if prefix is not None:
        out = torch.cat([prefix, out[:, :, prefix.shape[2] :]], dim=2)
    index = dest[:, None, :, None].expand(batch, heads, dest.shape[1], dim)
    return out.scatter(2, index, x)[:, :, :length]


def real_first(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, D]`` with each row's real tokens moved to the front, in order (zeros after them)."""
    length = x.shape[2]
    rank = token_mask.long().cumsum(dim=1) - 1
    return _scatter_tokens(x, torch.where(token_mask, rank, length), length)


def real_tokens_first(
    token_mask: torch.Tensor | None, position: torch.Tensor, *xs: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([x with each row's real tokens first, ...], count [B])`` for ``xs [B, heads, T, ·]`` of rows at ``position
    [B]``: the packing every extend-style op computes on. Without a mask every token is real and nothing moves."""
    if token_mask is None:
        return list(xs), torch.full_like(position, xs[0].shape[2])
    token_mask = token_mask.bool()
    return [real_first(x, token_mask) for x in xs], token_mask.sum(dim=1)


def input_columns(token_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: for each input column, the index of its token among the row's packed real tokens (what
    ``gather_tokens`` takes to put results computed on ``real_first`` tensors back in the input's column order; a
    padding column maps to any real one)."""
    return (token_mask.long().cumsum(dim=1) - 1).clamp(min=0)


# Entries of room a ring written in place keeps after its own (``appended_in_place``): a buffer is re-made every
# this many steps, so a step copies about ``W / RING_ROOM`` entries instead of the whole ring, for ``RING_ROOM``
# more entries of memory per ring.
RING_ROOM = 8


def newest(old: torch.Tensor, real: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The last ``old.shape[2]`` entries of ``[old ; each row's first count real entries]`` (``[B, heads, ·, D]``):
    a fixed-size history (the conv ring, a softmax window) after appending a row's real tokens. Its storage holds
    at most ``RING_ROOM`` entries more than it: a view of the joined entries while a few are appended, else a
    copy, so a state never keeps a long extend's keys alive."""
    keep = old.shape[2]
    if count.numel() and bool((count == count[0]).all()):  # every row appends as many (always at batch 1)
        added = int(count[0])
        if added <= RING_ROOM:
            joined = torch.cat([old, real[:, :, :added]], dim=2)
            return joined[:, :, joined.shape[2] - keep :]
        if added >= keep:
            return real[:, :, added - keep : added].clone(memory_format=torch.contiguous_format)
        return torch.cat([old[:, :, added:], real[:, :, :added]], dim=2)
    return gather_tokens(torch.cat([old, real], dim=2), count[:, None] + torch.arange(keep, device=count.device))


def appended_in_place(ring: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``newest(ring, new, 1)`` for one new entry per row (``new [B, heads, 1, D]``), written into the room after
    ``ring``'s entries in its own buffer when it has some: the result is a view one entry further along, and
    ``ring``'s own entries stay as they were. A ring without room (any tensor but such a view with space left)
    moves into a fresh buffer with ``RING_ROOM`` entries of room. For a ring nothing else appends to: a second
    append to the same ring would overwrite the first one's entry."""
    batch, heads, size, dim = ring.shape
    capacity, start = _ring_buffer(ring)
    if start + size < capacity:
        buffer = ring.as_strided((batch, heads, capacity, dim), ring.stride(), ring.storage_offset() - start * dim)
        buffer[:, :, start + size] = new[:, :, 0]
        return buffer[:, :, start + 1 : start + size + 1]
    buffer = ring.new_empty(batch, heads, size + RING_ROOM, dim)
    buffer[:, :, : size - 1] = ring[:, :, 1:]
    buffer[:, :, size - 1] = new[:, :, 0]
    return buffer[:, :, :size]


def _ring_buffer(ring: torch.Tensor) -> tuple[int, int]:
    """``(capacity, start)`` when ``ring [B, heads, L, D]`` is entries ``start … start + L − 1`` of a contiguous
    ``[B, heads, L + RING_ROOM, D]`` tensor that is its storage's whole content — the buffers
    ``appended_in_place`` makes, the only such views a state's ring can be; ``(0, 0)`` otherwise."""
    batch, heads, size, dim = ring.shape
    stride = ring.stride()
    capacity = size + RING_ROOM
    if size == 0 or dim == 0 or stride[3] != 1 or stride[2] != dim or stride[1] != capacity * dim:
        return 0, 0
    start, rest = divmod(ring.storage_offset(), dim)
    whole = batch * heads * capacity * dim * ring.element_size()
    if stride[0] != heads * stride[1] or rest or start + size > capacity or ring.untyped_storage().nbytes() != whole:
        return 0, 0
    return capacity, start


def gather_tokens(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[:, :, t] = x[:, :, src[:, t]]`` for ``x`` of shape ``[B, heads, L, D]``."""
    batch, heads, _, dim = x.shape
    return x.gather(2, src[:, None, :, None].expand(batch, heads, src.shape[1], dim))


def _layout(state: LinearAttentionState, token_mask: torch.Tensor):
    """Where each real token goes: ``(packed_dest, rank, count, total, packed_length)``; dropped tokens → length."""
    group_size = state.group_size
    committed = state.position % group_size  # (B,) entries already in the current group
    count = token_mask.sum(dim=1)  # (B,)
    rank = token_mask.long().cumsum(dim=1) - 1  # (B, T) index among the row's real tokens
    total = committed + count
    packed_length = (int(total.max()) // group_size + 1) * group_size  # block total // G always exists
    dest = torch.where(token_mask, committed[:, None] + rank, packed_length)
    return dest, rank, count, total, packed_length


def _next_state(
    state: LinearAttentionState,
    packed_k: torch.Tensor,
    packed_v: torch.Tensor,
    kv_through: torch.Tensor,
    real_v: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    block_kv: torch.Tensor | None = None,
    key_sum_through: torch.Tensor | None = None,
) -> LinearAttentionState:
    """``block_kv [B, Hkv, blocks, Dk, Dv]``: each packed block's ``Σ k̂ vᵀ`` when the caller has it (the open
    group's sum is then read from it instead of recomputed). ``key_sum_through [B, Hkv, blocks, Dk]``: z after
    each block, for a memory that keeps z."""
    batch, kv_heads, packed_length, _ = packed_k.shape
    group_size = state.group_size
    complete = total // group_size  # (B,) complete groups in the packed row

    def after_complete_groups(through: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """``through [B, Hkv, blocks, …]`` at the row's last complete group, or ``before`` if it has none."""
        index = (complete - 1).clamp(min=0).view(batch, 1, 1, *([1] * (through.dim() - 3)))
        picked = through.gather(2, index.expand(batch, kv_heads, 1, *through.shape[3:])).squeeze(2)
        return torch.where((complete > 0).view(batch, *([1] * (before.dim() - 1))), picked, before)

    kv = after_complete_groups(kv_through, state.kv)
    key_sum = None if key_sum_through is None else after_complete_groups(key_sum_through, state.key_sum_or_zeros())

    def open_group(packed: torch.Tensor) -> torch.Tensor:  # the block after the complete groups
        blocks = packed.view(batch, kv_heads, packed_length // group_size, group_size, packed.shape[-1])
        index = complete.view(batch, 1, 1, 1, 1).expand(batch, kv_heads, 1, group_size, packed.shape[-1])
        return blocks.gather(2, index).squeeze(2)

    group_keys, group_values = open_group(packed_k), open_group(packed_v)
    if block_kv is None:
        group_kv = group_keys.transpose(-1, -2) @ group_values
    else:
        index = complete.view(batch, 1, 1, 1, 1).expand(batch, kv_heads, 1, *block_kv.shape[3:])
        group_kv = block_kv.gather(2, index).squeeze(2)
    return replace(
        state,
        kv=kv,
        group_kv=group_kv,
        group_keys=group_keys,
        group_values=group_values,
        ring=newest(state.ring, real_v, count),
        position=state.position + count,
        key_sum=key_sum,
    )


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    token_mask: torch.Tensor | None = None,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Outputs for ``T`` new tokens after ``state`` and the state after them; padded tokens output zeros.

    ``token_mask`` (``[B, T]`` bool, True = real token) defaults to all real. Real tokens keep their order.
    """
    batch, _, length, _ = q.shape
    if token_mask is None:
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    token_mask = token_mask.bool()
    dest, rank, count, total, packed_length = _layout(state, token_mask)
    packed_q = _scatter_tokens(q, dest, packed_length)
    packed_k = _scatter_tokens(k, dest, packed_length, prefix=state.group_keys)
    packed_v = _scatter_tokens(v, dest, packed_length, prefix=state.group_values)
    local, global_term, kv_through, key_sum_through = grouped_terms(
        packed_q, packed_k, packed_v, state.group_size, local_kernel, initial_kv=state.kv,
        memory=memory, initial_key_sum=state.key_sum, first_group=state.position // state.group_size,
    )  # fmt: skip
    attention = gather_tokens(local + global_scale * global_term, dest.clamp(max=packed_length - 1))

    real_v = real_first(v, token_mask)  # (B, Hkv, T, Dv), each row's real values first
    conv = gather_tokens(causal_depthwise_conv(real_v, conv_weight, history=state.ring), rank.clamp(min=0))
    out = (attention + conv) * token_mask[:, None, :, None]
    next_state = _next_state(state, packed_k, packed_v, kv_through, real_v, count, total, None, key_sum_through)
    return out, next_state


def append_tokens(
    state: LinearAttentionState,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    memory: GlobalMemory | None = None,
) -> LinearAttentionState:
    """The state after appending already-computed ``(k̂, v)`` — the commit of accepted speculative tokens."""
    batch, _, length, _ = k.shape
    if token_mask is None:
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=k.device)
    token_mask = token_mask.bool()
    dest, _, count, total, packed_length = _layout(state, token_mask)
    packed_k = _scatter_tokens(k, dest, packed_length, prefix=state.group_keys)
    packed_v = _scatter_tokens(v, dest, packed_length, prefix=state.group_values)
    batch, kv_heads, _, key_dim = packed_k.shape
    num_groups = packed_length // state.group_size
    blocks_k = packed_k.view(batch, kv_heads, num_groups, state.group_size, key_dim)
    blocks_v = packed_v.view(batch, kv_heads, num_groups, state.group_size, packed_v.shape[-1])
    block_kv = blocks_k.transpose(-1, -2) @ blocks_v  # (B, Hkv, blocks, Dk, Dv)
    _, kv_through = scan_groups(memory, block_kv, state.kv)
    key_sum_through = None
    if memory is not None and memory.keeps_key_sum:
        _, key_sum_through = scan_groups(memory, blocks_k.sum(3), state.key_sum_or_zeros())  # (B, Hkv, blocks, Dk)
    real_v = real_first(v, token_mask)
    return _next_state(state, packed_k, packed_v, kv_through, real_v, count, total, block_kv, key_sum_through)
