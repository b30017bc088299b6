"""Drafters that walk a recurrent state down each path of the tree: EAGLE (features) and ReDrafter (an RNN).

State of a path: ``s_0 = h`` (the target's hidden state that predicted the root), ``s_d = cell(s_{d-1},
x_d)`` after its ``d``-th token (``x_1`` is the root), logits of depth ``d`` from ``s_d``. Drafting keeps every
node's state, so growing a level costs one cell step per frontier node — no re-reading of the tree. The tree is
``TreeGrowingDrafter``'s: greedy, the ``tree_width`` best paths by cumulative draft log-probability (a beam
search whose beams share prefixes — a dynamic tree expanded where the drafter is confident); sampling, root
children without replacement, each continued as a sampled chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linspec.drafting.base import TrainedDrafter, depth_loss
from linspec.speculative.drafters import Draft, DraftRequest, TreeGrowingDrafter
from linspec.speculative.tree import DraftTree


class RecurrentDraftModule(TrainedDrafter):
    """A module with ``cell(state [.., H], token [..]) -> state`` whose ``vocab(state)`` gives draft logits."""

    feature_loss_weight: float = 0.0  # EAGLE: also regress each state onto the target's true hidden state

    def cell(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, hidden, inputs, labels, future_hidden):
        """Unrolled over the trained depth along the text, each step from the drafter's own previous state — as
        at generation (the tokens are the text's; the states are not)."""
        state, parts, regression = hidden, [], hidden.new_zeros(())
        for depth in range(1, self.max_depth + 1):
            token = inputs[:, depth - 1]
            state = self.cell(state, token.clamp(min=0))
            parts.append(depth_loss(self.vocab(state), self.vocab.labels(labels[:, depth - 1])))
            if self.feature_loss_weight:
                real = (token >= 0)[:, None]
                error = torch.nn.functional.smooth_l1_loss(state, future_hidden[:, depth - 1], reduction="none")
                regression = regression + (error * real).sum() / self.hidden_size
        total, hits, counted = (torch.stack(x) for x in zip(*parts, strict=True))
        return (total.sum() + self.feature_loss_weight * regression) / counted.sum().clamp(min=1), hits, counted

    def drafter(
        self, num_tokens: int | None = None, tree_width: int = 1, min_confidence: float = 0.0
    ) -> RecurrentDrafter:
        return RecurrentDrafter(self, self.check_depth(num_tokens), tree_width, min_confidence)


@dataclass
class RecurrentRound:
    """A round's states ``[B, 1 + N, H]`` so far: the root's first, then node ``n``'s at ``1 + n``."""

    states: torch.Tensor | None = None


class RecurrentDrafter(TreeGrowingDrafter):
    """Grows the tree from per-node recurrent states; reads only ``request.target_hidden`` and the root."""

    def __init__(
        self, module: RecurrentDraftModule, num_tokens: int, tree_width: int = 1, min_confidence: float = 0.0
    ) -> None:
        super().__init__(num_tokens, tree_width, min_confidence)
        self.module = module

    def start(self, target, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        if target.vocab_size != self.module.vocab.full_size:
            raise ValueError(
                f"the drafter's vocabulary ({self.module.vocab.full_size}) differs from the target's "
                f"({target.vocab_size})"
            )

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> Draft:
        if request.target_hidden is None:  # a one-token prompt's first round: nothing to start from
            return Draft(DraftTree.empty(request.lengths.shape[0], request.sequences.device))
        return super().propose(request)

    def _begin_round(self, request: DraftRequest) -> RecurrentRound:
        return RecurrentRound()

    def _frontier_logits(self, request, tree, frontier, level, state: RecurrentRound) -> torch.Tensor:
        """States of the frontier (the root, then the last level's nodes, in order), appended to the round's."""
        if level == 0:
            root = request.sequences.gather(1, (request.lengths - 1)[:, None])  # (B, 1)
            states = self.module.cell(request.target_hidden[:, None], root)  # (B, 1, H)
            state.states = states
        else:
            newest = tree.parents[:, -frontier.shape[1] :]  # (B, F) the frontier is the last level's nodes
            index = (newest + 1)[:, :, None].expand(-1, -1, state.states.shape[-1])  # root's state at 0
            states = self.module.cell(state.states.gather(1, index), tree.tokens[:, -frontier.shape[1] :])
            state.states = torch.cat([state.states, states], 1)
        return self.module.vocab.to_full(self.module.vocab(states))  # (B, F, V)
