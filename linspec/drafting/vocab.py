"""The drafter's output head: the target's own head, or a copy of its rows for the most frequent target tokens.

On a small target the vocabulary projection (SmolLM2-135M: 49152 × 576) costs about a fifth of a whole forward,
so a drafter that reuses it at every level is not cheap. A reduced draft vocabulary (EAGLE-3, FR-Spec) keeps the
V' tokens the target itself emits most often. Drafted distributions still live on the full vocabulary — zero
outside the kept tokens — which the acceptance rule handles exactly: the residual max(0, p − q) keeps all of p's
mass there.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # label of a token outside the draft vocabulary: not trained on


class DraftVocabulary(nn.Module):
    """``token_ids [V']`` (saved with the drafter) → rows of the target's head (rebuilt from the target, frozen)."""

    def __init__(self, target_head: torch.Tensor, token_ids: torch.Tensor | None) -> None:
        super().__init__()
        vocab = target_head.shape[0]
        ids = torch.arange(vocab) if token_ids is None else token_ids.long().cpu()
        self.full_size = vocab
        self.register_buffer("token_ids", ids.to(target_head.device), persistent=token_ids is not None)
        rows = target_head.detach() if token_ids is None else target_head.detach()[self.token_ids].clone()
        self.register_buffer("weight", rows, persistent=False)  # (V', H): the target's own rows, frozen
        index = torch.full((vocab,), IGNORE, dtype=torch.long, device=target_head.device)
        index[self.token_ids] = torch.arange(ids.numel(), device=target_head.device)
        self.register_buffer("draft_index", index, persistent=False)  # (V,) full id -> draft id or IGNORE
        self.reduced = token_ids is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., V']`` logits over the draft vocabulary."""
        return hidden @ self.weight.T

    def to_full(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V'] -> [..., V]``: -inf outside the draft vocabulary (probability exactly zero)."""
        if not self.reduced:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.full_size), float("-inf"))
        return full.index_copy_(-1, self.token_ids, logits)

    def labels(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full token ids → draft ids, ``IGNORE`` for tokens outside (and for negative padding ids)."""
        return torch.where(tokens >= 0, self.draft_index[tokens.clamp(min=0)], IGNORE)


def most_frequent_tokens(tokens: torch.Tensor, vocab_size: int, keep: int) -> torch.Tensor:
    """The ``keep`` most frequent ids among ``tokens`` (negative ids ignored), ties by id; sorted."""
    counts = torch.bincount(tokens[tokens >= 0].flatten(), minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / (2 * vocab_size)  # deterministic ties: lower id first
    return counts.topk(min(keep, vocab_size)).indices.sort().values
