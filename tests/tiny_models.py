"""Tiny random models of every supported architecture, for fast tests that still run the real HF classes."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import linspec
from linspec.models import hf
from linspec.models.cache import new_cache_for

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": False}),  # q/k norms
}


def tiny_base(arch: str, seed: int = 0, **overrides):
    """A random softmax model of ``arch`` in eval mode."""
    config_class, model_class, extra = BASES[arch]
    torch.manual_seed(seed)
    return model_class(config_class(**{**COMMON, **extra, **overrides})).eval()


def randomize_linspec_parameters(model, seed: int = 0, scale: float = 0.3) -> None:
    """Give γ and the conv non-zero values so tests exercise the global path and the conv, not just local (layers
    without the grouped term have neither)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.linspec_modules():
            if getattr(module, "global_scale", None) is None:
                continue
            module.global_scale.fill_(0.5 + torch.rand((), generator=gen).item())
            module.conv_weight.copy_(scale * torch.randn(module.conv_weight.shape, generator=gen))


def tiny_linspec(arch: str = "llama", seed: int = 0, group_size: int = 8, conv_taps: int = 4, **settings):
    """A converted tiny model with random non-zero γ and conv."""
    model = linspec.convert(
        tiny_base(arch, seed), linspec.LinspecConfig(group_size=group_size, conv_taps=conv_taps, **settings)
    )
    randomize_linspec_parameters(model, seed)
    return model


def decode_one_by_one(model, tokens: torch.Tensor):
    """Logits ``[1, T, V]`` of plain cached decoding, one token per forward, and the cache afterwards."""
    cache = new_cache_for(model)
    logits = [
        model(tokens[:, i : i + 1], use_cache=True, **hf.cache_kwargs(cache)).logits[:, -1]
        for i in range(tokens.shape[1])
    ]
    return torch.stack(logits, 1), cache
