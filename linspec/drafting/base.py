"""What every trained drafter module is: settings (JSON), its own weights, frozen parts of the target, a loss
on self-distillation data and a ``Drafter`` for ``speculative_generate``.

Training positions: ``hidden [N, H]`` the target's final hidden state after token ``t`` (the one that predicts
token ``t + 1``), ``inputs [N, D]`` tokens ``t + 1 .. t + D``, ``labels [N, D]`` the target's greedy choice after
each of them, and ``future_hidden [N, D, H]`` its hidden states there (-1 / PAD past the end of the text). At
generation the same ``h`` is ``DraftRequest.target_hidden`` and token ``t + 1`` is the round's root, so depth
``d`` of a draft must propose ``labels[:, d - 1]``, having been fed ``inputs[:, :d]``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from linspec.drafting.vocab import IGNORE, DraftVocabulary
from linspec.errors import LinspecError
from linspec.utils.validation import check_count, is_count

MAX_DEPTH = 16  # draft depth a drafter is trained for (heads, recurrent steps)


def check_int(settings: dict, name: str, low: int, high: int) -> int:
    return check_count(settings.get(name), f"drafter setting {name}", low, high)


def check_token_ids(token_ids: torch.Tensor, vocab_size: int) -> None:
    """A draft vocabulary's ids: one row of distinct integer ids of the target's vocabulary. Anything else (an
    edited ``drafter.safetensors``) would index outside the target's head."""
    if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
        raise LinspecError(f"the draft vocabulary must be a row of integer token ids, got {token_ids.dtype} "
                           f"of shape {list(token_ids.shape)}")  # fmt: skip
    if token_ids.dtype == torch.bool or token_ids.numel() == 0:
        raise LinspecError("the draft vocabulary must be a non-empty row of integer token ids")
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab_size:
        raise LinspecError(f"draft vocabulary ids must be in 0..{vocab_size - 1} (the target's vocabulary), "
                           f"got {low}..{high}")  # fmt: skip
    if token_ids.unique().numel() != token_ids.numel():
        raise LinspecError("the draft vocabulary lists a token id more than once")


class TrainedDrafter(nn.Module):
    """Base of the trained drafter modules; subclasses set ``kind`` and ``SETTINGS`` (name -> default)."""

    kind: ClassVar[str]
    SETTINGS: ClassVar[dict]

    def __init__(self, target, settings: dict, token_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        unknown = set(settings) - set(self.SETTINGS)
        if unknown:
            known = ", ".join(self.SETTINGS)
            raise LinspecError(f"unknown {self.kind} drafter setting {sorted(unknown)[0]!r}; known: {known}")
        self.settings = {**self.SETTINGS, **settings}
        head = target.get_output_embeddings().weight
        self.hidden_size = head.shape[1]
        draft_vocab = self.settings["draft_vocab"]
        if draft_vocab is not None:
            check_int(self.settings, "draft_vocab", 1, head.shape[0])
            if token_ids is None or token_ids.numel() != draft_vocab:
                raise LinspecError(f"a draft vocabulary of {draft_vocab} tokens needs that many token ids")
            check_token_ids(token_ids, head.shape[0])
        self.vocab = DraftVocabulary(head, token_ids if draft_vocab is not None else None)

    @property
    def max_depth(self) -> int:
        """Deepest draft this module was trained for."""
        return self.settings["depth"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def loss(self, hidden: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, future_hidden: torch.Tensor):
        """``(loss, correct [D], counted [D])``: training loss and top-1 hits per draft depth."""
        raise NotImplementedError

    def drafter(self, num_tokens: int | None = None, tree_width: int = 1, min_confidence: float = 0.0):
        """A ``Drafter`` of ``num_tokens`` levels (default: ``max_depth``) and ``tree_width`` branches; greedy
        drafts below ``min_confidence`` cumulative draft probability are not proposed."""
        raise NotImplementedError

    def check_depth(self, num_tokens: int | None) -> int:
        depth = self.max_depth if num_tokens is None else num_tokens
        if not is_count(depth, 1, self.max_depth):
            raise LinspecError(
                f"this {self.kind} drafter drafts 1..{self.max_depth} tokens per round (trained depth); got {depth!r}"
            )
        return depth


def depth_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits [N, V']`` against draft-vocabulary ``labels [N]`` (IGNORE skipped):
    ``(summed loss, top-1 hits, counted)``, summed so depths can be weighed by how many positions they have."""
    counted = labels != IGNORE
    loss = nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    hits = ((logits.argmax(-1) == labels) & counted).sum()
    return loss, hits, counted.sum()
