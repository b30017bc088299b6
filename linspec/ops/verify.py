"""Verify mode: all candidate tokens of a speculative tree in one pass, each seeing only its own ancestry.

Node ``a`` sits at true position ``position + depth(a)``. It sees S, the committed part of the current group and
its own ancestors (never a sibling), with groups assigned by true position — exactly, also where a path crosses
a group boundary. The depthwise conv is unfolded along each node's ancestor path and continues into the
committed ring (an (N × P) gather, img2col style); convolving the flattened node order would mix branches.
The state is only read: committing accepted nodes is ``append_tokens`` with their ``(k̂, v)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from linspec.ops.kernel_fn import local_similarity
from linspec.ops.memory import GlobalMemory, augmented, decay_power, is_plain, normalise
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


@dataclass
class TreeLayout:
    """A verification tree's structure, computed once per tree and shared by every layer that verifies it.

    Every linear layer of a model verifies the same tree in the same forward; building the ancestor matrix
    (a sequential walk over the nodes) and the conv gather index in each of them cost more than the layer's
    own attention math on CPU. ``conv_index(taps)`` is built on first use and kept.
    """

    parents: torch.Tensor  # (B, N)
    ancestors: torch.Tensor  # (B, N, N) bool, ancestor-or-self
    depth: torch.Tensor  # (B, N)
    _conv_index: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, parents: torch.Tensor) -> TreeLayout:
        return cls(parents, *tree_ancestors(parents))

    def conv_index(self, taps: int) -> torch.Tensor:
        """``conv_gather_index(parents, taps)``, memoised."""
        if taps not in self._conv_index:
            self._conv_index[taps] = conv_gather_index(self.parents, taps)
        return self._conv_index[taps]


def _memory_global(
    memory: GlobalMemory,
    state_readout: torch.Tensor,
    buffer_readout: torch.Tensor,
    node_global_scores: torch.Tensor,
    v: torch.Tensor,
    group: torch.Tensor,
    committed_group: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """The decayed/normalised global term ``(B, Hkv, R, N, Dv)`` of every node (``group [B, N]``).

    A node in group ``g`` reads S folded ``g − c`` more times than the committed group ``c`` (``λ^(g−c)``), the
    committed group's buffer once its path has left it (``λ^(g−c−1)``) and each ancestor ``m`` of an earlier
    group ``λ^(g−1−grp(m))``. ``*_readout`` are ``q̂ᵀ S`` and ``q̂ᵀ ΣkvBuffer`` (``[B, Hkv, R, N, Dv (+1)]``),
    ``node_global_scores`` the q̂·k̂ of ancestors in earlier groups (``[B, Hkv, R, N, N]``, zero elsewhere).
    """
    folds = (group - committed_group)[:, None, None, :, None]  # (B, 1, 1, N, 1): boundaries crossed
    past_group = folds > 0
    state_decay = decay_power(memory, folds)
    buffer_decay = decay_power(memory, (folds - 1).clamp(min=0))
    ancestor_decay = decay_power(memory, (group[:, :, None] - 1 - group[:, None, :]).clamp(min=0)[:, None, None])
    if state_decay is not None:  # (B, Hkv, 1, N, 1), (B, Hkv, 1, N, N)
        state_readout = state_readout * state_decay
        buffer_readout = buffer_readout * buffer_decay
        node_global_scores = node_global_scores * ancestor_decay
    readout = (
        state_readout + buffer_readout * past_group + node_global_scores @ augmented(memory, v).unsqueeze(2)
    )  # (B, Hkv, R, N, Dv (+1))
    return normalise(memory, readout, group[:, None, None, :], group_size)


def verify_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    parents: torch.Tensor | TreeLayout,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """Outputs ``[B, H, N, Dv]`` of every tree node, each equal to sequential decoding along its own path.

    ``parents``: the tree's parent indices ``[B, N]``, or its ``TreeLayout`` when several layers verify it.
    """
    tree = parents if isinstance(parents, TreeLayout) else TreeLayout.of(parents)
    batch, num_heads, num_nodes, key_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    repeats = num_heads // kv_heads
    group_size = state.group_size
    position = state.position[:, None] + tree.depth  # (B, N) true positions
    group = position // group_size
    committed_group = (state.position // group_size)[:, None]  # (B, 1)
    committed_in_group = (state.position % group_size)[:, None]

    # Every term is a weight matrix over value rows times those rows, as plain batched matmuls over the
    # (B, Hkv) heads with the R query heads of a KV head stacked: (B, Hkv, R·N, ·). Small einsums cost
    # more in permutes and copies than in arithmetic at these sizes.
    qr = q.reshape(batch, kv_heads, repeats * num_nodes, key_dim)

    def per_node(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, R·N, M) -> (B, Hkv, R, N, M)
        return x.view(batch, kv_heads, repeats, num_nodes, x.shape[-1])

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, R, N, M) -> (B, Hkv, R·N, M)
        return x.reshape(batch, kv_heads, repeats * num_nodes, x.shape[-1])

    # Tree nodes: local among a node's ancestors in its own group, global (γ) among those in earlier groups.
    node_scores = per_node(qr @ k.transpose(-1, -2))  # (B, Hkv, R, N, N)
    same_group = group[:, :, None] == group[:, None, :]
    before_group = position[:, None, :] < (group * group_size)[:, :, None]
    local_mask = (tree.ancestors & same_group)[:, None, None]
    global_mask = (tree.ancestors & before_group)[:, None, None]
    node_weights = local_similarity(node_scores, local_kernel) * local_mask
    if is_plain(memory):
        node_weights = node_weights + global_scale * (node_scores * global_mask)

    # The committed part of the current group: local for nodes still in it, global once a path has left it.
    slots = torch.arange(group_size, device=q.device)
    in_committed_group = group == committed_group  # (B, N)
    buffer_mask = in_committed_group[:, :, None] & (slots[None, None, :] < committed_in_group[:, :, None])
    buffer_scores = per_node(qr @ state.group_keys.transpose(-1, -2))  # (B, Hkv, R, N, G)
    buffer_weights = local_similarity(buffer_scores, local_kernel) * buffer_mask[:, None, None]
    past_group = (group > committed_group)[:, None, None, :, None]
    if is_plain(memory):
        state_term = per_node(qr @ state.kv) + per_node(qr @ state.group_kv) * past_group  # (B, Hkv, R, N, Dv)
    else:
        state_readout = per_node(qr @ augmented(memory, state.kv, state.key_sum_or_zeros()))
        buffer_readout = per_node(qr @ augmented(memory, state.group_kv, state.group_keys.sum(2)))
        state_term = _memory_global(
            memory, state_readout, buffer_readout, node_scores * global_mask, v, group, committed_group, group_size
        )

    # The depthwise conv along each node's path, as weights over [zero slot; ring (P−1); nodes (N)]: tap j of
    # node n lands on the slot holding its value at t − j (conv_gather_index), summed where slots repeat.
    taps = conv_weight.shape[1]
    index = tree.conv_index(taps)[:, None, None].expand(batch, kv_heads, repeats, num_nodes, taps)
    filters = conv_weight.view(1, kv_heads, repeats, 1, taps).to(v.dtype).expand(index.shape)
    conv_weights = v.new_zeros(batch, kv_heads, repeats, num_nodes, taps + num_nodes).scatter_add_(-1, index, filters)
    node_weights = node_weights + conv_weights[..., taps:]

    out = (
        flat(node_weights) @ v
        + flat(buffer_weights) @ state.group_values
        + flat(conv_weights[..., 1:taps]) @ state.ring
        + flat(global_scale * state_term)
    )
    return out.reshape(batch, num_heads, num_nodes, value_dim)
