"""Verify mode: all candidate tokens of a speculative tree in one pass, each seeing only its own ancestry.

Node ``a`` sits at true position ``position + depth(a)``. It sees S, the committed part of the current group and
its own ancestors (never a sibling), with groups assigned by true position — exactly, also where a path crosses
a group boundary. The depthwise conv is unfolded along each node's ancestor path and continues into the
committed ring (an (N × P) gather, img2col style); convolving the flattened node order would mix branches.
The state is only read: committing accepted nodes is ``append_tokens`` with their ``(k̂, v)``.
"""

from __future__ import annotations

import torch

from linspec.ops.backend import use_triton
from linspec.ops.kernel_fn import local_similarity
from linspec.ops.state import LinearAttentionState


def tree_ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ancestor_or_self [B, N, N] bool, depth [B, N])`` for parent indices ``[B, N]``.

    ``parents[b, i]`` is ``-1`` for a node that follows the committed context, else an index ``< i``
    (nodes are in topological order; a chain is ``parents = [-1, 0, 1, ...]``).
    """
    batch, num_nodes = parents.shape
    eye = torch.eye(num_nodes, dtype=torch.bool, device=parents.device)
    ancestors = eye.expand(batch, num_nodes, num_nodes).clone()
    depth = torch.zeros(batch, num_nodes, dtype=torch.long, device=parents.device)
    rows = torch.arange(batch, device=parents.device)
    for node in range(num_nodes):
        parent = parents[:, node]
        has_parent = parent >= 0
        safe = parent.clamp(min=0)
        ancestors[:, node] |= ancestors[rows, safe] & has_parent[:, None]
        depth[:, node] = torch.where(has_parent, depth[rows, safe] + 1, 0)
    return ancestors, depth


def validate_parents(parents: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every parent index is -1 or points to an earlier node."""
    index = torch.arange(parents.shape[1], device=parents.device)
    if bool(((parents < -1) | (parents >= index)).any()):
        raise ValueError("tree parents must be -1 or the index of an earlier node (topological order)")


def conv_gather_index(parents: torch.Tensor, taps: int) -> torch.Tensor:
    """``[B, N, P]`` indices into ``[0 ; ring (P−1) ; node values (N)]``: column ``j`` is node's value at ``t − j``.

    Walks up the ancestor path; past the root it continues through the ring, newest first, then into the
    zero slot (positions before the sequence start).
    """
    batch, num_nodes = parents.shape
    ring_len = taps - 1
    device = parents.device
    # previous[x]: index of the value one step earlier than combined slot x.
    ring_previous = torch.arange(ring_len, device=device)  # slot 1+r -> r (slot 0 is zero; 0 -> 0)
    node_previous = torch.where(parents >= 0, 1 + ring_len + parents, ring_len)  # root's predecessor: newest ring
    previous = torch.cat(
        [torch.zeros(batch, 1, dtype=torch.long, device=device), ring_previous.expand(batch, ring_len), node_previous],
        dim=1,
    )  # (B, 1 + P-1 + N)
    current = (1 + ring_len + torch.arange(num_nodes, device=device)).expand(batch, num_nodes)
    columns = [current]
    for _ in range(1, taps):
        current = previous.gather(1, current)
        columns.append(current)
    return torch.stack(columns, dim=-1)


def verify_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    parents: torch.Tensor,
    local_kernel: str = "relu2",
) -> torch.Tensor:
    """Outputs ``[B, H, N, Dv]`` of every tree node, each equal to sequential decoding along its own path."""
    if use_triton(q):
        from linspec.kernels import verify_attention as triton_verify_attention

        return triton_verify_attention(q, k, v, conv_weight, global_scale, state, parents, local_kernel)
    batch, num_heads, num_nodes, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    repeats = num_heads // kv_heads
    group_size = state.group_size
    ancestors, depth = tree_ancestors(parents)
    position = state.position[:, None] + depth  # (B, N) true positions
    group = position // group_size
    committed_group = (state.position // group_size)[:, None]  # (B, 1)
    committed_in_group = (state.position % group_size)[:, None]

    qr = q.view(batch, kv_heads, repeats, num_nodes, key_dim)  # (B, Hkv, R, N, Dk)
    node_scores = torch.einsum("bkrnd,bkmd->bkrnm", qr, k)  # (B, Hkv, R, N, N)
    same_group = group[:, :, None] == group[:, None, :]
    before_group = position[:, None, :] < (group * group_size)[:, :, None]
    local_mask = (ancestors & same_group)[:, None, None]
    global_mask = (ancestors & before_group)[:, None, None]
    local = torch.einsum("bkrnm,bkme->bkrne", local_similarity(node_scores, local_kernel) * local_mask, v)
    global_term = torch.einsum("bkrnm,bkme->bkrne", node_scores * global_mask, v)

    # The committed part of the current group: local for nodes still in it, global once a path has left it.
    slots = torch.arange(group_size, device=q.device)
    in_committed_group = group == committed_group  # (B, N)
    buffer_scores = torch.einsum("bkrnd,bkgd->bkrng", qr, state.group_keys)
    buffer_mask = in_committed_group[:, :, None] & (slots[None, None, :] < committed_in_group[:, :, None])
    local = local + torch.einsum(
        "bkrng,bkge->bkrne",
        local_similarity(buffer_scores, local_kernel) * buffer_mask[:, None, None],
        state.group_values,
    )
    past_group = (group > committed_group)[:, None, None, :, None]
    global_term = global_term + torch.einsum("bkrnd,bkde->bkrne", qr, state.group_kv) * past_group
    global_term = global_term + torch.einsum("bkrnd,bkde->bkrne", qr, state.kv)

    taps = conv_weight.shape[1]
    combined = torch.cat([v.new_zeros(batch, kv_heads, 1, value_dim), state.ring, v], dim=2)
    index = conv_gather_index(parents, taps)  # (B, N, P)
    unfolded = combined.gather(
        2, index.view(batch, 1, num_nodes * taps, 1).expand(batch, kv_heads, num_nodes * taps, value_dim)
    ).view(batch, kv_heads, num_nodes, taps, value_dim)  # (B, Hkv, N, P, Dv): column j = value at t - j
    filters = conv_weight.view(kv_heads, repeats, taps).to(v.dtype)
    conv = torch.einsum("krp,bknpe->bkrne", filters, unfolded)

    out = local + global_scale * global_term + conv
    return out.reshape(batch, num_heads, num_nodes, value_dim)
