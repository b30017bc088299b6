"""Causal-LM classes of linspec models: Llama, Mistral, Qwen2 and Qwen3 with linearized attention.

This file only points `transformers` at the classes of the installed `linspec` package (`pip install linspec`),
so a model loaded with `trust_remote_code=True` runs the same code as `linspec.load`. Written by linspec 0.1.0.
"""

from linspec.models.modeling import (
    LinspecLlamaForCausalLM,
    LinspecMistralForCausalLM,
    LinspecQwen2ForCausalLM,
    LinspecQwen3ForCausalLM,
)

__all__ = [
    "LinspecLlamaForCausalLM",
    "LinspecMistralForCausalLM",
    "LinspecQwen2ForCausalLM",
    "LinspecQwen3ForCausalLM",
]
