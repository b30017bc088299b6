"""A ReDrafter-style recurrent drafter (Cheng et al. 2024): a small recurrent cell over the target's token
embeddings, started from the target's last hidden state, ``s_d = s_{d-1} + SiLU(W [s_{d-1} ; e(x_d)] + b)``,
with the target's head (or its reduced copy) on each state. Greedy drafting is a beam search whose beams share
prefixes, merged into one dynamic tree (``linspec.drafting.recurrent``). Cheaper per step than the EAGLE layer
(one ``2H × H`` product), trained only on the target's next tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from linspec.drafting.base import MAX_DEPTH, check_int
from linspec.drafting.recurrent import RecurrentDraftModule


class RecurrentDrafterModule(RecurrentDraftModule):
    kind = "redrafter"
    SETTINGS: ClassVar[dict] = {"depth": 5, "draft_vocab": None}

    def __init__(self, target, settings: dict, token_ids: torch.Tensor | None = None) -> None:
        super().__init__(target, settings, token_ids)
        check_int(self.settings, "depth", 1, MAX_DEPTH)
        self.register_buffer("embed", target.get_input_embeddings().weight.detach(), persistent=False)  # (V, H)
        self.update = nn.Linear(2 * self.hidden_size, self.hidden_size)
        nn.init.zeros_(self.update.weight)
        nn.init.zeros_(self.update.bias)

    def cell(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return state + nn.functional.silu(self.update(torch.cat([state, self.embed[token]], -1)))
