"""``LinspecAttention``: augmented grouped linear attention as a drop-in for a model's softmax attention.

It adopts the pretrained module's own q/k/v/o projections (and Qwen3's q/k norms) — the same objects, so
state-dict names do not change — and sums the terms its settings ask for (``linspec.models.terms``): the grouped
linear attention (the in-group κ, the global memory and the conv; its parameters ``global_scale``,
``conv_weight`` and with ``global_decay`` ``decay_logit`` live on this module under those names), with
``local_kernel: softmax`` the softmax window in the in-group κ's place (with ``memory_feature_map`` its far
memory too, parameters ``memory_bias`` and ``memory_feature_map_q``/``_k``), and the softmax heads of
``softmax_heads``. Each forward projects once, decides the mode once and runs that mode in every term.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from linspec.config import LinspecConfig
from linspec.models import hf
from linspec.models.context import ExecutionContext, Mode, window_size_override
from linspec.models.terms import layer_terms
from linspec.models.terms.base import LayerState, TermInputs
from linspec.ops.window import SoftmaxWindow
from linspec.utils.threads import on_calling_thread


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
        # Whether the window reads its far memory (``memory_feature_map``); off only inside the ablation that
        # measures the window without it (``linspec.evaluation.perplexity.ablated``), which still folds the memory.
        self.far_memory_on = True
        self.terms = layer_terms(self)

    def reset_linspec_parameters(self) -> None:
        """Every term's parameters as right after conversion (γ = 0, conv = 0, the initial decays, the far
        memory's identity maps and initial bias)."""
        for term in self.terms:
            term.reset_parameters()

    def softmax_window(self) -> SoftmaxWindow | None:
        """The local softmax window's settings, or None for the in-group κ term; its size is a training-time
        override's while one is active (``linspec.models.context.window_size``)."""
        if not self.settings.softmax_window:
            return None
        size = window_size_override() or self.settings.local_window
        return SoftmaxWindow(size, self.settings.sink_tokens, self.scaling)

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
        every forward of every layer needs them on the decode path. Ones made in inference mode are not reused
        outside it (autograd refuses inference tensors)."""
        rotary = self._rotary[0]
        frequencies = rotary.inv_freq
        inference = torch.is_inference_mode_enabled()
        key = (position, like.dtype, like.device, frequencies.data_ptr(), frequencies._version, inference)
        cached = getattr(self, "_rotation_cache", None)
        if cached is None or cached[0] != key:
            cos, sin = rotary(like, torch.full((1, 1), position, device=like.device))
            cached = (key, (cos[:, None], sin[:, None]))
            self._rotation_cache = cached
        return cached[1]

    def empty_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> LayerState:
        """This layer's state before any token: position 0 and each term's empty slice."""
        slices = {term.name: term.empty(batch, dtype, device) for term in self.terms}
        position = torch.zeros(batch, dtype=torch.long, device=device)
        return LayerState(position, {name: part for name, part in slices.items() if part is not None})

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        linspec_context: ExecutionContext | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """The mode follows from the cache and ``linspec_context`` (``ExecutionContext.mode``); every term runs in
        it and the output is their sum."""
        cache = hf.pop_cache(kwargs)
        context = linspec_context or ExecutionContext()
        batch, length, _ = hidden_states.shape
        mode = context.mode(length, cached=cache is not None)
        q, k, v, sink_q = self.project(hidden_states, position_embeddings)
        layout = None if context.tree is None else context.tree.layout
        x = TermInputs(q, k, v, sink_q, context.token_mask, layout, attention_mask, cache)
        if mode is Mode.CHUNKED:
            outputs = [term.chunked(x) for term in self.terms]
        else:
            outputs = self._on_state(mode, x, context, cache)
        out = self._sum(outputs, q.device)
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, length, -1)  # (B, T, H*D)
        return self.o_proj(out), None

    def _on_state(self, mode: Mode, x: TermInputs, context: ExecutionContext, cache) -> list[torch.Tensor]:
        """Every term's output on the cache's state (an empty one without a cache, or before the first token).
        Extend and step store the terms' new slices with ``position`` advanced once, here, after all of them;
        verify keeps what each term's commit needs in the tree and changes nothing."""
        state = None if cache is None else cache.linear_state(self.layer_idx)
        if state is None:
            state = self.empty_state(x.q.shape[0], x.q.dtype, x.q.device)
        if mode is Mode.VERIFY:
            results = [(term, *term.verify(x, state)) for term in self.terms]
            context.tree.keep(self.layer_idx, {term: kept for term, _, kept in results if kept is not None})
        elif mode is Mode.STEP:
            x = replace(x, state_writable=_writable(state))
            # one row's step is a chain of ops too small to share between threads; several rows' reads are not
            with on_calling_thread(x.q.device.type == "cpu" and x.q.shape[0] == 1):
                results = [(term, *term.step(x, state)) for term in self.terms]
        else:
            results = [(term, *term.extend(x, state)) for term in self.terms]
        if mode is not Mode.VERIFY:
            real = x.q.shape[2] if x.token_mask is None else x.token_mask.bool().sum(dim=1)  # new real tokens per row
            state = state.advanced({term.name: part for term, _, part in results if part is not None}, real)
        if cache is not None:
            cache.set_linear_state(self.layer_idx, state)
        return [out for _, out, _ in results]

    def _sum(self, outputs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The terms' outputs summed in their order; a term that answers for some query heads alone replaces the
        sum on those heads."""
        total = None
        alone = []
        for term, out in zip(self.terms, outputs, strict=True):
            heads = term.query_heads(device)
            if heads is not None:
                alone.append((heads, out))
            else:
                total = out if total is None else total + out
        if alone:
            total = total.clone()
            for heads, out in alone:
                total[:, heads] = out.to(total.dtype)
        return total


def _writable(state: LayerState) -> bool:
    """Whether a decode step may write into ``state``'s tensors (the state its layer replaces in the cache, or a
    fresh one): with autograd off, and for inference tensors only inside inference mode (PyTorch refuses to
    update them in place outside it)."""
    if torch.is_grad_enabled():
        return False
    return torch.is_inference_mode_enabled() or not any(t.is_inference() for t in state.tensors().values())
