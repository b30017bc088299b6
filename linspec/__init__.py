"""linspec: linearize pretrained softmax-attention LLMs and generate fast.

The public names below load on first use (PEP 562), so ``import linspec`` — and with it the ``linspec`` command,
which answers ``--help`` before torch could even load — costs nothing. ``import linspec`` still registers the
linspec model classes with ``AutoConfig`` and ``AutoModelForCausalLM`` (as soon as transformers is imported,
see ``linspec.models.registration``), so a converted directory loads with
``AutoModelForCausalLM.from_pretrained(path)`` and no remote code.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from linspec.models.registration import register_when_transformers_loads

# public name -> the module that defines it
_EXPORTS = {
    "LinspecCache": "linspec.models.cache",
    "LinspecConfig": "linspec.config",
    "LinspecError": "linspec.errors",
    "convert": "linspec.conversion.convert",
    "load": "linspec.conversion.checkpoint",
    "supported_architectures": "linspec.conversion.convert",
    "Drafter": "linspec.speculative",
    "EarlyExitDrafter": "linspec.speculative",
    "HeadDrafter": "linspec.speculative",
    "ModelDrafter": "linspec.speculative",
    "PromptLookupDrafter": "linspec.speculative",
    "SpeculativeOutput": "linspec.speculative",
    "speculative_generate": "linspec.speculative",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'linspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(ModuleType):
    """Keeps public names meaning the function: a submodule named like a public name would otherwise bind the module
    over the function when it is imported."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
register_when_transformers_loads()
