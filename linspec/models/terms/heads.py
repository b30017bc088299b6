"""The softmax heads term: single kv heads of a linear layer (``LinspecConfig.softmax_heads``) kept as the
pretrained softmax attention over the whole context, answering alone for the query heads that read them.

Their keys and values are a KV layer of the cache (``LinspecCache.append_head_kv``), so speculative verification,
commit, row selection and repacking treat them as a softmax layer's columns, and the mask the model (or
``ModelRunner``) builds for its softmax layers — padding, tree ancestry and each row's own columns — applies as
it is; a missing mask means plain causal attention. So every mode is the same computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.models.terms.base import LayerState, Term, TermInputs


class SoftmaxHeadsTerm(Term):
    name = "heads"

    def __init__(self, layer) -> None:
        heads = layer.settings.heads_of(layer.layer_idx)
        if any(head >= layer.num_kv_heads for head in heads):
            raise ValueError(f"layer {layer.layer_idx} has {layer.num_kv_heads} kv heads; softmax_heads name others")
        self.layer_idx = layer.layer_idx
        self.scaling = layer.scaling
        self.repeats = layer.num_heads // layer.num_kv_heads
        self.kv_heads = heads
        self._index_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_layer(cls, layer) -> SoftmaxHeadsTerm | None:
        return cls(layer) if layer.settings.heads_of(layer.layer_idx) else None

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv heads, their query heads)`` as index tensors on ``device``, made once: decoding needs them in
        every step."""
        if self._index_cache is None or self._index_cache[0].device != device:
            kv_index = torch.tensor(self.kv_heads, device=device)
            q_index = (kv_index[:, None] * self.repeats + torch.arange(self.repeats, device=device)).flatten()
            self._index_cache = (kv_index, q_index)
        return self._index_cache

    def query_heads(self, device: torch.device) -> torch.Tensor:
        return self._indices(device)[1]

    def attend(self, x: TermInputs) -> torch.Tensor:
        """Softmax attention of the kept heads' query heads over every column so far, in any mode."""
        kv_index, q_index = self._indices(x.q.device)
        keys, values = x.k[:, kv_index], x.v[:, kv_index]
        if x.cache is not None:
            keys, values = x.cache.append_head_kv(self.layer_idx, keys, values)
        length, columns = x.q.shape[2], keys.shape[2]
        mask = None  # no mask and no past columns: SDPA's own causal kernel (training, full forwards)
        if x.attention_mask is not None:
            mask = x.attention_mask if x.attention_mask.dtype == torch.bool else x.attention_mask.to(x.q.dtype)
        elif columns != length:
            mask = torch.ones(length, columns, dtype=torch.bool, device=x.q.device).tril(columns - length)
        return F.scaled_dot_product_attention(
            x.q[:, q_index],
            keys.repeat_interleave(self.repeats, dim=1),
            values.repeat_interleave(self.repeats, dim=1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scaling,
        )

    def chunked(self, x: TermInputs) -> torch.Tensor:
        return self.attend(x)

    def extend(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, None]:
        return self.attend(x), None

    def verify(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, None]:
        """The candidates' columns are appended like any others; the cache's commit or discard settles them."""
        return self.attend(x), None
