"""Medusa heads (Cai et al. 2024): K residual blocks on the target's last hidden state, each followed by the
target's head (or its reduced-vocabulary copy). Head ``k`` predicts the token ``k + 2`` places after the hidden
state's token — depth ``k + 1`` after the round's root. The tree is the heads' top-k: at each level the
``tree_width`` best paths by the product of the heads' probabilities (``HeadDrafter``).

Blocks start at zero (``h + SiLU(0)``), so an untrained head repeats the target's own prediction; one
matrix-vector product per head and level, plus the (reduced) head — the cheapest drafter, and the least
accurate past depth 2 since no head sees the tokens drafted before it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from linspec.drafting.base import MAX_DEPTH, TrainedDrafter, check_int, depth_loss
from linspec.speculative.drafters import HeadDrafter


class MedusaHeads(TrainedDrafter):
    kind = "medusa"
    SETTINGS: ClassVar[dict] = {"depth": 4, "draft_vocab": None}  # depth: number of heads K

    def __init__(self, target, settings: dict, token_ids: torch.Tensor | None = None) -> None:
        super().__init__(target, settings, token_ids)
        heads = check_int(self.settings, "depth", 1, MAX_DEPTH)
        self.blocks = nn.ModuleList(nn.Linear(self.hidden_size, self.hidden_size) for _ in range(heads))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``h [B, H] -> [B, K, V']``."""
        states = torch.stack([hidden + nn.functional.silu(block(hidden)) for block in self.blocks], 1)  # (B, K, H)
        return self.vocab(states)

    def loss(self, hidden, inputs, labels, future_hidden):
        logits = self.draft_logits(hidden)  # (N, K, V')
        parts = [depth_loss(logits[:, k], self.vocab.labels(labels[:, k])) for k in range(len(self.blocks))]
        total, hits, counted = (torch.stack(x) for x in zip(*parts, strict=True))
        return total.sum() / counted.sum().clamp(min=1), hits, counted

    def drafter(self, num_tokens: int | None = None, tree_width: int = 1, min_confidence: float = 0.0) -> MedusaDrafter:
        return MedusaDrafter(self, self.check_depth(num_tokens), tree_width, min_confidence)


class MedusaDrafter(HeadDrafter):
    """``HeadDrafter`` over trained Medusa heads: full-vocabulary logits (zero probability outside a reduced
    draft vocabulary)."""

    def __init__(self, heads: MedusaHeads, num_tokens: int, tree_width: int = 1, min_confidence: float = 0.0) -> None:
        super().__init__(lambda h: heads.vocab.to_full(heads.draft_logits(h)), num_tokens, tree_width, min_confidence)
        self.module = heads
