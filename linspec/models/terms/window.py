"""The softmax window term: the pretrained softmax over the last ``local_window`` tokens and the first
``sink_tokens`` (``linspec.ops.window``), the local term of ``local_kernel: softmax`` in the in-group κ's place.
It scores the RoPE'd queries and keys before any feature map, with the module's own logit scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linspec.models.terms.base import LayerState, Term, TermInputs
from linspec.ops.extend import gather_tokens
from linspec.ops.window import (
    WindowState,
    empty_window,
    window_append,
    window_attention,
    window_extend,
    window_step,
    window_verify,
)


@dataclass(frozen=True)
class KeptRawNodes:
    """Every node's raw key and value from a verification pass: what the window keeps of the accepted ones."""

    keys: torch.Tensor  # (B, Hkv, N, Dk), before φ
    values: torch.Tensor  # (B, Hkv, N, Dv)


class SoftmaxWindowTerm(Term):
    name = "window"

    def __init__(self, layer) -> None:
        self.window = layer.softmax_window()
        self.num_kv_heads = layer.num_kv_heads
        self.head_dim = layer.head_dim

    @classmethod
    def for_layer(cls, layer) -> SoftmaxWindowTerm | None:
        return cls(layer) if layer.settings.softmax_window else None

    def empty(self, batch: int, dtype: torch.dtype, device: torch.device) -> WindowState:
        return empty_window(batch, self.num_kv_heads, self.head_dim, self.head_dim, self.window, dtype, device)

    def chunked(self, x: TermInputs) -> torch.Tensor:
        return window_attention(x.q, x.k, x.v, self.window, x.sink_q)

    def extend(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, WindowState]:
        part = state.slices[self.name]
        return window_extend(x.q, x.k, x.v, part, state.position, self.window, x.token_mask, x.sink_q)

    def step(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, WindowState]:
        return window_step(x.q, x.k, x.v, state.slices[self.name], state.position, self.window, x.sink_q)

    def verify(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, KeptRawNodes]:
        part = state.slices[self.name]
        out = window_verify(x.q, x.k, x.v, part, state.position, x.layout, self.window, x.sink_q)
        return out, KeptRawNodes(x.k, x.v)

    def commit(self, state: LayerState, kept: KeptRawNodes, path: torch.Tensor, path_mask: torch.Tensor) -> WindowState:
        """Each layer on its own: appending shifts the window (hundreds of keys), one copy per layer, and stacking
        layers would add another."""
        keys, values = gather_tokens(kept.keys, path), gather_tokens(kept.values, path)
        return window_append(state.slices[self.name], state.position, keys, values, path_mask)
