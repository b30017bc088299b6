"""An EAGLE-style feature drafter (Li et al. 2024): one decoder-style layer over ``[feature ; embedding of the
next token]`` predicts the target's next final hidden state, autoregressively in feature space; the target's
head (or its reduced copy) turns each predicted feature into draft logits. Trained on the target's own
continuations to match both its next features (smooth L1) and its next tokens (cross-entropy), unrolled over
the drafting depth from its own predictions. Each round starts from the target's real feature of the token
before the root, so errors never accumulate across rounds.

Here the layer is a fused projection and a SwiGLU MLP, without EAGLE's attention over earlier features: the
state carries the path instead (one cell step per tree node).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from linspec.drafting.base import MAX_DEPTH, check_int
from linspec.drafting.recurrent import RecurrentDraftModule


class EagleDrafterModule(RecurrentDraftModule):
    kind = "eagle"
    SETTINGS: ClassVar[dict] = {"depth": 5, "draft_vocab": None, "intermediate_size": 1024}
    feature_loss_weight = 1.0

    def __init__(self, target, settings: dict, token_ids: torch.Tensor | None = None) -> None:
        super().__init__(target, settings, token_ids)
        check_int(self.settings, "depth", 1, MAX_DEPTH)
        inner = check_int(self.settings, "intermediate_size", 1, 1 << 16)
        size = self.hidden_size
        self.register_buffer("embed", target.get_input_embeddings().weight.detach(), persistent=False)  # (V, H)
        self.fuse = nn.Linear(2 * size, size)
        self.norm = nn.RMSNorm(size, eps=1e-6)
        self.gate_up = nn.Linear(size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, size, bias=False)
        with torch.no_grad():  # start as "the next feature is this feature": fuse passes it through
            self.fuse.weight.zero_()
            self.fuse.weight[:, :size].copy_(torch.eye(size))
            self.fuse.bias.zero_()
            self.down.weight.zero_()

    def cell(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([state, self.embed[token]], -1))  # (.., H)
        gate, up = self.gate_up(self.norm(fused)).chunk(2, -1)
        return fused + self.down(nn.functional.silu(gate) * up)
