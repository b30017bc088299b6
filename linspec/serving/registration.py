"""The ``vllm.general_plugins`` entry point: tells vLLM which class serves each linspec architecture.

vLLM calls it in every process it starts (front end, engine core, workers), possibly more than once, so it only
registers names. The names are the ``architectures`` a converted model's ``config.json`` carries (the causal-LM
class names of ``linspec.models.modeling``); importing that module also registers linspec's configs with
transformers' ``AutoConfig``, which is how vLLM reads a converted directory without remote code.
"""

from __future__ import annotations

MODEL_CLASS = "linspec.serving.model:LinspecForCausalLM"


def architectures() -> list[str]:
    """The ``architectures`` names of every linspec causal LM, as a saved ``config.json`` spells them."""
    from linspec.models.modeling import ARCHITECTURES

    return [model_class.__name__ for _, model_class in ARCHITECTURES.values()]


def register() -> None:
    """Register every linspec architecture with vLLM (idempotent); the model class is imported lazily by vLLM.

    Each architecture also gets vLLM's configuration hook for models with constant-size state (it sets the state
    block size and turns prefix caching's state mode off when prefix caching is off), which vLLM applies only to
    architectures in its own table.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    for name in architectures():
        ModelRegistry.register_model(name, MODEL_CLASS)
        MODELS_CONFIG_MAP[name] = MambaModelConfig
