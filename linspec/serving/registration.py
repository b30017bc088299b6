"""The ``vllm.general_plugins`` entry point: tells vLLM which class serves each linspec architecture.

vLLM calls it in every process it starts (front end, engine core, workers), possibly more than once, so it only
registers names. The names are the ``architectures`` a converted model's ``config.json`` carries (the causal-LM
class names of ``linspec.models.modeling``), plus the one hybrids are served under
(``linspec.serving.architecture``); importing ``linspec.models.modeling`` also registers linspec's configs with
transformers' ``AutoConfig``, which is how vLLM reads a converted directory without remote code.
"""

from __future__ import annotations

MODEL_CLASS = "linspec.serving.model:LinspecForCausalLM"
HYBRID_MODEL_CLASS = "linspec.serving.model:LinspecHybridForCausalLM"


def architectures() -> list[str]:
    """The ``architectures`` names of every linspec causal LM, as a saved ``config.json`` spells them."""
    from linspec.models.modeling import ARCHITECTURES

    return [model_class.__name__ for _, model_class in ARCHITECTURES.values()]


def register() -> None:
    """Register every linspec architecture with vLLM (idempotent); the model classes are imported lazily by vLLM.

    Each architecture also gets its configuration hook (``linspec.serving.architecture``: vLLM's own for models
    with constant-size state, which sets the state block size and turns prefix caching's state mode off when
    prefix caching is off, and refuses speculative decoding), which vLLM applies only to architectures in its own
    table; each linspec model type gets the convertor that names hybrids apart.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS

    from linspec.models.modeling import ARCHITECTURES
    from linspec.serving.architecture import (
        HYBRID_ARCHITECTURE,
        HybridConfig,
        LinspecArchConfigConvertor,
        LinspecModelConfig,
    )

    for name in architectures():
        ModelRegistry.register_model(name, MODEL_CLASS)
        MODELS_CONFIG_MAP[name] = LinspecModelConfig
    ModelRegistry.register_model(HYBRID_ARCHITECTURE, HYBRID_MODEL_CLASS)
    MODELS_CONFIG_MAP[HYBRID_ARCHITECTURE] = HybridConfig
    for config_class, _ in ARCHITECTURES.values():
        MODEL_ARCH_CONFIG_CONVERTORS[config_class.model_type] = LinspecArchConfigConvertor
