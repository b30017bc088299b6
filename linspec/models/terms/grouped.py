"""The grouped term: the paper's augmented grouped linear attention, one ``linspec.ops`` call per mode.

Inside it are three parts of the layer's output: κ(q̂·k̂) over the current group (absent, ``"none"``, when a
softmax window is the local term: ``LinspecConfig.in_group_kernel``), the global memory S over complete groups
scaled by γ (``global_scale``; decayed and normalised as ``linspec.ops.memory`` says), and the causal depthwise
conv over v (``conv_weight``). They are one term because the ops compute them in one pass over the same group
buffer — the chunked and verify forms put κ's weights and the conv taps inside a group in one matrix, and the
plain memory's in-tree part in that matrix too — so splitting them would change the order of the float sums that
every mode is pinned to.

A layer whose settings have ``grouped_term`` false has no grouped term (its softmax window is the layer).

Its parameters start at zero (γ, conv), so a fresh conversion is the local term alone; with ``global_decay`` it
also has ``decay_logit`` (``[num_key_value_heads]``, λ = sigmoid(logit) per kv head: S is stored per kv head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from linspec.models.terms.base import LayerState, Term, TermInputs, map_slice, slice_tensors
from linspec.ops import (
    LinearAttentionState,
    append_tokens,
    chunked_attention,
    empty_state,
    extend_attention,
    recurrent_step,
    verify_attention,
)
from linspec.ops.extend import gather_tokens
from linspec.ops.memory import GlobalMemory


def initial_decay_logits(num_kv_heads: int) -> torch.Tensor:
    """``logit(λ_h)`` with horizons ``1/(1−λ_h) = 2^e`` groups, ``e`` spread evenly over (2, 8), RetNet-style.

    Short horizons (4 groups: a 256-token training window at G = 64) bound S from the start in some heads, long
    ones (256 groups: 16k tokens) keep distant context in others; training moves each head from there. One kv
    head gets the middle, 32 groups. ``logit(1 − 2^−e) = log(2^e − 1)``.
    """
    exponents = 2.0 + 6.0 * (torch.arange(num_kv_heads, dtype=torch.float64) + 0.5) / num_kv_heads
    return torch.log(torch.exp2(exponents) - 1.0)


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ applied to RoPE'd queries and keys (the paper preset: L2 normalisation, no 1/√d)."""
    if name == "l2norm":
        return F.normalize(x, dim=-1, eps=1e-6)
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r}")


@dataclass
class GroupedState:
    """The grouped term's slice: ``LinearAttentionState`` without ``position``, which is the layer's."""

    kv: torch.Tensor  # (B, Hkv, Dk, Dv)
    group_kv: torch.Tensor  # (B, Hkv, Dk, Dv)
    group_keys: torch.Tensor  # (B, Hkv, G, Dk)
    group_values: torch.Tensor  # (B, Hkv, G, Dv)
    ring: torch.Tensor  # (B, Hkv, P-1, Dv)
    key_sum: torch.Tensor | None = None  # (B, Hkv, Dk)

    def at(self, position: torch.Tensor) -> LinearAttentionState:
        """The ops' state for rows at ``position``."""
        return LinearAttentionState(position=position, **slice_tensors(self))

    @classmethod
    def of(cls, state: LinearAttentionState) -> GroupedState:
        """The slice of an ops' state (its ``position`` is left to the layer)."""
        return cls(state.kv, state.group_kv, state.group_keys, state.group_values, state.ring, state.key_sum)


@dataclass(frozen=True)
class KeptNodes:
    """What the commit of a verification pass needs from this term: every node's ``k̂`` and ``v``, and the memory
    (with this forward's λ) that folds them."""

    keys: torch.Tensor  # (B, Hkv, N, Dk)
    values: torch.Tensor  # (B, Hkv, N, Dv)
    memory: GlobalMemory | None


class GroupedTerm(Term):
    name = "grouped"

    def __init__(self, layer) -> None:
        """Registers ``global_scale``, ``conv_weight`` and (with ``global_decay``) ``decay_logit`` on ``layer``."""
        self.layer = layer
        settings = layer.settings
        self.settings = settings
        weight = layer.q_proj.weight
        layer.global_scale = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device))
        layer.conv_weight = nn.Parameter(
            torch.zeros(layer.num_heads, settings.conv_taps, dtype=weight.dtype, device=weight.device)
        )
        layer.decay_logit = None
        if settings.global_decay:
            logits = initial_decay_logits(layer.num_kv_heads)
            layer.decay_logit = nn.Parameter(logits.to(dtype=weight.dtype, device=weight.device))

    @classmethod
    def for_layer(cls, layer) -> GroupedTerm | None:
        """The term, or None where the settings leave it out (``grouped_term`` false: the window is the layer)."""
        return cls(layer) if layer.settings.grouped_term else None

    def reset_parameters(self) -> None:
        """γ = 0, conv = 0 and the initial decays."""
        layer = self.layer
        with torch.no_grad():
            layer.global_scale.zero_()
            layer.conv_weight.zero_()
            if layer.decay_logit is not None:
                layer.decay_logit.copy_(initial_decay_logits(layer.num_kv_heads))

    def global_memory(self, dtype: torch.dtype) -> GlobalMemory | None:
        """How the ops keep S for these settings (None: the paper's plain sum). ``log λ`` in ``dtype``."""
        if not self.settings.global_decay and self.settings.global_norm == "none":
            return None
        decay_logit = self.layer.decay_logit
        log_decay = None if decay_logit is None else F.logsigmoid(decay_logit.to(dtype))
        return GlobalMemory(log_decay=log_decay, norm=self.settings.global_norm)

    def empty(self, batch: int, dtype: torch.dtype, device: torch.device) -> GroupedState:
        layer = self.layer
        state = empty_state(
            batch, layer.num_kv_heads, layer.head_dim, layer.head_dim,
            self.settings.group_size, self.settings.conv_taps, dtype, device,
        )  # fmt: skip
        return GroupedState.of(state)

    def _operands(self, x: TermInputs):
        """``(q̂, k̂, v, conv weight, γ, memory)`` in the compute dtype: what every op takes."""
        name = self.settings.feature_map
        q, k = feature_map(x.q, name), feature_map(x.k, name)
        weight = self.layer.conv_weight.to(q.dtype)
        gamma = self.layer.global_scale.to(q.dtype)
        return q, k, x.v, weight, gamma, self.global_memory(q.dtype)

    def chunked(self, x: TermInputs) -> torch.Tensor:
        q, k, v, weight, gamma, memory = self._operands(x)
        kernel = self.settings.in_group_kernel
        return chunked_attention(q, k, v, weight, gamma, self.settings.group_size, kernel, memory)

    def extend(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, GroupedState]:
        q, k, v, weight, gamma, memory = self._operands(x)
        now = state.slices[self.name].at(state.position)
        kernel = self.settings.in_group_kernel
        out, after = extend_attention(q, k, v, weight, gamma, now, x.token_mask, kernel, memory)
        return out, GroupedState.of(after)

    def step(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, GroupedState]:
        q, k, v, weight, gamma, memory = self._operands(x)
        now = state.slices[self.name].at(state.position)
        out, after = recurrent_step(q, k, v, weight, gamma, now, self.settings.in_group_kernel, memory)
        return out, GroupedState.of(after)

    def verify(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, KeptNodes]:
        q, k, v, weight, gamma, memory = self._operands(x)
        now = state.slices[self.name].at(state.position)
        kernel = self.settings.in_group_kernel
        out = verify_attention(q, k, v, weight, gamma, now, x.layout, kernel, memory)
        return out, KeptNodes(k, v, memory)

    def commit(self, state: LayerState, kept: KeptNodes, path: torch.Tensor, path_mask: torch.Tensor) -> GroupedState:
        return self.commit_layers([(self, state, kept)], path, path_mask)[0]

    @classmethod
    def commit_layers(
        cls, items: list[tuple[Term, LayerState, KeptNodes]], path: torch.Tensor, path_mask: torch.Tensor
    ) -> list[GroupedState]:
        """Every layer's slice after ``append_tokens`` of its accepted ``(k̂, v)``.

        Layers whose slices have the same shapes are stacked along the batch axis and appended in one call: per
        layer the append is a few dozen small tensor ops, whose fixed cost would otherwise be paid once per layer
        every round. Layers with decayed memories fold with their own λ, stacked as per-row decays.
        """
        batch = path.shape[0]
        stacks: dict[tuple, list[int]] = {}
        for index, (_, state, kept) in enumerate(items):
            memory = kept.memory
            kind = None if memory is None else (memory.norm, memory.eps, memory.log_decay is not None)
            part = state.slices[cls.name]
            shapes = (kept.keys.shape, kept.values.shape, *(t.shape for t in slice_tensors(part).values()), kind)
            stacks.setdefault(shapes, []).append(index)
        committed: list[GroupedState | None] = [None] * len(items)
        for members in stacks.values():
            states = [items[i][1] for i in members]
            kept = [items[i][2] for i in members]
            parts = [state.slices[cls.name] for state in states]
            shared = {name: _stacked([getattr(part, name) for part in parts]) for name in slice_tensors(parts[0])}
            now = LinearAttentionState(position=_stacked([state.position for state in states]), **shared)
            rows_path = path.repeat(len(members), 1)
            keys, values = (
                gather_tokens(_stacked([getattr(k, name) for k in kept]), rows_path) for name in ("keys", "values")
            )
            memory = _stacked_memory([k.memory for k in kept], batch)
            after = GroupedState.of(append_tokens(now, keys, values, path_mask.repeat(len(members), 1), memory))
            for j, index in enumerate(members):
                committed[index] = map_slice(after, lambda t, j=j: t[j * batch : (j + 1) * batch])
        return committed


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` joined along the batch axis; a layer on its own is used as it is, without the copy ``torch.cat``
    makes of a single tensor."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stacked_memory(memories: list[GlobalMemory | None], batch: int) -> GlobalMemory | None:
    """The memories of several layers stacked along the batch axis (each ``batch`` rows): one per-row decay
    ``(L·B, Hkv)`` when the layers decay, each row with its layer's λ; otherwise the first layer's (all equal)."""
    first = memories[0]
    if first is None or first.log_decay is None:
        return first
    log_decay = torch.stack([memory.log_decay for memory in memories]).repeat_interleave(batch, dim=0)  # (L·B, Hkv)
    return GlobalMemory(log_decay=log_decay, norm=first.norm, eps=first.eps)
