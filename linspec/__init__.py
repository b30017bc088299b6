"""linspec: linearize pretrained softmax-attention LLMs and generate fast.

``import linspec`` registers the linspec model classes with ``AutoConfig`` and ``AutoModelForCausalLM``, so a
converted directory loads with ``AutoModelForCausalLM.from_pretrained(path)`` and no remote code.
"""

from linspec.checkpoint import load
from linspec.config import LinspecConfig
from linspec.convert import convert, supported_architectures
from linspec.errors import LinspecError
from linspec.models.cache import LinspecCache
from linspec.models.modeling import register_auto_classes
from linspec.speculative import (
    Drafter,
    EarlyExitDrafter,
    HeadDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeOutput,
    speculative_generate,
)

register_auto_classes()

__all__ = ["LinspecCache", "LinspecConfig", "LinspecError", "convert", "load", "supported_architectures"]
__all__ += [
    "Drafter",
    "EarlyExitDrafter",
    "HeadDrafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SpeculativeOutput",
    "speculative_generate",
]
__version__ = "0.1.0"
