"""Tiny converted models of each architecture the plugin serves, fast enough to start several engines per test: a
random-weight Llama, Qwen2 (q/k/v biases) or Qwen3 (q/k norms) with 4 query heads of 32 on 2 kv heads, the demo model's
tokenizer, converted by ``linspec convert`` with a 64-token window, then every linspec parameter (γ, conv, decays,
far memory) and every bias and norm given random values, so each one changes the tokens and a wrong slice of any of
them shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

WINDOW = 64
SIZES = dict(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention kernels take head sizes of 32 and up
    max_position_embeddings=4096,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False}),
}


def _randomized(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values where initialisation or conversion leaves constants: biases (zero), norms (one), γ and conv
    (zero), decays and far-memory parameters (their initial values)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32).to(tensor.dtype)
        if name.endswith("global_scale"):
            tensor = 0.5 + torch.rand((), generator=gen).to(tensor.dtype)
        elif name.endswith("conv_weight") or name.endswith(".bias"):
            tensor = 0.3 * noise
        elif name.endswith("norm.weight"):
            tensor = tensor + 0.2 * noise
        elif name.endswith(("decay_logit", "memory_bias", "memory_distance_exponent")):
            tensor = tensor + noise
        elif name.endswith(("memory_feature_map_q", "memory_feature_map_k")):
            tensor = tensor + 0.1 * noise
        out[name] = tensor.contiguous()
    return out


def build(arch: str, out: Path, tokenizer_dir: Path, *convert_flags: str, seed: int = 0, **overrides) -> Path:
    """A converted tiny ``arch`` model in ``out`` (``linspec convert`` with ``convert_flags``; ``overrides`` of
    the base config), randomized."""
    config_class, model_class, extra = BASES[arch]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    base = model_class(config_class(**{**SIZES, **extra, **overrides}, vocab_size=len(tokenizer))).eval()
    source = out.with_name(out.name + "-base")
    base.save_pretrained(source)
    tokenizer.save_pretrained(source)
    flags = ["--local-window", str(WINDOW), "--group-size", "16", "--conv-taps", "4", *convert_flags]
    subprocess.run([sys.executable, "-m", "linspec", "convert", str(source), str(out), *flags], check=True)
    weights = out / "model.safetensors"
    save_file(_randomized(load_file(weights), seed), weights, metadata={"format": "pt"})
    return out
