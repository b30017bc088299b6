"""One-token decode in Triton: the output and the next state in a single launch.

Twin of ``linspec.ops.recurrent.recurrent_step``. One program per (row, kv head, Dv tile) loads that kv head's
state once and serves its R query heads, then writes the new state: the group buffer with the new (k̂, v) in
its slot, the running ``Σ k̂ vᵀ`` (folded into S when the group completes) and the shifted ring. The input state
is only read, so a caller can still branch from it. A decayed memory folds S as ``λ S + ΣkvGroup``; the "mean"
normaliser scales the readout by ``1 / (n_g + eps)`` of the row's group count. Decode is launch-bound, so
fusing beats tiling here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linspec.ops.memory import GlobalMemory
from linspec.ops.state import LinearAttentionState

from .capabilities import check_supported
from .memory_operands import group_scales, row_log_decay
from .utils import block, check_inputs, full_block, total


@triton.jit
def recurrent_step_kernel(
    q,
    k,
    v,
    w,
    gamma,
    kv,
    group_kv,
    group_keys,
    group_values,
    ring,
    position,
    decay,
    scale,
    o,
    kv_out,
    group_kv_out,
    group_keys_out,
    group_values_out,
    ring_out,
    H,
    R,
    P,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BP: tl.constexpr,
    RELU2: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """The output ``local + γ·c·q̂ᵀS + conv`` of each query head and the state after the token; S folds as
    ``λ S + ΣkvGroup`` when the group completes (``c``, ``λ``: the memory's normaliser and decay, 1 without)."""
    i_v, i_bkv = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv_heads = H // R
    i_b, i_kvh = i_bkv // kv_heads, i_bkv % kv_heads
    o_g = tl.arange(0, BG)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_p = tl.arange(0, BP)
    m_g, m_k, m_v = o_g < G, o_k < K, o_v < V
    slot = tl.load(position + i_b) % G
    finished = slot == G - 1

    b_k = tl.load(k + i_bkv * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
    b_v = tl.load(v + i_bkv * V + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
    p_keys = group_keys + i_bkv * G * K + o_g[:, None] * K + o_k[None, :]
    b_keys = tl.load(p_keys, mask=m_g[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # [BG, BK]
    b_keys = tl.where((o_g == slot)[:, None], b_k[None, :], b_keys)
    p_values = group_values + i_bkv * G * V + o_g[:, None] * V + o_v[None, :]
    b_values = tl.load(p_values, mask=m_g[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BG, BV]
    b_values = tl.where((o_g == slot)[:, None], b_v[None, :], b_values)
    o_h = i_bkv * K * V + o_k[:, None] * V + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    b_kv = tl.load(kv + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BK, BV]
    b_group_kv = tl.load(group_kv + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BK, BV]
    # conv window: ring rows 0..P-2 (oldest first), then the new value in row P-1
    p_ring = ring + i_bkv * (P - 1) * V + o_p[:, None] * V + o_v[None, :]
    b_window = tl.load(p_ring, mask=(o_p < P - 1)[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BP, BV]
    b_window = tl.where((o_p == P - 1)[:, None], b_v[None, :], b_window)
    b_gamma = tl.load(gamma).to(tl.float32)
    if HAS_SCALE:
        b_gamma = b_gamma * tl.load(scale + i_bkv)  # γ·c: the normaliser of this row's group count

    for i_r in range(R):
        i_h = i_kvh * R + i_r
        i_bh = i_b * H + i_h
        b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
        b_global = total(b_q[:, None] * b_kv, 0)  # [BV]
        b_w = tl.load(w + i_h * P + (P - 1 - o_p), mask=o_p < P, other=0.0).to(tl.float32)  # [BP], reversed taps
        b_conv = total(b_w[:, None] * b_window, 0)  # [BV]
        b_o = b_gamma * b_global + b_conv
        if HAS_LOCAL:
            b_s = total(b_keys * b_q[None, :], 1)  # [BG]
            if RELU2:
                b_s = tl.maximum(b_s, 0.0)
                b_s = b_s * b_s
            b_s = tl.where(o_g <= slot, b_s, 0.0)
            b_o += total(b_s[:, None] * b_values, 0)  # [BV]
        tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    b_group_kv += b_k[:, None] * b_v[None, :]
    b_folded = b_kv
    if HAS_DECAY:
        b_folded = b_folded * tl.load(decay + i_bkv)
    b_folded += b_group_kv
    tl.store(kv_out + o_h, tl.where(finished, b_folded, b_kv).to(kv_out.dtype.element_ty), mask=m_h)
    b_group_kv = tl.where(finished, 0.0, b_group_kv)
    tl.store(group_kv_out + o_h, b_group_kv.to(group_kv_out.dtype.element_ty), mask=m_h)
    p_values_out = group_values_out + i_bkv * G * V + o_g[:, None] * V + o_v[None, :]
    b_values = tl.where(finished, 0.0, b_values)
    tl.store(p_values_out, b_values.to(group_values_out.dtype.element_ty), mask=m_g[:, None] & m_v[None, :])
    if i_v == 0:
        p_keys_out = group_keys_out + i_bkv * G * K + o_g[:, None] * K + o_k[None, :]
        b_keys = tl.where(finished, 0.0, b_keys)
        tl.store(p_keys_out, b_keys.to(group_keys_out.dtype.element_ty), mask=m_g[:, None] & m_k[None, :])
    p_ring_out = ring_out + i_bkv * (P - 1) * V + (o_p[:, None] - 1) * V + o_v[None, :]
    m_ring = ((o_p >= 1) & (o_p < P))[:, None] & m_v[None, :]
    tl.store(p_ring_out, b_window.to(ring_out.dtype.element_ty), mask=m_ring)


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
    """Triton twin of ``linspec.ops.recurrent.recurrent_step`` (forward only: a call that records a graph raises;
    the dispatch sends those to PyTorch). The memory's λ and "mean" normaliser are per-row scalars computed here."""
    global_scale = torch.as_tensor(global_scale, device=q.device)
    log_decay = None if memory is None else memory.log_decay
    graph_inputs = (q, k, v, conv_weight, global_scale, log_decay, *state.tensors().values())
    check_supported("recurrent_step", memory, local_kernel, *graph_inputs)
    check_inputs(q, k, v, conv_weight, global_scale, state.kv)
    batch, num_heads, _, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    taps = conv_weight.shape[1]
    state_in = state.map(torch.Tensor.contiguous)
    state_out = state_in.map(torch.empty_like)  # contiguous, as the kernel writes it
    out = torch.empty(batch, num_heads, 1, value_dim, dtype=v.dtype, device=v.device)
    block_v = block(value_dim)
    row_decay = row_log_decay(memory, batch, kv_heads)
    row_decay = None if row_decay is None else torch.exp(row_decay)
    scale = group_scales(memory, (state.position // state.group_size).view(batch, 1), state.group_size, kv_heads)
    recurrent_step_kernel[(triton.cdiv(value_dim, block_v), batch * kv_heads)](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        conv_weight.contiguous(),
        global_scale,
        state_in.kv,
        state_in.group_kv,
        state_in.group_keys,
        state_in.group_values,
        state_in.ring,
        state_in.position,
        out if row_decay is None else row_decay.contiguous(),
        out if scale is None else scale.contiguous(),
        out,
        state_out.kv,
        state_out.group_kv,
        state_out.group_keys,
        state_out.group_values,
        state_out.ring,
        num_heads,
        num_heads // kv_heads,
        taps,
        K=key_dim,
        V=value_dim,
        G=state.group_size,
        BG=full_block(state.group_size),
        BK=full_block(key_dim),
        BV=block_v,
        BP=triton.next_power_of_2(taps),
        RELU2=local_kernel == "relu2",
        HAS_LOCAL=local_kernel != "none",
        HAS_DECAY=row_decay is not None,
        HAS_SCALE=scale is not None,
        num_warps=8,  # a kv head's whole state tile sits in registers
    )
    state_out.position = state.position + 1
    return out, state_out
