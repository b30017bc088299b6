"""Every contact between linspec and the internals of ``transformers``, in one module.

transformers renames its internals in minor releases: 5.24 renamed the cache keyword from ``past_key_values`` to
``cache`` in model forwards, decoder layers, attention modules, ``generate``'s model kwargs and model outputs,
deprecating the old name. linspec rides on those internals in a few places — the cache ``generate`` creates,
the keyword a cache travels under, ``generate``'s private cache hook, the decoder's modules (embedding, rotary
embedding, layers and their attention modules, final norm) that conversion, ranking, sharding and speculative
sessions reach, the config's attention implementation, the RoPE helper, the softmax KV tensors of a
``DynamicLayer`` — and every one of them goes through this module, so the next rename is a change here and nowhere
else (``tests/test_architecture.py`` fails on such a contact anywhere else).
``tests/test_hf_surface.py`` pins each contact for every supported architecture; ``.ci/run`` runs it on the locked
set, and ``.ci/compat`` on the oldest admitted transformers minor and on the newest versions the ranges admit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb, rotate_half

from linspec.errors import LinspecError

__all__ = [
    "CACHE_KEYWORD",
    "TESTED_TRANSFORMERS",
    "Cache",
    "DecoderParts",
    "DynamicLayer",
    "OwnGenerationCache",
    "append_kv",
    "apply_rotary_pos_emb",
    "attention_call_inputs",
    "attention_of",
    "cache_kwargs",
    "cache_layers",
    "copy_attention_implementation",
    "decoder_layers",
    "final_norm",
    "generation_cache",
    "kv_layers",
    "kv_tensors",
    "new_full_kv_cache",
    "new_kv_cache",
    "output_cache",
    "pop_cache",
    "progress_bars",
    "read_gguf_header",
    "rotary_embedding",
    "rotate_half",
    "route_softmax_attention",
    "set_activation_checkpointing",
    "set_attention",
    "set_generation_cache",
    "set_kv_tensors",
    "sliding_windows",
]

# The minor releases the whole suite passed with; pyproject's range ends right after the newest.
TESTED_TRANSFORMERS = ("5.19", "5.23", "5.24", "5.25")


def _cache_keyword() -> str:
    """The keyword this transformers release passes a cache under (its decoder layers' parameter name)."""
    parameters = inspect.signature(LlamaDecoderLayer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_KEYWORD = _cache_keyword()
# Every name a cache may arrive under: the current one first, then the deprecated one a caller may still use.
_CACHE_KEYWORDS = ("cache", "past_key_values")


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing of ``model`` on (non-reentrant) or off.

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns); 5.19, the release vLLM 0.32 pins, has only the old one. A peft model forwards either name to
    the model it wraps."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def cache_kwargs(cache: Cache | None) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to a model, decoder layer or attention module of this release."""
    return {CACHE_KEYWORD: cache}


def pop_cache(kwargs: dict[str, Any]) -> Cache | None:
    """Remove the cache from ``kwargs`` whichever name it came under (``cache`` or ``past_key_values``).

    linspec's own forwards accept both names, so a caller written for either release works, and nothing is
    forwarded under the deprecated name (which would warn, or on 5.24 silently be a second, unused cache).
    """
    found = [kwargs.pop(name) for name in _CACHE_KEYWORDS if name in kwargs]
    found = [cache for cache in found if cache is not None]
    if len(found) > 1 and found[0] is not found[1]:
        raise LinspecError("got two different caches (as `cache` and as `past_key_values`); pass one")
    return found[0] if found else None


def output_cache(outputs: Any) -> Cache | None:
    """The cache a model output carries (``outputs.cache`` from 5.24, ``outputs.past_key_values`` before)."""
    return outputs.get(CACHE_KEYWORD) if hasattr(outputs, "get") else getattr(outputs, CACHE_KEYWORD, None)


def generation_cache(model_kwargs: dict[str, Any]) -> Cache | None:
    """The cache ``generate`` keeps in its model kwargs (under either name, whichever the caller used)."""
    return next((model_kwargs[n] for n in _CACHE_KEYWORDS if model_kwargs.get(n) is not None), None)


def set_generation_cache(model_kwargs: dict[str, Any], cache: Cache) -> None:
    """Give ``generate`` the cache to decode with, under the name this release reads back."""
    for name in _CACHE_KEYWORDS:
        model_kwargs.pop(name, None)
    model_kwargs[CACHE_KEYWORD] = cache


class OwnGenerationCache:
    """Mixin for a causal-LM class whose ``generate`` decodes with a cache of its own making, ``self.new_cache()``.

    ``generate`` builds its cache in the private hook ``_prepare_cache_for_generation``; overriding it is the only
    way to hand it a cache class of our own without the caller passing one every time. A cache the caller passes
    (under either keyword) is kept, and any other cache implementation is refused rather than silently replaced.
    """

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
        if generation_cache(model_kwargs) is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by linspec "
                    "models; they use their own constant-size LinspecCache"
                )
            set_generation_cache(model_kwargs, self.new_cache())
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def new_kv_cache(config) -> Cache:
    """The ordinary growing-KV cache of a softmax model (what its own ``generate`` would build)."""
    return DynamicCache(config=config)


def new_full_kv_cache(num_layers: int) -> Cache:
    """A growing-KV cache with a full (never evicting) layer per decoder layer, whatever the config says."""
    return Cache(layers=[DynamicLayer() for _ in range(num_layers)])


def cache_layers(cache: Cache) -> list:
    """Every layer of a transformers cache, whatever its kind (full, sliding-window, linspec's linear state)."""
    return list(cache.layers)


def kv_layers(cache: Cache) -> list[DynamicLayer]:
    """The full-attention KV layers of ``cache`` (sliding-window and linear layers are other types)."""
    return [layer for layer in cache.layers if type(layer) is DynamicLayer]


def kv_tensors(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(keys, values)`` ``[B, Hkv, C, D]`` of a KV layer, or None before its first token."""
    keys = getattr(layer, "keys", None)
    if not getattr(layer, "is_initialized", False) or keys is None or keys.dim() != 4:
        return None
    return keys, layer.values


def append_kv(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append columns ``[B, Hkv, T, D]`` to a KV layer; every column so far comes back (``DynamicLayer.update``)."""
    return layer.update(keys, values)


def set_kv_tensors(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace a KV layer's tensors (a speculative commit keeps the accepted columns, a batch drops rows)."""
    layer.keys, layer.values = keys, values


def attention_call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(hidden_states, (cos, sin))`` of one attention-module call, as a forward hook with kwargs sees it
    (decoder layers pass the hidden states positionally or by name, the rotary embeddings by name)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return hidden, kwargs["position_embeddings"]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` of every supported architecture)."""
    return model.get_decoder().layers


def rotary_embedding(model) -> torch.nn.Module:
    """The decoder's rotary-embedding module, shared by every layer: ``(hidden, positions) -> (cos, sin)``."""
    return model.get_decoder().rotary_emb


def final_norm(model) -> torch.nn.Module:
    """The decoder's final norm, whose output is the hidden state the head reads."""
    return model.get_decoder().norm


def attention_of(layer: torch.nn.Module) -> torch.nn.Module:
    """The attention module of one decoder layer."""
    return layer.self_attn


def set_attention(layer: torch.nn.Module, attention: torch.nn.Module) -> None:
    """Put ``attention`` in place of a decoder layer's attention module."""
    layer.self_attn = attention


def copy_attention_implementation(source_config, target_config) -> None:
    """Give ``target_config`` the attention implementation (``sdpa``, ``eager``, ...) ``source_config`` runs with.

    transformers keeps the choice in the private ``_attn_implementation``, set when a model loads; a config built
    from another's dict would fall back to the default and the converted model's softmax layers would compute
    differently from their parent's.
    """
    target_config._attn_implementation = source_config._attn_implementation


def route_softmax_attention(config, name: str, function) -> None:
    """Make the softmax attention modules built on ``config`` compute their attention with ``function``.

    ``function(module, query [B, H, T, D], key [B, Hkv, T, D], value, attention_mask, **kwargs)`` returns
    ``(output [B, T, H, D], None)``; the modules keep their own projections, q/k norms, RoPE and output
    projection. It is registered with transformers' ``AttentionInterface`` under ``name`` and chosen through the
    config's private ``_attn_implementation`` (what an engine with its own attention kernel and KV store plugs
    in: the vLLM plugin's paged attention).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    config._attn_implementation = name


class DecoderParts:
    """The modules of a Llama-family decoder that speculative sessions drive directly.

    ``run_layer`` calls one decoder layer the way the model's own forward does, with the cache under this
    release's keyword and ``extra`` keyword arguments passed on to the attention module (linspec's execution
    context travels that way).
    """

    def __init__(self, model) -> None:
        decoder = model.get_decoder()
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, n)]
        if missing:
            raise LinspecError(
                f"{type(model).__name__} is not a Llama-family decoder (no {', '.join(missing)}); speculative "
                "generation supports linspec models and Llama, Mistral, Qwen2, Qwen3-style softmax models"
            )
        self._embed_tokens = decoder.embed_tokens
        self._layers = decoder.layers
        self._norm = decoder.norm
        self._rotary_emb = decoder.rotary_emb
        self.head = model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def hidden_size(self) -> int:
        return self._norm.weight.shape[0]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden]``: the input embeddings of ``tokens [B, T]``."""
        return self._embed_tokens(tokens)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm of ``hidden`` (what the head reads)."""
        return self._norm(hidden)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for ``positions [B, T]`` (each row's own positions)."""
        return self._rotary_emb(hidden, positions)

    def run_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        cache: Cache,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        out = self._layers[index](
            hidden,
            attention_mask=attention_mask,
            position_embeddings=rotary,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(cache),
            **extra,
        )
        return out[0] if isinstance(out, tuple) else out


def sliding_windows(config, num_layers: int) -> list[int | None]:
    """Per decoder layer, the sliding window its softmax attention masks with (None: full attention).

    Mistral windows every layer when ``sliding_window`` is set; Qwen2/Qwen3 name each layer's kind in
    ``layer_types``; Llama has no window.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window:
        return [None] * num_layers
    if layer_types is None:
        return [int(window)] * num_layers
    return [int(window) if kind == "sliding_attention" else None for kind in layer_types[:num_layers]]


def read_gguf_header(path: Path) -> tuple[int, list[tuple[str, int, int]], dict[str, Any]] | None:
    """``(data_start, [(tensor name, offset, nbytes)], metadata)`` of a GGUF file, read with transformers' own
    header reader (fast: it skips the vocabulary); None when this release has no such reader."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    except ImportError:
        return None
    header = GgufHeader.from_file(str(path))
    metadata, _ = read_gguf_metadata(str(path))
    return header.data_start, [(t.name, t.offset, t.nbytes) for t in header.tensors], metadata


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Hide transformers' (and huggingface_hub's) tqdm bars while active, when ``enabled`` is false.

    With ``enabled`` the user's global setting is left as it is. transformers' legacy GGUF loader calls ``tqdm``
    directly, ignoring that setting, so its module-level ``tqdm`` is pointed at the switchable one meanwhile.
    """
    from transformers.utils import logging as hf_logging

    if enabled:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()
