"""One-token decode on the recurrent state in PyTorch: constant work and memory per token, whatever the context
length."""

from __future__ import annotations

from dataclasses import replace

import torch

from linspec.ops.kernel_fn import local_similarity
from linspec.ops.memory import GlobalMemory, augmented, fold, is_plain, normalise
from linspec.ops.state import LinearAttentionState


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Output for one new token per row (``T == 1``) and the state after it. The input state is not mutated.

    Branch-free over rows: each row sits at its own position, and a row whose group completes folds its
    running group sum into S while the others keep theirs.
    """
    batch, num_heads, _, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    repeats = num_heads // kv_heads
    group_size = state.group_size
    slot = state.position % group_size  # (B,)
    slot_index = slot.view(batch, 1, 1, 1)
    keys = state.group_keys.scatter(2, slot_index.expand(batch, kv_heads, 1, key_dim), k)  # (B, Hkv, G, Dk)
    values = state.group_values.scatter(2, slot_index.expand(batch, kv_heads, 1, value_dim), v)

    qr = q.view(batch, kv_heads, repeats, key_dim)  # (B, Hkv, R, Dk)
    if local_kernel == "none":  # the window preset: the local term is the softmax window's, computed elsewhere
        local = 0.0
    else:
        slots = torch.arange(group_size, device=q.device)
        visible = (slots[None, :] <= slot[:, None]).view(batch, 1, 1, group_size)  # (B, 1, 1, G)
        scores = qr @ keys.transpose(-1, -2)  # (B, Hkv, R, G)
        local = (local_similarity(scores, local_kernel) * visible) @ values  # (B, Hkv, R, Dv)
    if is_plain(memory):
        global_term = qr @ state.kv  # (B, Hkv, R, Dv)
    else:
        key_sum = state.key_sum_or_zeros() if memory.keeps_key_sum else None
        readout = qr @ augmented(memory, state.kv, key_sum)  # (B, Hkv, R, Dv (+1))
        global_term = normalise(memory, readout, (state.position // group_size).view(batch, 1, 1), group_size)
    window = torch.cat([state.ring, v], dim=2)  # (B, Hkv, P, Dv), oldest first, the new value last
    taps = conv_weight.shape[1]
    filters = conv_weight.flip(-1).view(kv_heads, repeats, taps).to(v.dtype)  # filters[..., p] = w[P-1-p]
    conv = filters @ window  # (B, Hkv, R, Dv)
    out = (local + global_scale * global_term + conv).reshape(batch, num_heads, 1, value_dim)

    group_kv = state.group_kv + k.transpose(-1, -2) @ v  # (B, Hkv, Dk, Dv)
    kv = state.kv
    key_sum = state.key_sum_or_zeros() if memory is not None and memory.keeps_key_sum else None
    finished = slot == group_size - 1
    # One host check per step is free on CPU and skips four state-sized selects on 63 of 64 steps.
    if bool(finished.any()):
        finished = finished.view(batch, 1, 1, 1)
        zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
        kv = torch.where(finished, fold(memory, kv, group_kv), kv)
        if key_sum is not None:
            key_sum = torch.where(finished[..., 0], fold(memory, key_sum, keys.sum(2)), key_sum)
        group_kv, keys, values = (torch.where(finished, zero, x) for x in (group_kv, keys, values))
    new_state = replace(
        state, kv=kv, group_kv=group_kv, group_keys=keys, group_values=values, ring=window[:, :, 1:],
        position=state.position + 1, key_sum=key_sum,
    )  # fmt: skip
    return out, new_state
