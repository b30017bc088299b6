"""Verify pass in Triton: every node of a speculative tree, each seeing only its own ancestry.

Twin of ``linspec.ops.verify.verify_attention``. One program per (row, head, Dv tile) holds the whole tree
(N ≤ a few hundred nodes) as one tile. Node weights combine three N×N matrices that all multiply the node values:
κ(q̂·k̂) on ancestors in the same group, γ·(q̂·k̂) on ancestors in earlier groups, and the conv unfolded along
the ancestor path — ``W[a, m] = w[depth(a) − depth(m)]`` for each ancestor ``m`` within P − 1 steps, which is
the img2col gather of the reference written as a matmul. Taps reaching past the root read the committed ring
(``w[depth(a) + P − 1 − r]`` for ring row ``r``). Groups follow each node's true position, exactly. A decayed
memory weighs each memory read by λ to the number of folds since it was written (``linspec.ops.verify``'s
``_memory_global``), and the "mean" normaliser scales each node's memory terms by its group's ``1 / (n_g + eps)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linspec.ops.memory import GlobalMemory
from linspec.ops.state import LinearAttentionState

from .capabilities import check_supported
from .memory_operands import group_scales, row_log_decay
from .utils import block, check_inputs, dot_precision, full_block


@triton.jit
def verify_kernel(
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
    ancestors,
    depth,
    log_decay,
    scale,
    o,
    N,
    H,
    R,
    P,
    K: tl.constexpr,
    V: tl.constexpr,
    G: tl.constexpr,
    BN: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    RELU2: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_bkv = i_b * (H // R) + i_h // R
    o_n = tl.arange(0, BN)
    o_g = tl.arange(0, BG)
    o_v = i_v * BV + tl.arange(0, BV)
    m_n, m_g, m_v = o_n < N, o_g < G, o_v < V

    b_start = tl.load(position + i_b)  # committed length
    b_depth = tl.load(depth + i_b * N + o_n, mask=m_n, other=0)  # [BN]
    b_pos = b_start + b_depth
    b_grp = b_pos // G
    m_nn = m_n[:, None] & m_n[None, :]
    b_anc = tl.load(ancestors + i_b * N * N + o_n[:, None] * N + o_n[None, :], mask=m_nn, other=0) != 0  # [BN, BN]
    same_group = b_grp[:, None] == b_grp[None, :]
    before_group = b_pos[None, :] < (b_grp * G)[:, None]

    b_s = tl.full([BN, BN], 0.0, dtype=tl.float32)
    b_bs = tl.full([BN, BG], 0.0, dtype=tl.float32)
    b_global = tl.full([BN, BV], 0.0, dtype=tl.float32)
    b_past = tl.full([BN, BV], 0.0, dtype=tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + i_bh * N * K + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_kn = tl.load(k + i_bkv * N * K + o_n[:, None] * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        p_gk = group_keys + i_bkv * G * K + o_g[:, None] * K + o_k[None, :]
        b_gk = tl.load(p_gk, mask=m_g[:, None] & m_k[None, :], other=0.0).to(b_q.dtype)  # [BG, BK]
        o_h = i_bkv * K * V + o_k[:, None] * V + o_v[None, :]
        b_kv = tl.load(kv + o_h, mask=m_k[:, None] & m_v[None, :], other=0.0).to(b_q.dtype)  # [BK, BV]
        b_gkv = tl.load(group_kv + o_h, mask=m_k[:, None] & m_v[None, :], other=0.0).to(b_q.dtype)
        b_s += tl.dot(b_q, tl.trans(b_kn), input_precision=PRECISION)  # [BN, BN]
        if HAS_LOCAL:
            b_bs += tl.dot(b_q, tl.trans(b_gk), input_precision=PRECISION)  # [BN, BG]
        b_global += tl.dot(b_q, b_kv, input_precision=PRECISION)  # [BN, BV]
        b_past += tl.dot(b_q, b_gkv, input_precision=PRECISION)  # [BN, BV]

    # γ per node, times its group's "mean" normaliser 1 / (n_g + eps) where the memory has one
    b_row = tl.full([BN], 1.0, dtype=tl.float32) * tl.load(gamma).to(tl.float32)
    if HAS_SCALE:
        b_row = b_row * tl.load(scale + i_bkv * N + o_n, mask=m_n, other=0.0)
    if RELU2:
        b_ks = tl.maximum(b_s, 0.0)
        b_ks = b_ks * b_ks
        b_kbs = tl.maximum(b_bs, 0.0)
        b_kbs = b_kbs * b_kbs
    else:
        b_ks = b_s
        b_kbs = b_bs
    lag = b_depth[:, None] - b_depth[None, :]
    m_conv = b_anc & (lag < P)
    b_conv = tl.load(w + i_h * P + lag, mask=m_conv, other=0.0).to(tl.float32)  # unfolded conv on the tree
    # ancestors in earlier groups are in the memory: folded grp(a) − 1 − grp(m) times since their group ended
    b_far = tl.where(b_anc & before_group, b_s, 0.0)
    committed_group = b_start // G
    if HAS_DECAY:
        b_log_decay = tl.load(log_decay + i_bkv)
        b_age = tl.maximum(b_grp[:, None] - 1 - b_grp[None, :], 0).to(tl.float32)
        b_far = b_far * tl.exp(b_log_decay * b_age)
    b_nodes = b_row[:, None] * b_far + b_conv
    if HAS_LOCAL:
        b_nodes += tl.where(b_anc & same_group, b_ks, 0.0)
    b_vn = tl.load(v + i_bkv * N * V + o_n[:, None] * V + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.0)
    b_o = tl.dot(b_nodes.to(b_vn.dtype), b_vn, input_precision=PRECISION)  # [BN, BV]

    # committed part of the current group: local while a node is still in that group, global once past it
    if HAS_LOCAL:
        in_committed = b_grp == committed_group
        m_buffer = in_committed[:, None] & (o_g[None, :] < b_start % G)
        p_gv = group_values + i_bkv * G * V + o_g[:, None] * V + o_v[None, :]
        b_gv = tl.load(p_gv, mask=m_g[:, None] & m_v[None, :], other=0.0).to(b_vn.dtype)  # [BG, BV]
        b_o += tl.dot(tl.where(m_buffer, b_kbs, 0.0).to(b_vn.dtype), b_gv, input_precision=PRECISION)
    b_past = tl.where((b_grp > committed_group)[:, None], b_past, 0.0)
    if HAS_DECAY:  # S is folded grp − c more times for a node in group grp, the committed buffer one fewer
        b_folds = (b_grp - committed_group).to(tl.float32)
        b_global = b_global * tl.exp(b_log_decay * b_folds)[:, None]
        b_past = b_past * tl.exp(b_log_decay * tl.maximum(b_folds - 1.0, 0.0))[:, None]
    b_o += b_row[:, None] * (b_global + b_past)

    # conv taps past the root: ring row r (oldest first) sits at lag depth + P - 1 - r
    o_r = tl.arange(0, BR)
    lag_r = b_depth[:, None] + (P - 1) - o_r[None, :]
    m_r = m_n[:, None] & (o_r < P - 1)[None, :] & (lag_r < P)
    b_wr = tl.load(w + i_h * P + lag_r, mask=m_r, other=0.0)  # [BN, BR]
    p_ring = ring + i_bkv * (P - 1) * V + o_r[:, None] * V + o_v[None, :]
    b_ring = tl.load(p_ring, mask=(o_r < P - 1)[:, None] & m_v[None, :], other=0.0).to(b_vn.dtype)  # [BR, BV]
    b_o += tl.dot(b_wr.to(b_vn.dtype), b_ring, input_precision=PRECISION)
    m_nv = m_n[:, None] & m_v[None, :]
    tl.store(o + i_bh * N * V + o_n[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_nv)


def tree_ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``linspec.ops.verify.tree_ancestors`` in ⌈log₂ N⌉ batched matmuls instead of N steps.

    Reachability by repeated squaring of (self + parent edge): after ``i`` squarings every ancestor within
    ``2**i`` steps is found. Depth is the ancestor count minus one. No host sync, so decode loops stay async.
    """
    batch, num_nodes = parents.shape
    edges = torch.zeros(batch, num_nodes, num_nodes + 1, dtype=torch.float32, device=parents.device)
    edges.scatter_(2, torch.where(parents >= 0, parents, num_nodes).unsqueeze(-1), 1.0)
    reach = edges[:, :, :num_nodes] + torch.eye(num_nodes, dtype=torch.float32, device=parents.device)
    for _ in range(max(num_nodes - 1, 1).bit_length()):
        reach = (reach @ reach > 0).float()
    ancestors = reach > 0
    return ancestors, ancestors.sum(dim=-1) - 1


def verify_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    parents: torch.Tensor,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """Triton twin of ``linspec.ops.verify.verify_attention``, ``parents`` as a ``[B, N]`` tensor (forward only: a
    call that records a graph raises; the dispatch sends those to PyTorch)."""
    global_scale = torch.as_tensor(global_scale, device=q.device)
    log_decay = None if memory is None else memory.log_decay
    graph_inputs = (q, k, v, conv_weight, global_scale, log_decay, *state.tensors().values())
    check_supported("verify_attention", memory, local_kernel, *graph_inputs)
    check_inputs(q, k, v, conv_weight, global_scale, state.kv, parents)
    batch, num_heads, num_nodes, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    taps = conv_weight.shape[1]
    out = torch.empty(batch, num_heads, num_nodes, value_dim, dtype=v.dtype, device=v.device)
    if num_nodes == 0:
        return out
    ancestors, depth = tree_ancestors(parents)
    state_in = state.map(torch.Tensor.contiguous)
    block_v = block(value_dim)
    row_decay = row_log_decay(memory, batch, kv_heads)
    node_groups = (state.position[:, None] + depth) // state.group_size  # (B, N): each node's complete groups
    scale = group_scales(memory, node_groups, state.group_size, kv_heads)
    verify_kernel[(triton.cdiv(value_dim, block_v), batch * num_heads)](
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
        ancestors.to(torch.uint8),
        depth.contiguous(),
        out if row_decay is None else row_decay.contiguous(),
        out if scale is None else scale.contiguous(),
        out,
        num_nodes,
        num_heads,
        num_heads // kv_heads,
        taps,
        K=key_dim,
        V=value_dim,
        G=state.group_size,
        BN=full_block(num_nodes),
        BG=full_block(state.group_size),
        BK=block(key_dim),
        BV=block_v,
        BR=full_block(max(taps - 1, 1)),
        RELU2=local_kernel == "relu2",
        HAS_LOCAL=local_kernel != "none",
        HAS_DECAY=row_decay is not None,
        HAS_SCALE=scale is not None,
        PRECISION=dot_precision(q.dtype),
        num_warps=8,  # the N×N and N×G score tiles of the whole tree
    )
    return out
