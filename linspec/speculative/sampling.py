"""Sampling settings and the warp from logits to the distribution both the target (p) and the drafter (q) use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from linspec.errors import LinspecError


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy (``do_sample=False`` or ``temperature == 0``) or sampling from temperature → top-k → top-p warped logits.

    The same settings shape p and q: the acceptance rule is exact for the warped target distribution, which is
    what plain sampling with these settings draws from.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise LinspecError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise LinspecError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise LinspecError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` float32 probabilities after temperature, top-k and top-p (the HF warpers' semantics). The
        row's largest logit is subtracted before dividing (softmax, top-k and top-p do not change): a tiny
        temperature then sends the others to -inf instead of overflowing every score to inf (NaN probabilities); one
        below float32's smallest normal (which would round to 0) acts as that smallest one: the same limit."""
        scores = logits.float()
        temperature = max(self.temperature, torch.finfo(scores.dtype).tiny)
        scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature
        vocab = scores.shape[-1]
        if 0 < self.top_k < vocab:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1)  # ascending
            tail = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            tail[..., -1] = False  # keep at least the most likely token
            scores = scores.masked_fill(tail.scatter(-1, order, tail), -math.inf)
        return scores.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` → ``[B]``."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def normalize(weights: torch.Tensor) -> torch.Tensor:
    """``weights / sum`` over the last axis; an all-zero row stays zero."""
    total = weights.sum(dim=-1, keepdim=True)
    return weights / total.clamp(min=torch.finfo(weights.dtype).tiny)
