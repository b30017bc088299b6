"""The softmax parts of a hybrid linspec model served by vLLM: their keys and values live in vLLM's paged KV cache
and their attention runs through vLLM's own ``Attention`` layer, like any model vLLM supports natively.

A softmax layer stays the Hugging Face module it was (projections, q/k norms, RoPE, output projection); only its
attention kernel is routed, through ``hf.route_softmax_attention``, to the vLLM ``Attention`` of its layer. The
softmax heads of a linear layer (``SoftmaxHeadsTerm``) are replaced by ``PagedHeadsTerm``: vLLM attends the kept
heads' queries over their paged columns once for the whole flat batch, and the term hands each run of the layer
(decodes, then each prefill) its rows of that output, so the layer's other terms and its sum stay linspec's own.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention

from linspec.models import hf
from linspec.models.terms.base import LayerState, Term, TermInputs
from linspec.models.terms.heads import SoftmaxHeadsTerm

ATTENTION_IMPLEMENTATION = "linspec_vllm_paged"
# Which vLLM Attention serves each Hugging Face softmax module (weakly: the served model owns both).
_ROUTES: weakref.WeakKeyDictionary[nn.Module, Attention] = weakref.WeakKeyDictionary()


def _flat(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[1, heads, N, D]`` -> ``[N, heads * D]`` in ``dtype``: the token-major layout vLLM's Attention takes."""
    return tensor[0].transpose(0, 1).reshape(tensor.shape[2], -1).to(dtype)


def paged_attention(module: nn.Module, query, key, value, attention_mask=None, **kwargs):
    """The attention kernel of a routed softmax module: the whole flat batch (``[1, H, N, D]``) through its vLLM
    ``Attention``, which stores the new keys and values in their requests' pages and attends each request's
    queries over that request's columns. The mask is vLLM's (causal, per request), not the one passed here."""
    attention = _ROUTES[module]
    out = attention(_flat(query, query.dtype), _flat(key, query.dtype), _flat(value, query.dtype))
    return out.view(1, query.shape[2], query.shape[1], -1), None


def route_softmax_layers(
    config, modules: dict[int, nn.Module], vllm_config: VllmConfig, base: str
) -> dict[int, Attention]:
    """A vLLM ``Attention`` (paged KV, ``FullAttentionSpec``) for each softmax layer's Hugging Face module (by
    layer index), with that module's heads, scale and sliding window; the modules' attention is routed to it."""
    windows = hf.sliding_windows(config, config.num_hidden_layers)
    routed = {}
    for index, module in modules.items():
        attention = Attention(
            config.num_attention_heads,
            module.head_dim,
            module.scaling,
            num_kv_heads=config.num_key_value_heads,
            cache_config=vllm_config.cache_config,
            per_layer_sliding_window=windows[index],
            prefix=f"{base}model.layers.{index}.self_attn.attn",
        )
        _ROUTES[module] = attention
        routed[index] = attention
    hf.route_softmax_attention(config, ATTENTION_IMPLEMENTATION, paged_attention)
    return routed


class PagedHeadsTerm(Term):
    """The softmax heads of one linear layer with their columns in vLLM's pages (in the place of
    ``SoftmaxHeadsTerm``, whose heads, query heads and scale it keeps). ``attend`` runs them once per forward on
    the flat batch; ``select`` then picks the rows of the run the layer does next."""

    name = SoftmaxHeadsTerm.name

    def __init__(self, term: SoftmaxHeadsTerm, vllm_config: VllmConfig, head_dim: int, prefix: str) -> None:
        self._term = term
        self.dtype = vllm_config.model_config.dtype
        self.attention = Attention(
            len(term.kv_heads) * term.repeats,
            head_dim,
            term.scaling,
            num_kv_heads=len(term.kv_heads),
            cache_config=vllm_config.cache_config,
            prefix=prefix,
        )
        self._output: torch.Tensor | None = None  # [heads, N, D] of the current forward
        self._rows: tuple[int, int, int] = (0, 0, 1)

    def query_heads(self, device: torch.device) -> torch.Tensor:
        return self._term.query_heads(device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Softmax attention of the kept heads for the whole flat batch: ``q [1, H, N, D]``, ``k``/``v [1, Hkv,
        N, D]`` (RoPE'd, the compute dtype), through vLLM's paged ``Attention`` in the model's dtype."""
        q_index = self.query_heads(q.device)
        kv_index = torch.tensor(self._term.kv_heads, device=q.device)
        heads = q_index.numel()
        query, key, value = (_flat(t, self.dtype) for t in (q[:, q_index], k[:, kv_index], v[:, kv_index]))
        out = self.attention(query, key, value)
        self._output = out.view(-1, heads, q.shape[-1]).transpose(0, 1).to(q.dtype)

    def select(self, begin: int, end: int, rows: int) -> None:
        """The next run of the layer covers flat tokens ``begin:end``, ``rows`` requests of equal length."""
        self._rows = (begin, end, rows)

    def _selected(self) -> torch.Tensor:
        if self._output is None:
            raise RuntimeError("the softmax heads were not attended for this batch")
        begin, end, rows = self._rows
        heads, _, dim = self._output.shape
        return self._output[:, begin:end].reshape(heads, rows, -1, dim).transpose(0, 1)

    def chunked(self, x: TermInputs) -> torch.Tensor:
        return self._selected()

    def extend(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, None]:
        return self._selected(), None

    def verify(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, None]:
        raise NotImplementedError("vLLM verifies speculative tokens as ordinary extends")
