"""``convert``: a pretrained softmax-attention causal LM in, a linspec model out, pretrained weights reused."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from linspec.config import LinspecConfig
from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.modeling import ARCHITECTURES


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def linspec_classes_for(model_type: str) -> tuple[type, type]:
    """``(config class, model class)`` for a base ``model_type``; a clear error names the supported ones."""
    if model_type not in ARCHITECTURES:
        raise LinspecError(
            f"unsupported architecture {model_type!r}; linspec converts: {', '.join(supported_architectures())}"
        )
    return ARCHITECTURES[model_type]


def _set_tensor(module: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    *path, name = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    if name in module._buffers:
        module._buffers[name] = tensor
    else:
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def convert(model: PreTrainedModel, config: LinspecConfig | None = None) -> PreTrainedModel:
    """Return a linspec model built around ``model``'s weights (shared, not copied): q/k/v/o, norms, MLPs, head.

    New parameters start at γ = 0 and conv = 0 (docs/design.md §2), decays (if any) at their initial horizons. Softmax
    layers listed in ``config.softmax_layers`` keep the model's own attention. ``model`` should not be used
    afterwards: the result shares its tensors.
    """
    if not isinstance(model, PreTrainedModel):
        raise LinspecError(
            f"convert takes a loaded transformers model (linspec.load or from_pretrained), got {type(model).__name__}"
        )
    if config is not None and not isinstance(config, LinspecConfig):
        raise LinspecError(
            f"config must be a LinspecConfig (e.g. LinspecConfig.from_preset('window')), got {type(config).__name__}"
        )
    settings = config or LinspecConfig()
    base_config = model.config
    if getattr(base_config, "linspec", None) is not None:
        raise LinspecError("this model is already a linspec model; convert its softmax parent instead")
    if getattr(model, "hf_quantizer", None) is not None or getattr(base_config, "quantization_config", None):
        raise LinspecError("the model is still flagged as quantized; load a float copy (see linspec.sources.loading)")
    config_class, model_class = linspec_classes_for(base_config.model_type)
    settings.check_model(base_config)
    linspec_config = config_class.from_base(base_config, settings)
    hf.copy_attention_implementation(base_config, linspec_config)

    with torch.device("meta"):
        converted = model_class(linspec_config)
    result = converted.load_state_dict(model.state_dict(), strict=False, assign=True)
    if result.unexpected_keys:
        raise LinspecError(f"weights without a place in the linspec model: {result.unexpected_keys[:4]}")
    for name, buffer in model.named_buffers():  # includes non-persistent ones such as RoPE's inv_freq
        _set_tensor(converted, name, buffer)
    reference = next(model.parameters())
    for name, parameter in converted.named_parameters():
        if parameter.is_meta:  # the new linspec parameters, absent from the softmax model
            _set_tensor(converted, name, torch.zeros(parameter.shape, dtype=reference.dtype, device=reference.device))
    for module in converted.linspec_modules():
        module.reset_linspec_parameters()
    converted.tie_weights()
    converted.generation_config = model.generation_config
    converted.train(model.training)
    leftover = [n for n, t in [*converted.named_parameters(), *converted.named_buffers()] if t.is_meta]
    if leftover:
        raise LinspecError(f"conversion left uninitialised tensors: {leftover[:4]}")
    return converted
