"""The softmax window term: the pretrained softmax over the last ``local_window`` tokens and the first
``sink_tokens`` (``linspec.ops.window``), the local term of ``local_kernel: softmax`` in the in-group κ's place.
It scores the RoPE'd queries and keys before any feature map, with the module's own logit scale.

With ``memory_feature_map`` it also keeps the far memory of the tokens that leave the window
(``linspec.ops.far_memory``): the memory is one more column of the window's softmax, so the window term owns it —
its state rides in the window's slice (``WindowWithMemory``) and its column joins each mode's one softmax. Its
parameters live on the layer: ``memory_bias`` (``[num_heads]``, ``b_h``), for ``hedgehog``
``memory_feature_map_q`` (``[num_heads, D, D]``) and ``memory_feature_map_k`` (``[num_kv_heads, D, D]``), and with
``memory_distance_decay`` ``memory_distance_exponent`` (``[num_heads]``, ``α_h``, 0 at conversion).

With ``sparse_cache`` it also keeps the K evicted tokens per kv head its policy picks (``linspec.ops.sparse_cache``),
in the same slice (``WindowWithCache``) and the same column. Training-free: the training forward (training mode,
no decode cache) ignores the cache and reads the far memory of every evicted token instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from linspec.models.terms.base import LayerState, Term, TermInputs
from linspec.ops.extend import gather_tokens
from linspec.ops.far_memory import (
    FarMemory,
    empty_memory,
    far_memory_chunked,
    far_memory_commit,
    far_memory_extend,
    far_memory_step,
    far_memory_verify,
    initial_memory_bias,
)
from linspec.ops.sparse_cache import (
    SparseCache,
    empty_cache,
    sparse_cache_chunked,
    sparse_cache_commit,
    sparse_cache_event,
    sparse_cache_extend,
    sparse_cache_reads,
    sparse_cache_verify,
)
from linspec.ops.window import (
    SoftmaxWindow,
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
    """Every node's raw key and value from a verification pass: what the window keeps of the accepted ones (and
    what they push into the far memory), with this forward's memory parameters."""

    keys: torch.Tensor  # (B, Hkv, N, Dk), before φ
    values: torch.Tensor  # (B, Hkv, N, Dv)
    memory: FarMemory | None = None


class SoftmaxWindowTerm(Term):
    name = "window"

    def __init__(self, layer) -> None:
        """With a far memory, registers its parameters on ``layer``."""
        self.layer = layer
        self.num_kv_heads = layer.num_kv_heads
        self.head_dim = layer.head_dim
        self.memory_map = layer.settings.memory_feature_map
        settings = layer.settings
        self.sparse = (
            SparseCache(settings.sparse_cache, settings.sparse_cache_policy) if settings.sparse_cache else None
        )
        for name, value in self._initial_parameters().items():
            setattr(layer, name, nn.Parameter(value))

    @property
    def window(self) -> SoftmaxWindow:
        """The layer's window, read at every forward so that a training-time size override applies."""
        return self.layer.softmax_window()

    @classmethod
    def for_layer(cls, layer) -> SoftmaxWindowTerm | None:
        return cls(layer) if layer.settings.softmax_window else None

    def _initial_parameters(self) -> dict[str, torch.Tensor]:
        """The far memory's parameters as conversion sets them, by name on the layer: the bias at
        ``initial_memory_bias`` and the maps at the identity (none without a memory)."""
        if self.memory_map == "none":
            return {}
        layer = self.layer
        weight = layer.q_proj.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        bias = initial_memory_bias(self.head_dim, layer.settings.local_window)
        initial = {"memory_bias": torch.full((layer.num_heads,), bias, **like)}
        if layer.settings.memory_distance_decay:
            initial["memory_distance_exponent"] = torch.zeros(layer.num_heads, **like)
        if self.memory_map == "hedgehog":
            eye = torch.eye(self.head_dim, **like)
            initial["memory_feature_map_q"] = eye.repeat(layer.num_heads, 1, 1)
            initial["memory_feature_map_k"] = eye.repeat(layer.num_kv_heads, 1, 1)
        return initial

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, value in self._initial_parameters().items():
                getattr(self.layer, name).copy_(value)

    def far_memory(self, dtype: torch.dtype) -> FarMemory | None:
        """The memory's parameters in the compute ``dtype``; None without a memory."""
        if self.memory_map == "none":
            return None
        layer = self.layer
        exponent = getattr(layer, "memory_distance_exponent", None)
        exponent = None if exponent is None else exponent.to(dtype)
        reference = layer.settings.local_window  # W₀: a training-time window override moves W, not W₀
        if self.memory_map == "softmax":
            return FarMemory(layer.memory_bias.to(dtype), distance_exponent=exponent, reference_window=reference)
        maps = layer.memory_feature_map_q.to(dtype), layer.memory_feature_map_k.to(dtype)
        return FarMemory(layer.memory_bias.to(dtype), *maps, exponent, reference)

    def _read(self, column):
        """The column the window reads: none while the layer's ``far_memory_on`` is off (the ablation), which still
        folds the memory so the state stays what it would be."""
        return column if self.layer.far_memory_on else None

    def empty(self, batch: int, dtype: torch.dtype, device: torch.device) -> WindowState:
        window = empty_window(batch, self.num_kv_heads, self.head_dim, self.head_dim, self.window, dtype, device)
        with_memory = window if self.memory_map == "none" else empty_memory(window, self.head_dim)
        if self.sparse is None:
            return with_memory
        return empty_cache(window, getattr(with_memory, "far_memory", None), self.sparse)

    def chunked(self, x: TermInputs) -> torch.Tensor:
        memory = self.far_memory(x.q.dtype)
        column = None
        if self.sparse is not None and not self.layer.training and self.layer.far_memory_on:
            empty = self.empty(x.q.shape[0], x.q.dtype, x.q.device)
            column = sparse_cache_chunked(x.q, x.k, x.v, self.window, self.sparse, memory, empty)
        elif memory is not None and self.layer.far_memory_on:
            column = far_memory_chunked(x.q, x.k, x.v, self.window, memory)
        return window_attention(x.q, x.k, x.v, self.window, x.sink_q, column)

    def extend(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, WindowState]:
        part, memory = state.slices[self.name], self.far_memory(x.q.dtype)
        if self.sparse is not None:
            column, fields = sparse_cache_extend(
                x.q, x.k, x.v, part, state.position, self.window, self.sparse, memory, x.token_mask
            )
            out, after = window_extend(
                x.q, x.k, x.v, part, state.position, self.window, x.token_mask, x.sink_q, self._read(column)
            )
            return out, replace(after, **fields)
        if memory is None:
            return window_extend(x.q, x.k, x.v, part, state.position, self.window, x.token_mask, x.sink_q)
        column, folded = far_memory_extend(x.q, x.k, x.v, part, state.position, self.window, memory, x.token_mask)
        out, after = window_extend(
            x.q, x.k, x.v, part, state.position, self.window, x.token_mask, x.sink_q, self._read(column)
        )
        return out, replace(after, far_memory=folded)

    def step(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, WindowState]:
        part, memory = state.slices[self.name], self.far_memory(x.q.dtype)
        if self.sparse is not None:
            exact, far = sparse_cache_reads(x.q, part, state.position, self.window, memory)
            read, cached = (far, exact) if self.layer.far_memory_on else (None, None)
            out, after = window_step(
                x.q, x.k, x.v, part, state.position, self.window, x.sink_q, read, cached, x.state_writable
            )
            fields = sparse_cache_event(
                part, x.k, x.v, state.position, self.window, self.sparse, memory, x.state_writable
            )
            return out, replace(after, **fields)
        writable = x.state_writable
        if memory is None:
            return window_step(x.q, x.k, x.v, part, state.position, self.window, x.sink_q, in_place=writable)
        column, folded = far_memory_step(x.q, x.k, x.v, part, state.position, self.window, memory, writable)
        out, after = window_step(
            x.q, x.k, x.v, part, state.position, self.window, x.sink_q, self._read(column), in_place=writable
        )
        return out, replace(after, far_memory=folded)

    def verify(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, KeptRawNodes]:
        part, memory = state.slices[self.name], self.far_memory(x.q.dtype)
        column = None
        if self.sparse is not None:
            column = sparse_cache_verify(
                x.q, x.k, x.v, part, state.position, x.layout, self.window, self.sparse, memory
            )
            column = self._read(column)
        elif memory is not None and self.layer.far_memory_on:
            column = far_memory_verify(x.q, x.k, x.v, part, state.position, x.layout, self.window, memory)
        out = window_verify(x.q, x.k, x.v, part, state.position, x.layout, self.window, x.sink_q, column)
        return out, KeptRawNodes(x.k, x.v, memory)

    def commit(self, state: LayerState, kept: KeptRawNodes, path: torch.Tensor, path_mask: torch.Tensor) -> WindowState:
        """Each layer on its own: appending shifts the window (hundreds of keys), one copy per layer, and stacking
        layers would add another. The far memory folds what the path pushes out of the ring."""
        part = state.slices[self.name]
        keys, values = gather_tokens(kept.keys, path), gather_tokens(kept.values, path)
        after = window_append(part, state.position, keys, values, path_mask)
        if self.sparse is not None:
            fields = sparse_cache_commit(
                part, state.position, keys, values, self.window, self.sparse, kept.memory, path_mask
            )
            return replace(after, **fields)
        if kept.memory is None:
            return after
        folded = far_memory_commit(part, state.position, keys, values, self.window, kept.memory, path_mask)
        return replace(after, far_memory=folded)
