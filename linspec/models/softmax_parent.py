"""The output a linear layer's softmax parent would give, computed from the layer's own pretrained weights.

A ``LinspecAttention`` keeps its parent's q/k/v/o (and q/k norms), so the original causal softmax attention can be
recomputed from the same input without keeping a copy of the original model. Attention transfer trains every
linear layer towards this output, and layer ranking swaps it in to measure a layer kept softmax; both read it here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.models import hf
from linspec.models.attention import LinspecAttention


def _frozen(projection: torch.nn.Module) -> torch.nn.Module:
    """The pretrained projection: the ``base_layer`` under a peft LoRA wrapper, else the module itself."""
    return getattr(projection, "base_layer", projection)


def parent_projections(
    module: LinspecAttention, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D])`` of the parent: pretrained projections and q/k
    norms, before RoPE (attention transfer on the far memory rotates them itself, sink queries included)."""
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, module.head_dim)
    q = _frozen(module.q_proj)(hidden_states).view(shape)
    k = _frozen(module.k_proj)(hidden_states).view(shape)
    v = _frozen(module.v_proj)(hidden_states).view(shape).transpose(1, 2)
    if module.q_norm is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v


def softmax_attention(
    module: LinspecAttention, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``[B, T, hidden]``: the original causal softmax attention with the module's pretrained weights."""
    batch, length, _ = hidden_states.shape
    q, k, v = parent_projections(module, hidden_states)
    cos, sin = position_embeddings
    q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=module.num_heads != module.num_kv_heads)
    return _frozen(module.o_proj)(out.transpose(1, 2).reshape(batch, length, -1))


def softmax_output_of_call(module: LinspecAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """``softmax_attention`` for the inputs of one call of ``module``, as a forward hook (with kwargs) sees them."""
    return softmax_attention(module, *hf.attention_call_inputs(args, kwargs))
