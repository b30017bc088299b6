"""Masked depthwise conv over V in Triton: ``out[b, h, t] = Σ_j w[h, j] · v[b, h // R, t - j]`` with history.

Twin of ``linspec.ops.conv.causal_depthwise_conv`` (same signature, differentiable in ``v``, ``conv_weight`` and
``history``). Each tile of BT outputs is a sum of small Toeplitz matmuls, one per window of BT earlier positions:
``M_c[i, s] = w[c·BT + i − s]`` — tensor-core work instead of P shifted multiply-adds. The chunked kernel fuses
the same Toeplitz into its local term; this module also owns the weight-gradient kernel both use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_inputs, dot_precision, total

TIME_BLOCK = 64


@triton.jit
def load_values(v, hist, i_bkv, o_s, o_v, T, P, V: tl.constexpr, HAS_HISTORY: tl.constexpr):
    """``[BT, BV]`` values at positions ``o_s``; negative positions read the history ring (zero without one)."""
    m_v = o_v < V
    m_s = (o_s >= 0) & (o_s < T)
    b_v = tl.load(v + i_bkv * T * V + o_s[:, None] * V + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
    if HAS_HISTORY:
        o_r = o_s + P - 1  # row of the ring, oldest first
        m_r = (o_s < 0) & (o_r >= 0)
        p_h = hist + i_bkv * (P - 1) * V + o_r[:, None] * V + o_v[None, :]
        b_v += tl.load(p_h, mask=m_r[:, None] & m_v[None, :], other=0.0)
    return b_v


@triton.jit
def conv_fwd_kernel(
    v,
    hist,
    w,
    o,
    T,
    H,
    R,
    P,
    NC,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_h = i_bh % H
    i_bkv = (i_bh // H) * (H // R) + i_h // R
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    o_v = i_v * BV + tl.arange(0, BV)
    b_o = tl.full([BT, BV], 0.0, dtype=tl.float32)
    for i_c in range(NC + 1):
        # window i_c tiles back: output i meets source s at lag i_c*BT + i - s
        lag = i_c * BT + o_i[:, None] - o_i[None, :]
        b_w = tl.load(w + i_h * P + lag, mask=(lag >= 0) & (lag < P), other=0.0)  # [BT, BT]
        b_v = load_values(v, hist, i_bkv, o_t - i_c * BT, o_v, T, P, V, HAS_HISTORY)  # [BT, BV]
        b_o += tl.dot(b_w.to(b_v.dtype), b_v, input_precision=PRECISION)
    m_o = (o_t < T)[:, None] & (o_v < V)[None, :]
    tl.store(o + i_bh * T * V + o_t[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_o)


@triton.jit
def conv_bwd_dv_kernel(
    do,
    w,
    dv,
    dhist,
    T,
    H,
    R,
    P,
    NC,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The transposed conv, summed over the R query heads of a kv head; with history, tiles start at −(P−1)."""
    i_v, i_t, i_bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    kv_heads = H // R
    i_b, i_kvh = i_bkv // kv_heads, i_bkv % kv_heads
    o_i = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_p = i_t * BT - (P - 1) + o_i if HAS_HISTORY else i_t * BT + o_i  # target positions (ring's included)
    b_dv = tl.full([BT, BV], 0.0, dtype=tl.float32)
    for i_r in range(R):
        i_h = i_kvh * R + i_r
        i_bh = i_b * H + i_h
        for i_c in range(NC + 1):
            o_u = o_p + i_c * BT  # the window of output gradients that target s can reach
            lag = i_c * BT + o_i[None, :] - o_i[:, None]  # [s, i]
            b_w = tl.load(w + i_h * P + lag, mask=(lag >= 0) & (lag < P), other=0.0)  # [BT, BT]
            m_u = (o_u >= 0) & (o_u < T)
            p_do = do + i_bh * T * V + o_u[:, None] * V + o_v[None, :]
            b_do = tl.load(p_do, mask=m_u[:, None] & m_v[None, :], other=0.0)  # [BT, BV]
            b_dv += tl.dot(b_w.to(b_do.dtype), b_do, input_precision=PRECISION)
    m_p = (o_p >= 0) & (o_p < T)
    tl.store(dv + i_bkv * T * V + o_p[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_p[:, None])
    if HAS_HISTORY:
        o_r = o_p + P - 1
        m_r = (o_p < 0) & (o_r >= 0)
        p_dh = dhist + i_bkv * (P - 1) * V + o_r[:, None] * V + o_v[None, :]
        tl.store(p_dh, b_dv.to(dhist.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])


@triton.jit
def conv_bwd_dw_kernel(
    do,
    v,
    hist,
    dw,
    T,
    H,
    R,
    P,
    NT,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    BP: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
):
    """Partial ``dw[h, j] = Σ_t ⟨do[h, t], v[t − j]⟩`` over one time tile, one row per (b, h, tile)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    i_bkv = (i_bh // H) * (H // R) + i_h // R
    o_t = i_t * BT + tl.arange(0, BT)
    o_j = tl.arange(0, BP)
    b_dw = tl.full([BP], 0.0, dtype=tl.float32)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        p_do = do + i_bh * T * V + o_t[:, None] * V + o_v[None, :]
        b_do = tl.load(p_do, mask=(o_t < T)[:, None] & (o_v < V)[None, :], other=0.0).to(tl.float32)  # [BT, BV]
        for j in range(P):
            b_v = load_values(v, hist, i_bkv, o_t - j, o_v, T, P, V, HAS_HISTORY).to(tl.float32)
            b_dw += tl.where(o_j == j, total(total(b_do * b_v, 1), 0), 0.0)
    tl.store(dw + (i_bh * NT + i_t) * P + o_j, b_dw, mask=o_j < P)


def conv_weight_grad(do: torch.Tensor, v: torch.Tensor, history: torch.Tensor | None, taps: int) -> torch.Tensor:
    """``[H, P]`` gradient of the conv weight in fp32 (callers cast to the weight's dtype)."""
    batch, num_heads, length, value_dim = do.shape
    repeats = num_heads // v.shape[1]
    block_t = max(16, min(TIME_BLOCK, triton.next_power_of_2(length)))
    num_tiles = triton.cdiv(length, block_t)
    partial = torch.empty(batch, num_heads, num_tiles, taps, dtype=torch.float32, device=do.device)
    conv_bwd_dw_kernel[(num_tiles, batch * num_heads)](
        do,
        v,
        v if history is None else history,
        partial,
        length,
        num_heads,
        repeats,
        taps,
        num_tiles,
        V=value_dim,
        BT=block_t,
        BV=min(64, max(16, triton.next_power_of_2(value_dim))),
        BP=triton.next_power_of_2(taps),
        HAS_HISTORY=history is not None,
    )
    return partial.sum(dim=(0, 2))


class CausalConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: torch.Tensor, conv_weight: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        batch, kv_heads, length, value_dim = v.shape
        num_heads, taps = conv_weight.shape
        block_t = max(16, min(TIME_BLOCK, triton.next_power_of_2(length)))
        block_v = max(16, min(64, triton.next_power_of_2(value_dim)))
        out = torch.empty(batch, num_heads, length, value_dim, dtype=v.dtype, device=v.device)
        grid = (triton.cdiv(value_dim, block_v), triton.cdiv(length, block_t), batch * num_heads)
        conv_fwd_kernel[grid](
            v,
            v if history is None else history,
            conv_weight,
            out,
            length,
            num_heads,
            num_heads // kv_heads,
            taps,
            triton.cdiv(taps - 1, block_t),
            V=value_dim,
            BT=block_t,
            BV=block_v,
            HAS_HISTORY=history is not None,
            PRECISION=dot_precision(v.dtype),
        )
        ctx.save_for_backward(v, conv_weight, history)
        ctx.blocks = (block_t, block_v)
        return out

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        v, conv_weight, history = ctx.saved_tensors
        block_t, block_v = ctx.blocks
        do = do.contiguous()
        batch, kv_heads, length, value_dim = v.shape
        num_heads, taps = conv_weight.shape
        dv = torch.empty_like(v)
        dhistory = None if history is None else torch.empty_like(history)
        targets = length + (0 if history is None else taps - 1)
        grid = (triton.cdiv(value_dim, block_v), triton.cdiv(targets, block_t), batch * kv_heads)
        conv_bwd_dv_kernel[grid](
            do,
            conv_weight,
            dv,
            dv if dhistory is None else dhistory,
            length,
            num_heads,
            num_heads // kv_heads,
            taps,
            triton.cdiv(taps - 1, block_t),
            V=value_dim,
            BT=block_t,
            BV=block_v,
            HAS_HISTORY=history is not None,
            PRECISION=dot_precision(v.dtype),
        )
        dw = conv_weight_grad(do, v, history, taps).to(conv_weight.dtype)
        return dv, dw, dhistory


def causal_depthwise_conv(
    v: torch.Tensor, conv_weight: torch.Tensor, history: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of ``linspec.ops.conv.causal_depthwise_conv``: ``v [B, Hkv, T, Dv]`` → ``[B, H, T, Dv]``."""
    check_inputs(v, conv_weight)
    batch, _, length, value_dim = v.shape
    if length == 0:
        return v.new_empty(batch, conv_weight.shape[0], 0, value_dim)
    history = None if history is None else history.contiguous()
    return CausalConvFunction.apply(v.contiguous(), conv_weight.contiguous(), history)
