"""Native linspec model classes, one config + causal-LM pair per supported architecture.

Each class is the architecture's own Hugging Face class with its softmax attention swapped, per instance, for
``LinspecAttention`` in every layer not kept as softmax. ``import linspec`` registers them with ``AutoConfig``
and ``AutoModelForCausalLM``, so a converted directory loads with no remote code in such a process.

Every save also writes what loads the model where linspec was never imported: ``auto_map`` in ``config.json``
and the remote-code files it names (``linspec.models.remote_code``), used with ``trust_remote_code=True``; and
a model card when the directory has none (``linspec.models.publish``, which also owns ``push_to_hub``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from linspec.config import LinspecConfig
from linspec.models import hf
from linspec.models.attention import LinspecAttention
from linspec.models.cache import LinspecCache
from linspec.models.context import ExecutionContext
from linspec.models.publish import base_model_origin, push_to_hub, save_and_push, write_card_if_absent
from linspec.models.remote_code import auto_map, write_remote_code

# Keys of a base config's dict that describe the file, not the model; a linspec config sets its own.
_NON_MODEL_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "quantization_config")


class _WritesOwnRemoteCode:
    """transformers' generic remote-code save (``register_for_auto_class``, called when a class is loaded with
    ``trust_remote_code=True``) would copy ``linspec/models/modeling.py`` into every later save and point
    ``auto_map`` at that copy; linspec writes its own shims instead (``linspec.models.remote_code``)."""

    @classmethod
    def register_for_auto_class(cls, auto_class: str | None = None) -> None:
        return None


class LinspecConfigMixin(_WritesOwnRemoteCode):
    """Adds ``linspec`` (the ``LinspecConfig`` as a dict), ``base_model_type`` and ``base_model_name_or_path`` (the
    parent a model card names) to an architecture's config, and the remote code to every save of it."""

    @classmethod
    def from_base(cls, base_config, settings: LinspecConfig):
        data = {k: v for k, v in base_config.to_dict().items() if k not in _NON_MODEL_KEYS}
        data.pop("dtype", None)
        origin = base_model_origin(data.get("_name_or_path"))
        return cls(
            **data,
            linspec=settings.to_dict(),
            base_model_type=base_config.model_type,
            base_model_name_or_path=origin,
        )

    @property
    def linspec_settings(self) -> LinspecConfig:
        return LinspecConfig.from_dict(self.linspec or {})

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """The config, with ``auto_map`` and the remote-code files beside it (uploaded too with ``push_to_hub``)."""
        if push_to_hub:
            return save_and_push(self.save_pretrained, save_directory, **kwargs)
        config_class, model_class = linspec_classes_of(self)
        self.auto_map = auto_map(config_class, model_class)
        os.makedirs(save_directory, exist_ok=True)
        write_remote_code(save_directory, list(ARCHITECTURES.values()))
        return super().save_pretrained(save_directory, **kwargs)


class LinspecCausalLMMixin(_WritesOwnRemoteCode, hf.OwnGenerationCache):
    """Behaviour shared by every linspec causal LM: the attention swap, the recurrent cache (``generate`` decodes
    with ``new_cache()``), the padding mask, and saves that carry their remote code and card."""

    def __init__(self, config) -> None:
        super().__init__(config)
        settings = config.linspec_settings
        layers = hf.decoder_layers(self)
        settings.check_layers(len(layers))
        rotary = hf.rotary_embedding(self)
        for index, layer in enumerate(layers):
            if index not in settings.softmax_layers:
                hf.set_attention(layer, LinspecAttention(hf.attention_of(layer), settings, rotary))

    def _init_weights(self, module) -> None:
        if isinstance(module, LinspecAttention):
            module.reset_linspec_parameters()
            return
        super()._init_weights(module)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, push_to_hub: bool = False, **kwargs: Any):
        """transformers' save (weights, config with ``auto_map``, remote code), then the model card when the
        directory has none. ``push_to_hub=True`` uploads what the save wrote (``linspec.models.publish``)."""
        if push_to_hub:
            return save_and_push(lambda directory, **rest: self.save_pretrained(directory, *args, **rest),
                                 save_directory, **kwargs)  # fmt: skip
        super().save_pretrained(save_directory, *args, **kwargs)
        main_process = kwargs.get("is_main_process", args[0] if args else True)
        if main_process and not getattr(self, "_hf_peft_config_loaded", False):  # an adapter alone has no card
            write_card_if_absent(self, save_directory)
        return None

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload weights, config, remote code and the model card to the Hub repository ``repo_id``, keeping a
        card the repository already has; takes transformers' ``push_to_hub`` options."""
        return push_to_hub(self, repo_id, **kwargs)

    def linspec_modules(self) -> list[LinspecAttention]:
        return [m for m in self.modules() if isinstance(m, LinspecAttention)]

    def new_cache(self) -> LinspecCache:
        return LinspecCache.for_model_config(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        """The base forward, plus: a ``LinspecCache`` when caching, and the padding mask for linear layers.

        The cache may come as ``cache`` or ``past_key_values`` (either transformers release's name). Linear
        layers need to know which new columns are real tokens (padding must not enter their state); the 4-D
        mask Hugging Face builds for softmax layers does not say that reliably, so the 2-D mask's new columns
        travel down in the ``ExecutionContext`` (None when every column is real).
        """
        cache = hf.pop_cache(kwargs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.new_cache()
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            new_columns = attention_mask[:, -length:].bool()
            if not bool(new_columns.all()):
                token_mask = new_columns
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            linspec_context=ExecutionContext(token_mask=token_mask),
            **hf.cache_kwargs(cache),
            **kwargs,
        )
        if isinstance(cache, LinspecCache):
            cache.advance(length)
        return outputs


@strict
class LinspecLlamaConfig(LinspecConfigMixin, LlamaConfig):
    model_type = "linspec_llama"
    linspec: dict | None = None
    base_model_type: str = "llama"
    base_model_name_or_path: str | None = None


class LinspecLlamaForCausalLM(LinspecCausalLMMixin, LlamaForCausalLM):
    config_class = LinspecLlamaConfig


@strict
class LinspecMistralConfig(LinspecConfigMixin, MistralConfig):
    model_type = "linspec_mistral"
    linspec: dict | None = None
    base_model_type: str = "mistral"
    base_model_name_or_path: str | None = None


class LinspecMistralForCausalLM(LinspecCausalLMMixin, MistralForCausalLM):
    config_class = LinspecMistralConfig


@strict
class LinspecQwen2Config(LinspecConfigMixin, Qwen2Config):
    model_type = "linspec_qwen2"
    linspec: dict | None = None
    base_model_type: str = "qwen2"
    base_model_name_or_path: str | None = None


class LinspecQwen2ForCausalLM(LinspecCausalLMMixin, Qwen2ForCausalLM):
    config_class = LinspecQwen2Config


@strict
class LinspecQwen3Config(LinspecConfigMixin, Qwen3Config):
    model_type = "linspec_qwen3"
    linspec: dict | None = None
    base_model_type: str = "qwen3"
    base_model_name_or_path: str | None = None


class LinspecQwen3ForCausalLM(LinspecCausalLMMixin, Qwen3ForCausalLM):
    config_class = LinspecQwen3Config


# base model_type -> (linspec config class, linspec causal-LM class). SmolLM2 is a Llama.
ARCHITECTURES: dict[str, tuple[type, type]] = {
    "llama": (LinspecLlamaConfig, LinspecLlamaForCausalLM),
    "mistral": (LinspecMistralConfig, LinspecMistralForCausalLM),
    "qwen2": (LinspecQwen2Config, LinspecQwen2ForCausalLM),
    "qwen3": (LinspecQwen3Config, LinspecQwen3ForCausalLM),
}


def linspec_classes_of(config) -> tuple[type, type]:
    """``(config class, causal-LM class)`` of the linspec architecture ``config`` is (or subclasses)."""
    for config_class, model_class in ARCHITECTURES.values():
        if isinstance(config, config_class):
            return config_class, model_class
    raise TypeError(f"{type(config).__name__} is not a linspec config")


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` know the linspec types (idempotent)."""
    for config_class, model_class in ARCHITECTURES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


register_auto_classes()  # whoever builds or loads a linspec model has them known to the Auto classes
