"""The constant-size recurrent state of one linear-attention layer."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class LinearAttentionState:
    """Everything decoding needs from the past, with a size independent of how long the past is.

    Per row: ``kv`` is S over *complete* groups; ``group_keys``/``group_values`` hold the current group's
    entries in slots ``0 .. position % G - 1`` (later slots are zero); ``group_kv`` is their running
    ``Σ k̂ vᵀ`` (kept so decode folds a finished group into ``kv`` without a G-sized product); ``ring`` holds
    the last P−1 values oldest first (zeros before the start); ``position`` counts real tokens seen, which is
    each row's true position for the next token — padding never advances it. ``key_sum`` is z, the normaliser of
    S (``Σ k̂`` over complete groups, decayed like S), kept only by memories normalised by ``q̂ᵀz``
    (``linspec.ops.memory``); None otherwise, and read as zeros where such a memory meets a fresh state.
    A softmax window keeps its own state (``linspec.ops.window.WindowState``), beside this one in the layer's.
    Functions that update some fields build the next state with ``dataclasses.replace``, so the others carry over.
    """

    kv: torch.Tensor  # (B, Hkv, Dk, Dv)
    group_kv: torch.Tensor  # (B, Hkv, Dk, Dv)
    group_keys: torch.Tensor  # (B, Hkv, G, Dk)
    group_values: torch.Tensor  # (B, Hkv, G, Dv)
    ring: torch.Tensor  # (B, Hkv, P-1, Dv)
    position: torch.Tensor  # (B,) int64
    key_sum: torch.Tensor | None = None  # (B, Hkv, Dk)

    @property
    def group_size(self) -> int:
        return self.group_keys.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name; fields a memory does not use (None) are left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> LinearAttentionState:
        """A new state with ``fn`` applied to every tensor (device moves, row selection, copies)."""
        return LinearAttentionState(**{name: fn(t) for name, t in self.tensors().items()})

    def key_sum_or_zeros(self) -> torch.Tensor:
        """z, or zeros for a state that has not kept it yet (z of nothing is zero)."""
        return self.key_sum if self.key_sum is not None else self.group_keys.new_zeros(self.group_keys[:, :, 0].shape)

    def nbytes(self) -> int:
        return held_bytes(self.tensors().values())


def held_bytes(tensors) -> int:
    """The memory ``tensors`` keep alive: each storage once, whole — a view holds its whole buffer (a ring
    written in place keeps room after its entries, a ring sliced from a longer tensor keeps all of it)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def empty_state(
    batch: int,
    kv_heads: int,
    key_dim: int,
    value_dim: int,
    group_size: int,
    conv_taps: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    key_sum: bool = False,
) -> LinearAttentionState:
    """The state before any token: zero sums, an empty group, a zero ring, position 0 (and z = 0 if asked)."""

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    return LinearAttentionState(
        kv=zeros(batch, kv_heads, key_dim, value_dim),
        group_kv=zeros(batch, kv_heads, key_dim, value_dim),
        group_keys=zeros(batch, kv_heads, group_size, key_dim),
        group_values=zeros(batch, kv_heads, group_size, value_dim),
        ring=zeros(batch, kv_heads, conv_taps - 1, value_dim),
        position=torch.zeros(batch, dtype=torch.long, device=device),
        key_sum=zeros(batch, kv_heads, key_dim) if key_sum else None,
    )
