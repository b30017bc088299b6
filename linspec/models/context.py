"""What a forward pass through linspec layers *is*: the execution context every ``LinspecAttention`` reads.

A linear layer runs in one of four modes — chunked (no cache: training, full forwards), recurrent (one token on a
state), extend (several tokens on a state, padding allowed) and verify (a tree of candidates read against the
state, which does not change). The first three follow from the inputs; verify and the padding mask cannot, so
they are stated explicitly in an ``ExecutionContext`` passed down as the ``linspec_context`` keyword, never
parked on the cache for a layer to discover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from linspec.ops.memory import GlobalMemory
from linspec.ops.verify import TreeLayout


@dataclass(frozen=True)
class KeptCandidates:
    """One layer's candidate entries from a verification pass, as the commit needs them."""

    keys: torch.Tensor  # k̂ (B, Hkv, N, Dk)
    values: torch.Tensor  # v (B, Hkv, N, Dv)
    memory: GlobalMemory | None  # how the layer folds S
    raw_keys: torch.Tensor | None  # keys before φ, for a softmax-window layer; else None


@dataclass
class TreeCandidates:
    """One verification pass over a tree of candidates.

    Linear layers evaluate the tree against their committed state without changing it and leave each
    candidate's ``(k̂, v)`` here (``keep``); the cache's commit appends the accepted path's entries from here, so
    nothing is recomputed and nothing needs rolling back.
    """

    layout: TreeLayout
    _entries: dict[int, KeptCandidates] = field(default_factory=dict)

    def keep(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        memory: GlobalMemory | None = None,
        raw_keys: torch.Tensor | None = None,
    ) -> None:
        """Store layer ``layer_idx``'s candidate ``k̂ [B, Hkv, N, Dk]`` and ``v [B, Hkv, N, Dv]``, how that layer
        folds its global memory (its decay and normaliser), which the commit applies, and for a softmax-window
        layer the keys before φ, which its window keeps."""
        self._entries[layer_idx] = KeptCandidates(keys, values, memory, raw_keys)

    def entries(self) -> dict[int, KeptCandidates]:
        return self._entries


@dataclass(frozen=True)
class ExecutionContext:
    """How linear layers treat the new columns of this forward.

    ``token_mask [B, T]``: which new columns are real tokens (None: all of them). Padding never enters a state.
    ``tree``: set for a speculative verification pass — the columns are a tree of candidates, not a sequence.
    """

    token_mask: torch.Tensor | None = None
    tree: TreeCandidates | None = None

    @property
    def all_real(self) -> bool:
        return self.token_mask is None
