"""Chunked form in Triton (training, prefill): forward and backward of the paper preset.

Twins of ``linspec.ops.chunked.chunked_attention`` and ``grouped_terms`` (same signatures and returns). Per head,
with group size G and ``S_g = Σ_{s < g·G} k̂_s v_sᵀ``:

* ``states_fwd``: one program per (kv head, Dk tile, Dv tile) walks the groups in order and stores the exclusive
  cumulative sum ``S_0 .. S_NG`` (``S_NG`` is the state after the last group) in fp32.
* ``output_fwd``: one program per (head, group, Dv tile) forms the G×G scores, κ and the causal mask, adds the
  conv's Toeplitz taps to the same G×G matrix (in-group lags) and to small matmuls over earlier windows, and the
  γ-scaled ``q̂ S_g`` — one read of q, k, v per group, one write of o.
* backward: ``states_bwd`` walks groups in reverse for ``dH_g = γ Σ_{g' > g} Σ_r Q_{r,g'}ᵀ dO_{r,g'}`` and the
  partial sums of dγ; ``dq``, ``dk``, ``dv`` recompute the G×G scores per group (no G×G tensor is stored);
  ``dv`` includes the transposed conv, and ``dw`` reuses the conv module's kernel.

Head dims are tiled by ``BK``/``BV`` (≤ 64), groups padded to a power of two ``BG`` (≥ 16 for ``tl.dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linspec.ops.memory import GlobalMemory

from .capabilities import check_supported
from .conv import conv_weight_grad
from .memory_operands import group_scales, row_log_decay
from .utils import block, check_inputs, dot_precision, total


@triton.jit
def group_scores(
    q, k, i_bh, i_bkv, o_t, m_t, T, K: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr
):
    """``[BG, BG]`` scores ``q̂ k̂ᵀ`` of one group for one query head, accumulated over Dk tiles."""
    b_s = tl.full([BG, BG], 0.0, dtype=tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_qk = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + i_bh * T * K + o_t[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)  # [BG, BK]
        b_k = tl.load(k + i_bkv * T * K + o_t[:, None] * K + o_k[None, :], mask=m_qk, other=0.0)  # [BG, BK]
        b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    return b_s


@triton.jit
def chunk_states_fwd_kernel(
    k,
    v,
    h0,
    decay,
    h,
    T,
    NG,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``S_{g+1} = λ S_g + K_gᵀ V_g`` from ``S_0 = h0`` (λ = 1 without ``HAS_DECAY``), each ``S_g`` stored."""
    i_k, i_v, i_bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_g = tl.arange(0, BG)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]
    b_h = tl.full([BK, BV], 0.0, dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bkv * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    if HAS_DECAY:
        b_decay = tl.load(decay + i_bkv)
    p_h = h + i_bkv * (NG + 1) * K * V
    for i_g in range(NG):
        tl.store(p_h + i_g * K * V + o_h, b_h, mask=m_h)
        o_t = i_g * G + o_g
        m_t = (o_g < G) & (o_t < T)
        b_k = tl.load(k + i_bkv * T * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + i_bkv * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_DECAY:
            b_h = b_h * b_decay
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PRECISION)  # [BK, BV]
    tl.store(p_h + NG * K * V + o_h, b_h, mask=m_h)


@triton.jit
def chunk_output_fwd_kernel(
    q,
    k,
    v,
    h,
    w,
    gamma,
    scale,
    o,
    o_global,
    T,
    NG,
    H,
    R,
    P,
    NC,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RELU2: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``o = local + γ·c_g·global + conv``; with ``SPLIT``, ``o = local`` and ``o_global = c_g·global`` (no conv).
    ``c_g`` (``HAS_SCALE``): the "mean" normaliser of group ``g``; without ``HAS_LOCAL`` the local term is zero."""
    i_v, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_h = i_bh % H
    i_bkv = (i_bh // H) * (H // R) + i_h // R
    o_g = tl.arange(0, BG)
    o_t = i_g * G + o_g
    m_t = (o_g < G) & (o_t < T)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_s = tl.full([BG, BG], 0.0, dtype=tl.float32)
    b_global = tl.full([BG, BV], 0.0, dtype=tl.float32)
    p_h = h + (i_bkv * (NG + 1) + i_g) * K * V
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + i_bh * T * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + i_bkv * T * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
        if HAS_LOCAL:
            b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BG, BG]
        b_global += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PRECISION)  # [BG, BV]
    if HAS_SCALE:
        b_global = b_global * tl.load(scale + i_bkv * NG + i_g)
    if RELU2:
        b_s = tl.maximum(b_s, 0.0)
        b_s = b_s * b_s
    b_a = tl.where(o_g[:, None] >= o_g[None, :], b_s, 0.0)  # [BG, BG]; zero without HAS_LOCAL
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + i_bkv * T * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)  # [BG, BV]
    p_o = o + i_bh * T * V + o_t[:, None] * V + o_v[None, :]
    if SPLIT:
        b_o = tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)
        p_og = o_global + i_bh * T * V + o_t[:, None] * V + o_v[None, :]
        tl.store(p_og, b_global.to(o_global.dtype.element_ty), mask=m_tv)
    else:
        # in-group conv taps share the G×G matrix: conv weight at lag i - s joins κ(q̂_i·k̂_s)
        lag = o_g[:, None] - o_g[None, :]
        b_a += tl.load(w + i_h * P + lag, mask=(lag >= 0) & (lag < P), other=0.0)
        b_o = tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION) + tl.load(gamma).to(tl.float32) * b_global
        for i_c in range(1, NC + 1):
            # window of BG positions i_c tiles before the group; target i meets source s at lag i_c*BG + i - s
            o_s = i_g * G - i_c * BG + o_g
            lag = i_c * BG + o_g[:, None] - o_g[None, :]
            b_w = tl.load(w + i_h * P + lag, mask=(lag < P), other=0.0)  # [BG, BG]
            m_s = (o_s >= 0)[:, None] & m_v[None, :]
            b_vs = tl.load(v + i_bkv * T * V + o_s[:, None] * V + o_v[None, :], mask=m_s, other=0.0)  # [BG, BV]
            b_o += tl.dot(b_w.to(b_vs.dtype), b_vs, input_precision=PRECISION)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_states_bwd_kernel(
    q,
    do,
    h,
    gamma,
    scale,
    decay,
    dh,
    dh0,
    readout,
    ddecay,
    T,
    NG,
    H,
    R,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_DH0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Walks the groups in reverse with ``D_g``, the gradient reaching ``S_g``: ``D_NG = 0``,
    ``D_g = γ c_g P_g + λ D_{g+1}`` where ``P_g = Σ_r Q_{r,g}ᵀ dO_{r,g}``. Stores ``dh[g] = D_{g+1}`` (what
    group g's keys and values receive), ``readout[g] = Σ P_g ⊙ S_g`` per tile (``dγ`` and ``dc_g`` follow
    from it), with ``HAS_DECAY`` the partial ``dλ = Σ_g Σ D_{g+1} ⊙ S_g`` and with ``HAS_DH0`` the initial
    state's gradient ``D_0``."""
    i_k, i_v, i_bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    kv_heads = H // R
    i_b, i_kvh = i_bkv // kv_heads, i_bkv % kv_heads
    o_g = tl.arange(0, BG)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]
    b_gamma = tl.load(gamma).to(tl.float32)
    num_tiles = tl.num_programs(0) * tl.num_programs(1)
    i_tile = i_k * tl.num_programs(1) + i_v
    b_dh = tl.full([BK, BV], 0.0, dtype=tl.float32)
    if HAS_DECAY:
        b_decay = tl.load(decay + i_bkv)
        b_ddecay = tl.full([BK, BV], 0.0, dtype=tl.float32)
    for i_rev in range(NG):
        i_g = NG - 1 - i_rev
        tl.store(dh + (i_bkv * NG + i_g) * K * V + o_h, b_dh, mask=m_h)
        o_t = i_g * G + o_g
        m_t = (o_g < G) & (o_t < T)
        b_p = tl.full([BK, BV], 0.0, dtype=tl.float32)
        for i_r in range(R):
            i_bh = i_b * H + i_kvh * R + i_r
            p_q = q + i_bh * T * K + o_t[:, None] * K + o_k[None, :]
            b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BG, BK]
            p_do = do + i_bh * T * V + o_t[:, None] * V + o_v[None, :]
            b_do = tl.load(p_do, mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BG, BV]
            b_p += tl.dot(tl.trans(b_q), b_do, input_precision=PRECISION)  # [BK, BV]
        b_h = tl.load(h + (i_bkv * (NG + 1) + i_g) * K * V + o_h, mask=m_h, other=0.0)
        tl.store(readout + (i_bkv * NG + i_g) * num_tiles + i_tile, total(total(b_p * b_h, 1), 0))
        b_c = b_gamma
        if HAS_SCALE:
            b_c = b_c * tl.load(scale + i_bkv * NG + i_g)
        if HAS_DECAY:
            b_ddecay += b_dh * b_h
            b_dh = b_dh * b_decay
        b_dh += b_c * b_p
    if HAS_DECAY:
        tl.store(ddecay + i_bkv * num_tiles + i_tile, total(total(b_ddecay, 1), 0))
    if HAS_DH0:
        tl.store(dh0 + i_bkv * K * V + o_h, b_dh, mask=m_h)


@triton.jit
def score_grad(
    q,
    k,
    v,
    do,
    i_bh,
    i_bkv,
    o_t,
    m_t,
    T,
    K: tl.constexpr,
    V: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RELU2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``[BG, BG]`` gradient of the masked scores of one group and head: ``(dO Vᵀ) ⊙ κ'(s)`` below the diagonal."""
    o_g = tl.arange(0, BG)
    b_da = tl.full([BG, BG], 0.0, dtype=tl.float32)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + i_bh * T * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)  # [BG, BV]
        b_v = tl.load(v + i_bkv * T * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)  # [BG, BV]
        b_da += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    if RELU2:
        b_s = group_scores(q, k, i_bh, i_bkv, o_t, m_t, T, K, BG, BK, PRECISION)
        b_da = b_da * 2.0 * tl.maximum(b_s, 0.0)
    return tl.where(o_g[:, None] >= o_g[None, :], b_da, 0.0)


@triton.jit
def chunk_dq_kernel(
    q,
    k,
    v,
    h,
    gamma,
    scale,
    do,
    dq,
    T,
    NG,
    H,
    R,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RELU2: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dq = dS K + γ c_g dO S_gᵀ`` (``dS``: the local scores' gradient, absent without ``HAS_LOCAL``)."""
    i_k, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_h = i_bh % H
    i_bkv = (i_bh // H) * (H // R) + i_h // R
    o_g = tl.arange(0, BG)
    o_t = i_g * G + o_g
    m_t = (o_g < G) & (o_t < T)
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_dq = tl.full([BG, BK], 0.0, dtype=tl.float32)
    p_h = h + (i_bkv * (NG + 1) + i_g) * K * V
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(do + i_bh * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & m_v[None, :], other=0.0)
        b_dq += tl.dot(b_do, tl.trans(b_h).to(b_do.dtype), input_precision=PRECISION)  # [BG, BK]
    b_dq *= tl.load(gamma).to(tl.float32)
    if HAS_SCALE:
        b_dq *= tl.load(scale + i_bkv * NG + i_g)
    if HAS_LOCAL:
        b_ds = score_grad(q, k, v, do, i_bh, i_bkv, o_t, m_t, T, K, V, BG, BK, BV, RELU2, PRECISION)
        b_k = tl.load(k + i_bkv * T * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)  # [BG, BK]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    tl.store(dq + i_bh * T * K + o_t[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)


@triton.jit
def chunk_dk_kernel(
    q,
    k,
    v,
    do,
    dh,
    dk,
    T,
    NG,
    H,
    R,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RELU2: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dk = Σ_r dS_rᵀ Q_r + V dH_gᵀ`` (``dH_g = D_{g+1}``: γ, c and λ are in it already)."""
    i_k, i_g, i_bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    kv_heads = H // R
    i_b, i_kvh = i_bkv // kv_heads, i_bkv % kv_heads
    o_g = tl.arange(0, BG)
    o_t = i_g * G + o_g
    m_t = (o_g < G) & (o_t < T)
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_dk = tl.full([BG, BK], 0.0, dtype=tl.float32)
    if HAS_LOCAL:
        for i_r in range(R):
            i_bh = i_b * H + i_kvh * R + i_r
            b_ds = score_grad(q, k, v, do, i_bh, i_bkv, o_t, m_t, T, K, V, BG, BK, BV, RELU2, PRECISION)
            b_q = tl.load(q + i_bh * T * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)  # [BG, BK]
            b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision=PRECISION)
    p_dh = dh + (i_bkv * NG + i_g) * K * V
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + i_bkv * T * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & m_v[None, :], other=0.0)
        b_dk += tl.dot(b_v, tl.trans(b_dh).to(b_v.dtype), input_precision=PRECISION)  # [BG, BK]
    tl.store(dk + i_bkv * T * K + o_t[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def chunk_dv_kernel(
    q,
    k,
    do,
    dh,
    w,
    dv,
    T,
    NG,
    H,
    R,
    P,
    NC,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RELU2: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dv = Σ_r (A_r + M0_r)ᵀ dO_r + Σ_c M_cᵀ dO_later + K dH_g``: local (``A = 0`` without ``HAS_LOCAL``),
    conv (transposed) and global."""
    i_v, i_g, i_bkv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    kv_heads = H // R
    i_b, i_kvh = i_bkv // kv_heads, i_bkv % kv_heads
    o_g = tl.arange(0, BG)
    o_t = i_g * G + o_g
    m_t = (o_g < G) & (o_t < T)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    lag = o_g[:, None] - o_g[None, :]
    b_dv = tl.full([BG, BV], 0.0, dtype=tl.float32)
    for i_r in range(R):
        i_h = i_kvh * R + i_r
        i_bh = i_b * H + i_h
        if HAS_LOCAL:
            b_s = group_scores(q, k, i_bh, i_bkv, o_t, m_t, T, K, BG, BK, PRECISION)
            if RELU2:
                b_s = tl.maximum(b_s, 0.0)
                b_s = b_s * b_s
            b_a = tl.where(lag >= 0, b_s, 0.0)
        else:
            b_a = tl.full([BG, BG], 0.0, dtype=tl.float32)
        b_a += tl.load(w + i_h * P + lag, mask=(lag >= 0) & (lag < P), other=0.0)  # [BG, BG]
        b_do = tl.load(do + i_bh * T * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)  # [BG, BV]
        b_dv += tl.dot(tl.trans(b_a).to(b_do.dtype), b_do, input_precision=PRECISION)
        for i_c in range(1, NC + 1):
            # output gradients of the window after the group; target s meets row i at lag G + (i_c-1)*BG + i - s
            o_u = i_g * G + G + (i_c - 1) * BG + o_g
            lag_c = G + (i_c - 1) * BG + o_g[None, :] - o_g[:, None]  # [s, i]
            b_w = tl.load(w + i_h * P + lag_c, mask=(lag_c >= 0) & (lag_c < P), other=0.0)  # [BG, BG]
            m_u = (o_u < T)[:, None] & m_v[None, :]
            b_du = tl.load(do + i_bh * T * V + o_u[:, None] * V + o_v[None, :], mask=m_u, other=0.0)  # [BG, BV]
            b_dv += tl.dot(b_w.to(b_du.dtype), b_du, input_precision=PRECISION)
    p_dh = dh + (i_bkv * NG + i_g) * K * V
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + i_bkv * T * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PRECISION)  # [BG, BV]
    tl.store(dv + i_bkv * T * V + o_t[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> dict[str, int]:
    batch, num_heads, length, key_dim = q.shape
    return {
        "B": batch,
        "H": num_heads,
        "Hkv": k.shape[1],
        "R": num_heads // k.shape[1],
        "T": length,
        "K": key_dim,
        "V": v.shape[-1],
        "G": group_size,
        "NG": triton.cdiv(length, group_size),
        "BG": max(16, triton.next_power_of_2(group_size)),
        "BK": block(key_dim),
        "BV": block(v.shape[-1]),
    }


def chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    initial_kv: torch.Tensor | None,
    decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hkv, NG + 1, Dk, Dv]`` fp32: ``S`` before each group (``initial_kv`` included), then after the last.
    ``decay``: λ per (row, kv head), ``[B·Hkv]`` fp32, folded in once per group; None for the plain sum."""
    s = _shapes(k, k, v, group_size)
    states = torch.empty(s["B"], s["Hkv"], s["NG"] + 1, s["K"], s["V"], dtype=torch.float32, device=k.device)
    grid = (triton.cdiv(s["K"], s["BK"]), triton.cdiv(s["V"], s["BV"]), s["B"] * s["Hkv"])
    chunk_states_fwd_kernel[grid](
        k,
        v,
        k if initial_kv is None else initial_kv,
        states if decay is None else decay.detach().contiguous(),
        states,
        s["T"],
        s["NG"],
        K=s["K"],
        V=s["V"],
        G=group_size,
        BG=s["BG"],
        BK=s["BK"],
        BV=s["BV"],
        HAS_H0=initial_kv is not None,
        HAS_DECAY=decay is not None,
        PRECISION=dot_precision(k.dtype),
    )
    return states


def chunk_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: torch.Tensor,
    conv_weight: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    group_size: int,
    local_kernel: str,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(o, None)`` with everything fused, or ``(local, global)`` when ``conv_weight`` is ``None``.
    ``scale``: the "mean" normaliser ``1 / (n_g + eps)`` per (row, kv head, group), ``[B·Hkv, NG]`` fp32."""
    s = _shapes(q, k, v, group_size)
    split = conv_weight is None
    out = torch.empty(s["B"], s["H"], s["T"], s["V"], dtype=v.dtype, device=v.device)
    out_global = torch.empty_like(out) if split else None
    taps = 1 if split else conv_weight.shape[1]
    grid = (triton.cdiv(s["V"], s["BV"]), s["NG"], s["B"] * s["H"])
    chunk_output_fwd_kernel[grid](
        q,
        k,
        v,
        states,
        states if split else conv_weight,
        states if split else global_scale,
        states if scale is None else scale.detach().contiguous(),
        out,
        out_global if split else out,
        s["T"],
        s["NG"],
        s["H"],
        s["R"],
        taps,
        triton.cdiv(taps - 1, s["BG"]),
        K=s["K"],
        V=s["V"],
        G=group_size,
        BG=s["BG"],
        BK=s["BK"],
        BV=s["BV"],
        RELU2=local_kernel == "relu2",
        HAS_LOCAL=local_kernel != "none",
        HAS_SCALE=scale is not None,
        SPLIT=split,
        PRECISION=dot_precision(q.dtype),
    )
    return out, out_global


def chunk_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    states: torch.Tensor,
    do: torch.Tensor,
    group_size: int,
    local_kernel: str,
    decay: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    conv_grad: bool = True,
    initial_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dw, dγ, dλ, dc, dh0)`` of ``chunked_attention`` for the output gradient ``do``; ``dλ``
    (``[B·Hkv]``) and ``dc`` (``[B·Hkv, NG]``) are None where ``decay`` or ``scale`` is, ``dw`` unless
    ``conv_grad``, ``dh0`` (the initial state's, ``[B, Hkv, Dk, Dv]`` fp32) unless ``initial_grad``."""
    s = _shapes(q, k, v, group_size)
    num_k, num_v = triton.cdiv(s["K"], s["BK"]), triton.cdiv(s["V"], s["BV"])
    dims = {"K": s["K"], "V": s["V"], "G": group_size, "BG": s["BG"], "BK": s["BK"], "BV": s["BV"]}
    local = {"RELU2": local_kernel == "relu2", "HAS_LOCAL": local_kernel != "none"}
    precision = dot_precision(q.dtype)
    taps = conv_weight.shape[1]
    rows = s["B"] * s["Hkv"]
    dh = torch.empty(s["B"], s["Hkv"], s["NG"], s["K"], s["V"], dtype=torch.float32, device=q.device)
    readout = torch.empty(rows, s["NG"], num_k * num_v, dtype=torch.float32, device=q.device)
    ddecay = torch.empty(rows, num_k * num_v, dtype=torch.float32, device=q.device) if decay is not None else None
    dh0 = torch.empty(s["B"], s["Hkv"], s["K"], s["V"], dtype=torch.float32, device=q.device) if initial_grad else None
    scale = None if scale is None else scale.detach().contiguous()
    chunk_states_bwd_kernel[(num_k, num_v, rows)](
        q,
        do,
        states,
        global_scale,
        dh if scale is None else scale,
        dh if decay is None else decay.detach().contiguous(),
        dh,
        dh if dh0 is None else dh0,
        readout,
        dh if ddecay is None else ddecay,
        s["T"],
        s["NG"],
        s["H"],
        s["R"],
        **dims,
        HAS_SCALE=scale is not None,
        HAS_DECAY=decay is not None,
        HAS_DH0=initial_grad,
        PRECISION=precision,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    chunk_dq_kernel[(num_k, s["NG"], s["B"] * s["H"])](
        q,
        k,
        v,
        states,
        global_scale,
        dh if scale is None else scale,
        do,
        dq,
        s["T"],
        s["NG"],
        s["H"],
        s["R"],
        **dims,
        **local,
        HAS_SCALE=scale is not None,
        PRECISION=precision,
    )
    chunk_dk_kernel[(num_k, s["NG"], rows)](
        q, k, v, do, dh, dk, s["T"], s["NG"], s["H"], s["R"], **dims, **local, PRECISION=precision
    )
    chunk_dv_kernel[(num_v, s["NG"], rows)](
        q,
        k,
        do,
        dh,
        conv_weight,
        dv,
        s["T"],
        s["NG"],
        s["H"],
        s["R"],
        taps,
        triton.cdiv(taps - 1, s["BG"]),
        **dims,
        **local,
        PRECISION=precision,
    )
    dw = conv_weight_grad(do, v, None, taps) if conv_grad else None
    readout = readout.sum(-1)  # (B·Hkv, NG): Σ P_g ⊙ S_g, the γ-free, c-free readout's gradient
    gamma = global_scale.float()
    dgamma = readout.sum() if scale is None else (readout * scale).sum()
    dscale = None if scale is None else gamma * readout
    return dq, dk, dv, dw, dgamma, None if ddecay is None else ddecay.sum(-1), dscale, dh0


class ChunkedAttentionFunction(torch.autograd.Function):
    """The chunked form with its backward. ``decay`` (λ, ``[B·Hkv]``) and ``scale`` (``1 / (n_g + eps)``,
    ``[B·Hkv, NG]``) are fp32 inputs of their own, so their gradients reach ``log λ`` through PyTorch."""

    @staticmethod
    def forward(ctx, q, k, v, conv_weight, global_scale, decay, scale, group_size: int, local_kernel: str):
        states = chunk_states(k, v, group_size, None, decay)
        out, _ = chunk_output(q, k, v, states, conv_weight, global_scale, group_size, local_kernel, scale)
        ctx.save_for_backward(q, k, v, conv_weight, global_scale, states, decay, scale)
        ctx.group_size, ctx.local_kernel = group_size, local_kernel
        return out

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, conv_weight, global_scale, states, decay, scale = ctx.saved_tensors
        dq, dk, dv, dw, dgamma, ddecay, dscale, _ = chunk_backward(
            q, k, v, conv_weight, global_scale, states, do.contiguous(), ctx.group_size, ctx.local_kernel, decay,
            scale,
        )  # fmt: skip
        dgamma = dgamma.to(global_scale.dtype).reshape(global_scale.shape)
        return dq, dk, dv, dw.to(conv_weight.dtype), dgamma, ddecay, dscale, None, None


def memory_operands(
    memory: GlobalMemory | None, batch: int, kv_heads: int, groups: torch.Tensor, group_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(λ [B·Hkv], 1 / (n_g + eps) [B·Hkv, NG])`` for query groups ``groups [B, NG]`` (None where the memory
    has no decay, or no "mean" normaliser)."""
    log_decay = row_log_decay(memory, batch, kv_heads)
    decay = None if log_decay is None else torch.exp(log_decay)
    return decay, group_scales(memory, groups, group_size, kv_heads)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """Triton twin of ``linspec.ops.chunked.chunked_attention``, differentiable in q, k, v, conv weight, γ and
    the memory's ``log λ``. Memories and local kernels the kernels lack raise, see ``capabilities.missing``."""
    check_supported("chunked_attention", memory, local_kernel)
    global_scale = torch.as_tensor(global_scale, device=q.device)
    check_inputs(q, k, v, conv_weight, global_scale)
    if q.shape[2] == 0:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, kv_heads = q.shape[0], k.shape[1]
    groups = torch.arange(triton.cdiv(q.shape[2], group_size), device=q.device).expand(batch, -1)
    decay, scale = memory_operands(memory, batch, kv_heads, groups, group_size)
    return ChunkedAttentionFunction.apply(
        q, k, v, conv_weight.contiguous(), global_scale, decay, scale, group_size, local_kernel
    )


def grouped_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    initial_kv: torch.Tensor | None = None,
    memory: GlobalMemory | None = None,
    initial_key_sum: torch.Tensor | None = None,
    first_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """Triton twin of ``linspec.ops.chunked.grouped_terms``: ``(local, global, kv_through, None)``.

    ``first_group`` (complete groups before the sequence, per row) sets the "mean" normaliser's count;
    ``initial_key_sum`` serves the "key" norm only, which the kernels refuse, so no memory here keeps z. Forward
    only: it serves prefill and commits on a recurrent state (``extend_attention``), which run without gradients;
    a call that must record a graph raises (the dispatch sends those to PyTorch).
    """
    log_decay = None if memory is None else memory.log_decay
    check_supported("grouped_terms", memory, local_kernel, q, k, v, initial_kv, log_decay)
    check_inputs(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    initial_kv = None if initial_kv is None else initial_kv.contiguous()
    batch, kv_heads = q.shape[0], k.shape[1]
    groups = torch.arange(triton.cdiv(q.shape[2], group_size), device=q.device).expand(batch, -1)
    if first_group is not None:
        groups = groups + first_group.view(batch, 1)
    decay, scale = memory_operands(memory, batch, kv_heads, groups, group_size)
    states = chunk_states(k, v, group_size, initial_kv, decay)
    if q.shape[2] == 0:
        local = q.new_empty(*q.shape[:3], v.shape[-1])
        return local, local.clone(), states[:, :, 1:].to(v.dtype), None
    local, global_term = chunk_output(q, k, v, states, None, None, group_size, local_kernel, scale)
    return local, global_term, states[:, :, 1:].to(v.dtype), None
