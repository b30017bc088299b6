"""``LinspecAttention``: augmented grouped linear attention as a drop-in for a model's softmax attention.

It adopts the pretrained module's own q/k/v/o projections (and Qwen3's q/k norms) — the same objects, so
state-dict names do not change — and adds two parameters: ``global_scale`` (γ) and ``conv_weight``
(``[num_attention_heads, conv_taps]``, ``conv_weight[h, j]`` multiplies ``v`` at ``t − j``). Both start at zero,
so a fresh conversion is local grouped attention only; training opens the global path and the conv. With
``global_decay`` it also has ``decay_logit`` (``[num_key_value_heads]``, λ = sigmoid(logit) per kv head: the
state, and so S, is stored per kv head). With ``local_kernel: softmax`` the in-group term is replaced by the
pretrained softmax over a sliding window with attention sinks (``linspec.ops.window``), computed from the RoPE'd
queries and keys before φ, with the module's own logit scale.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from linspec.config import LinspecConfig
from linspec.models import hf
from linspec.models.context import ExecutionContext
from linspec.ops import (
    LinearAttentionState,
    chunked_attention,
    empty_state,
    extend_attention,
    recurrent_step,
    verify_attention,
)
from linspec.ops.memory import GlobalMemory
from linspec.ops.window import (
    SoftmaxWindow,
    empty_window,
    window_attention,
    window_extend,
    window_step,
    window_verify,
)


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


class LinspecAttention(nn.Module):
    def __init__(self, softmax_attention: nn.Module, settings: LinspecConfig, rotary: nn.Module | None = None) -> None:
        """``rotary``: the decoder's rotary embedding, needed by adjacent sinks (their queries are rotated at a
        fixed position); held in a tuple so it stays the decoder's submodule, not a second copy of this layer's."""
        super().__init__()
        if settings.softmax_window and settings.sink_positions == "adjacent" and rotary is None:
            raise ValueError("adjacent sink positions need the decoder's rotary embedding")
        self._rotary = (rotary,)
        config = softmax_attention.config
        self.layer_idx = softmax_attention.layer_idx
        self.head_dim = softmax_attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.settings = settings
        self.q_proj = softmax_attention.q_proj
        self.k_proj = softmax_attention.k_proj
        self.v_proj = softmax_attention.v_proj
        self.o_proj = softmax_attention.o_proj
        self.scaling = float(getattr(softmax_attention, "scaling", self.head_dim**-0.5))
        self.q_norm = getattr(softmax_attention, "q_norm", None)
        self.k_norm = getattr(softmax_attention, "k_norm", None)
        weight = self.q_proj.weight
        self.global_scale = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device))
        self.conv_weight = nn.Parameter(
            torch.zeros(self.num_heads, settings.conv_taps, dtype=weight.dtype, device=weight.device)
        )
        self.softmax_heads = settings.heads_of(self.layer_idx)
        if any(head >= self.num_kv_heads for head in self.softmax_heads):
            raise ValueError(f"layer {self.layer_idx} has {self.num_kv_heads} kv heads; softmax_heads name others")
        self.decay_logit: nn.Parameter | None = None
        if settings.global_decay:
            logits = initial_decay_logits(self.num_kv_heads)
            self.decay_logit = nn.Parameter(logits.to(dtype=weight.dtype, device=weight.device))

    def reset_linspec_parameters(self) -> None:
        """γ = 0, conv = 0 and the initial decays: the state right after conversion."""
        with torch.no_grad():
            self.global_scale.zero_()
            self.conv_weight.zero_()
            if self.decay_logit is not None:
                self.decay_logit.copy_(initial_decay_logits(self.num_kv_heads))

    def global_memory(self, dtype: torch.dtype) -> GlobalMemory | None:
        """How the ops keep S for this layer's settings (None: the paper's plain sum). ``log λ`` in ``dtype``."""
        if not self.settings.global_decay and self.settings.global_norm == "none":
            return None
        log_decay = None if self.decay_logit is None else F.logsigmoid(self.decay_logit.to(dtype))
        return GlobalMemory(log_decay=log_decay, norm=self.settings.global_norm)

    def softmax_window(self) -> SoftmaxWindow | None:
        """The local softmax window's settings, or None for the in-group κ term."""
        if not self.settings.softmax_window:
            return None
        return SoftmaxWindow(self.settings.local_window, self.settings.sink_tokens, self.scaling)

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D], sink_q)``: projections, q/k norms and RoPE,
        before φ; 16-bit inputs upcast to float32 (the running sums in the state must not round at every token).
        ``sink_q`` is every query rotated at the window's position ``P`` when the sinks are adjacent, else None."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        sink_q = None
        window = self.softmax_window()
        if window is not None and self.settings.sink_positions == "adjacent":
            cos_at, sin_at = self._rotation_at(window.last_true_position, q)
            sink_q = q * cos_at + hf.rotate_half(q) * sin_at
        cos, sin = position_embeddings
        q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        sink_q = None if sink_q is None else sink_q.to(compute)
        return q.to(compute), k.to(compute), v.to(compute), sink_q

    def _rotation_at(self, position: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of the decoder's rotary embedding at one fixed ``position``, ``[1, 1, 1, D]``; computed
        once per dtype, device and rotary frequencies (a dynamic RoPE that rescales them gets fresh ones), since
        every forward of every layer needs them on the decode path."""
        rotary = self._rotary[0]
        frequencies = rotary.inv_freq
        key = (position, like.dtype, like.device, frequencies.data_ptr(), frequencies._version)
        cached = getattr(self, "_rotation_cache", None)
        if cached is None or cached[0] != key:
            cos, sin = rotary(like, torch.full((1, 1), position, device=like.device))
            cached = (key, (cos[:, None], sin[:, None]))
            self._rotation_cache = cached
        return cached[1]

    def empty_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> LinearAttentionState:
        """This layer's state before any token (with the window fields when it has a softmax window)."""
        state = empty_state(
            batch, self.num_kv_heads, self.head_dim, self.head_dim,
            self.settings.group_size, self.settings.conv_taps, dtype, device,
        )  # fmt: skip
        window = self.softmax_window()
        if window is None:
            return state
        fields = empty_window(batch, self.num_kv_heads, self.head_dim, self.head_dim, window, dtype, device)
        return replace(state, **fields)

    def _head_indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv heads, their query heads)`` of ``softmax_heads`` as index tensors on ``device``, made once: the
        decode path needs them in every step."""
        cached = getattr(self, "_head_index_cache", None)
        if cached is None or cached[0].device != device:
            repeats = self.num_heads // self.num_kv_heads
            kv_index = torch.tensor(self.softmax_heads, device=device)
            q_index = (kv_index[:, None] * repeats + torch.arange(repeats, device=device)).flatten()
            cached = (kv_index, q_index)
            self._head_index_cache = cached
        return cached

    def _with_softmax_heads(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``out`` with the query heads of ``softmax_heads`` replaced by full softmax attention (RoPE'd ``q``/``k``,
        the module's own scale), exactly what a softmax layer computes for them.

        Their keys and values live in the cache's KV layer for this layer (``LinspecCache.append_head_kv``), so
        speculative verification, commit, row selection and repacking treat them as a softmax layer's columns;
        ``attention_mask`` is the one the model (or ``ModelRunner``) builds for its softmax layers — padding, tree
        ancestry and each row's own columns — and a missing mask means plain causal attention.
        """
        repeats = self.num_heads // self.num_kv_heads
        kv_index, q_index = self._head_indices(q.device)
        keys, values = k[:, kv_index], v[:, kv_index]
        if cache is not None:
            keys, values = cache.append_head_kv(self.layer_idx, keys, values)
        length, columns = q.shape[2], keys.shape[2]
        mask = None  # no mask and no past columns: SDPA's own causal kernel (training, full forwards)
        if attention_mask is not None:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(q.dtype)
        elif columns != length:
            mask = torch.ones(length, columns, dtype=torch.bool, device=q.device).tril(columns - length)
        attended = F.scaled_dot_product_attention(
            q[:, q_index],
            keys.repeat_interleave(repeats, dim=1),
            values.repeat_interleave(repeats, dim=1),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scaling,
        )
        out = out.clone()
        out[:, q_index] = attended.to(out.dtype)
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        linspec_context: ExecutionContext | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """The mode follows from the cache and ``linspec_context`` (see ``linspec.models.context``):

        no cache and no padding → chunked; a tree in the context → verify (the state is read, not changed, and
        the candidates' ``(k̂, v)`` are kept for the commit); one real token → recurrent; otherwise → extend.
        """
        cache = hf.pop_cache(kwargs)
        context = linspec_context or ExecutionContext()
        batch, length, _ = hidden_states.shape
        raw_q, raw_k, v, sink_q = self.project(hidden_states, position_embeddings)
        q, k = feature_map(raw_q, self.settings.feature_map), feature_map(raw_k, self.settings.feature_map)
        weight = self.conv_weight.to(q.dtype)
        gamma = self.global_scale.to(q.dtype)
        window = self.softmax_window()
        local_kernel = "none" if window is not None else self.settings.local_kernel
        memory = self.global_memory(q.dtype)

        if cache is None and context.tree is None and context.all_real:
            out = chunked_attention(q, k, v, weight, gamma, self.settings.group_size, local_kernel, memory)
            if window is not None:
                out = out + window_attention(raw_q, raw_k, v, window, sink_q)
        else:
            state = None if cache is None else cache.linear_state(self.layer_idx)
            if state is None:
                state = self.empty_state(batch, q.dtype, q.device)
            window_out = None
            if context.tree is not None:
                out = verify_attention(q, k, v, weight, gamma, state, context.tree.layout, local_kernel, memory)
                if window is not None:
                    window_out = window_verify(raw_q, raw_k, v, state, context.tree.layout, window, sink_q)
                context.tree.keep(self.layer_idx, k, v, memory, raw_k if window is not None else None)
                new_state = state
            else:
                decoding = length == 1 and context.all_real
                if window is not None and decoding:
                    window_out, state = window_step(raw_q, raw_k, v, state, window, sink_q)
                elif window is not None:
                    window_out, state = window_extend(raw_q, raw_k, v, state, window, context.token_mask, sink_q)
                if decoding:
                    out, new_state = recurrent_step(q, k, v, weight, gamma, state, local_kernel, memory)
                else:
                    out, new_state = extend_attention(
                        q, k, v, weight, gamma, state, context.token_mask, local_kernel, memory
                    )
            if window_out is not None:
                out = out + window_out
            if cache is not None:
                cache.set_linear_state(self.layer_idx, new_state)
        if self.softmax_heads:
            out = self._with_softmax_heads(out, raw_q, raw_k, v, cache, attention_mask)
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, length, -1)  # (B, T, H*D)
        return self.o_proj(out), None
