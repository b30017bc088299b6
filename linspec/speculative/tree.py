"""Draft trees: what a drafter proposes, how several chains merge into one tree, and the children table.

A chain is the tree whose parents are ``[-1, 0, 1, ...]``. Nodes are in topological order (a parent comes before
its children), siblings in the order they were drafted — the order acceptance tests them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from linspec.models.runner import TreePass


@dataclass
class DraftTree:
    """Candidate tokens proposed after each row's pending token (the *root*: last committed, not yet verified).

    ``q[b, n]`` is the distribution node ``n`` was drawn from, given its earlier siblings (sampling without
    replacement removes them); ``None`` means every node is a point mass (prompt lookup, greedy drafting).
    ``target_pass, target_hidden = (layer, h [B, 1 + N, H])``: the target's own layers ``[0, layer)`` already
    ran on ``[root; nodes]`` in that open verification pass of the target, so verification continues from there.
    """

    tokens: torch.Tensor  # (B, N) long
    parents: torch.Tensor  # (B, N) long: -1 = child of the root, else an earlier node
    valid: torch.Tensor  # (B, N) bool: padding nodes are never accepted and parent no valid node
    q: torch.Tensor | None = None  # (B, N, V) float or None (point masses)
    target_pass: TreePass | None = field(default=None, repr=False)
    target_hidden: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def empty(cls, batch: int, device: torch.device | str | None = None) -> DraftTree:
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(tokens=none, parents=none, valid=none.bool())

    def depths(self) -> torch.Tensor:
        """``[B, N]`` depth of each node below the root (children of the root: 1)."""
        depth = torch.zeros_like(self.tokens)
        for node in range(self.num_nodes):
            parent = self.parents[:, node]
            depth[:, node] = torch.where(parent >= 0, depth.gather(1, parent.clamp(min=0)[:, None])[:, 0] + 1, 1)
        return depth

    def with_root(self, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, parents, valid)`` of ``[root; nodes]``, shape ``[B, 1 + N]``: the target's verification tree."""
        tokens = torch.cat([root[:, None], self.tokens], dim=1)
        parents = torch.cat([torch.full_like(root[:, None], -1), self.parents + 1], dim=1)
        valid = torch.cat([torch.ones_like(root[:, None], dtype=torch.bool), self.valid], dim=1)
        return tokens, parents, valid


def merge_chains(
    chains: Sequence[Sequence[Sequence[int]]], device: torch.device | str | None = None, pad: int = 0
) -> DraftTree:
    """One tree per row from that row's chains, shared prefixes merged (a trie); first-seen order of siblings."""
    rows: list[tuple[list[int], list[int]]] = []
    for row_chains in chains:
        tokens: list[int] = []
        parents: list[int] = []
        child_of: dict[tuple[int, int], int] = {}
        for chain in row_chains:
            parent = -1
            for token in chain:
                key = (parent, int(token))
                if key not in child_of:
                    child_of[key] = len(tokens)
                    tokens.append(int(token))
                    parents.append(parent)
                parent = child_of[key]
        rows.append((tokens, parents))
    width = max((len(t) for t, _ in rows), default=0)
    batch = len(rows)
    tokens = torch.full((batch, width), pad, dtype=torch.long)
    parents = torch.full((batch, width), -1, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b, (row_tokens, row_parents) in enumerate(rows):
        tokens[b, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        parents[b, : len(row_parents)] = torch.tensor(row_parents, dtype=torch.long)
        valid[b, : len(row_tokens)] = True
    return DraftTree(tokens.to(device), parents.to(device), valid.to(device))


def children_table(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, N, K]``: the valid children of each node in sibling order, ``-1`` past the last one.

    ``parents`` index the same node list (``-1`` for roots, which are nobody's child here).
    """
    batch, num_nodes = parents.shape
    index = torch.arange(num_nodes, device=parents.device)
    is_child = valid & (parents >= 0)
    earlier = index[None, :] < index[:, None]  # (N, N): [n, m] = m before n
    same_parent = parents[:, :, None] == parents[:, None, :]
    rank = (same_parent & earlier & is_child[:, None, :]).sum(-1)  # (B, N) index among its siblings
    width = int(rank[is_child].max()) + 1 if bool(is_child.any()) else 1
    slot = torch.where(is_child, parents * width + rank, num_nodes * width)  # the last slot is a dump
    table = torch.full((batch, num_nodes * width + 1), -1, dtype=torch.long, device=parents.device)
    table = table.scatter(1, slot, index.expand(batch, num_nodes).clone())
    return table[:, :-1].view(batch, num_nodes, width)
