"""One-token decode on the recurrent state: constant work and memory per token, whatever the context length."""

from __future__ import annotations

import torch

from linspec.ops.kernel_fn import local_similarity
from linspec.ops.state import LinearAttentionState


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    local_kernel: str = "relu2",
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
    slots = torch.arange(group_size, device=q.device)
    is_new = (slots[None, :] == slot[:, None])[:, None, :, None]  # (B, 1, G, 1)
    keys = torch.where(is_new, k, state.group_keys)  # (B, Hkv, G, Dk)
    values = torch.where(is_new, v, state.group_values)  # (B, Hkv, G, Dv)
    visible = (slots[None, :] <= slot[:, None])[:, None, None, :]  # (B, 1, 1, G)

    qr = q.view(batch, kv_heads, repeats, key_dim)  # (B, Hkv, R, Dk)
    scores = torch.einsum("bkrd,bkgd->bkrg", qr, keys)
    local = torch.einsum("bkrg,bkge->bkre", local_similarity(scores, local_kernel) * visible, values)
    global_term = torch.einsum("bkrd,bkde->bkre", qr, state.kv)
    window = torch.cat([state.ring, v], dim=2)  # (B, Hkv, P, Dv), oldest first, the new value last
    taps = conv_weight.shape[1]
    filters = conv_weight.flip(-1).view(kv_heads, repeats, taps).to(v.dtype)  # filters[..., p] = w[P-1-p]
    conv = torch.einsum("krp,bkpe->bkre", filters, window)
    out = (local + global_scale * global_term + conv).reshape(batch, num_heads, 1, value_dim)

    group_kv = state.group_kv + k.transpose(-1, -2) @ v  # (B, Hkv, Dk, Dv)
    finished = (slot == group_size - 1).view(batch, 1, 1, 1)
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
    new_state = LinearAttentionState(
        kv=torch.where(finished, state.kv + group_kv, state.kv),
        group_kv=torch.where(finished, zero, group_kv),
        group_keys=torch.where(finished, zero, keys),
        group_values=torch.where(finished, zero, values),
        ring=window[:, :, 1:],
        position=state.position + 1,
    )
    return out, new_state
