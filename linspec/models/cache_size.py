"""How large a model's decode cache grows with the context: the number a card's "state size" table shows.

A linspec layer's state is fixed once its first token is in (the window, group and ring buffers are allocated
whole); a softmax layer, or a softmax head kept inside a linear layer, appends one key and one value per token.
So two decode steps give the whole curve: the bytes after the first token and the growth per token. They are
measured on the model's real cache (``linspec.models.cache``), so float32 states beside 16-bit weights and the
KV layers of softmax heads count exactly as decoding holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheGrowth:
    """A decode cache of ``fixed + per_token × context`` bytes (one sequence)."""

    fixed: int
    per_token: int

    def bytes_at(self, context: int) -> int:
        return self.fixed + self.per_token * context


@torch.no_grad()
def measured_cache_growth(model) -> CacheGrowth:
    """The growth of ``model``'s own decode cache, from two one-token steps through it."""
    from linspec.models import hf
    from linspec.models.cache import cache_nbytes, new_cache_for

    cache = new_cache_for(model)
    token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    sizes = []
    for _ in range(2):
        model(input_ids=token, use_cache=True, **hf.cache_kwargs(cache))
        sizes.append(cache_nbytes(cache))
    per_token = sizes[1] - sizes[0]
    return CacheGrowth(fixed=sizes[0] - per_token, per_token=per_token)


def softmax_cache_growth(config, dtype: torch.dtype) -> CacheGrowth:
    """The KV cache of the softmax model a config describes (every layer softmax): a key and a value per kv head,
    layer and token, in ``dtype``. For the original of a converted model, which is no longer loaded."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return CacheGrowth(fixed=0, per_token=2 * text.num_hidden_layers * kv_heads * head_dim * itemsize)


def card_contexts(max_positions: int | None) -> list[int]:
    """Context lengths a card tabulates: 1k, 4k, 16k and 64k tokens within the model's positions, and the
    positions themselves when they fall between."""
    wanted = [1024, 4096, 16384, 65536]
    if not max_positions or max_positions <= 0:
        return wanted
    inside = [n for n in wanted if n <= max_positions]
    if max_positions < wanted[-1] and max_positions not in inside:
        inside.append(max_positions)
    return inside
