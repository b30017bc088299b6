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
    each row's true position for the next token — padding never advances it.
    """

    kv: torch.Tensor  # (B, Hkv, Dk, Dv)
    group_kv: torch.Tensor  # (B, Hkv, Dk, Dv)
    group_keys: torch.Tensor  # (B, Hkv, G, Dk)
    group_values: torch.Tensor  # (B, Hkv, G, Dv)
    ring: torch.Tensor  # (B, Hkv, P-1, Dv)
    position: torch.Tensor  # (B,) int64

    @property
    def group_size(self) -> int:
        return self.group_keys.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> LinearAttentionState:
        """A new state with ``fn`` applied to every tensor (device moves, row selection, copies)."""
        return LinearAttentionState(**{name: fn(t) for name, t in self.tensors().items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def empty_state(
    batch: int,
    kv_heads: int,
    key_dim: int,
    value_dim: int,
    group_size: int,
    conv_taps: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> LinearAttentionState:
    """The state before any token: zero sums, an empty group, a zero ring, position 0."""

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    return LinearAttentionState(
        kv=zeros(batch, kv_heads, key_dim, value_dim),
        group_kv=zeros(batch, kv_heads, key_dim, value_dim),
        group_keys=zeros(batch, kv_heads, group_size, key_dim),
        group_values=zeros(batch, kv_heads, group_size, value_dim),
        ring=zeros(batch, kv_heads, conv_taps - 1, value_dim),
        position=torch.zeros(batch, dtype=torch.long, device=device),
    )
