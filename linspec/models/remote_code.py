"""The remote code a saved linspec model carries, so ``transformers`` loads it where ``linspec`` was never imported.

Hugging Face's convention for a model class outside ``transformers`` is ``auto_map`` in ``config.json`` naming
``FILE.CLASS`` for ``AutoConfig`` and ``AutoModelForCausalLM``, with those files in the model directory; a user
opts in with ``trust_remote_code=True`` and ``transformers`` imports them.

The files written here are thin shims that re-export the classes of the installed ``linspec`` package, not a
copy of the package. Why:

- one definition of the model: a copy would freeze the attention, cache and kernels at the version that saved
  the model, and a fix in linspec would never reach a model already on the Hub; a shim always runs the
  installed code, the same code ``linspec.load`` and ``import linspec`` use.
- a clear message when linspec is missing: ``transformers`` checks a remote file's imports before running it
  and answers "This modeling file requires the following packages that were not found in your environment:
  linspec. Run `pip install linspec`" — the one thing such a user needs to do.
- a copy would have to carry ~20 modules (attention, cache, ops, Triton kernels) rewritten as relative imports,
  which ``transformers`` would flatten into its module cache — fragile and hard to review as "code you trust".

The same two files serve every architecture; ``auto_map`` picks the architecture's classes.
"""

from __future__ import annotations

import os
from pathlib import Path

from linspec.utils.io import atomic_write_text

CONFIG_MODULE = "configuration_linspec"
MODEL_MODULE = "modeling_linspec"
FILES = (f"{CONFIG_MODULE}.py", f"{MODEL_MODULE}.py")

_HEADER = '''"""{what} of linspec models: Llama, Mistral, Qwen2 and Qwen3 with linearized attention.

This file only points `transformers` at the classes of the installed `linspec` package (`pip install linspec`),
so a model loaded with `trust_remote_code=True` runs the same code as `linspec.load`. Written by linspec {version}.
"""

'''


def auto_map(config_class: type, model_class: type) -> dict[str, str]:
    """``config.json``'s ``auto_map`` for one architecture: where ``AutoConfig``/``AutoModelForCausalLM`` find it."""
    return {
        "AutoConfig": f"{CONFIG_MODULE}.{config_class.__name__}",
        "AutoModelForCausalLM": f"{MODEL_MODULE}.{model_class.__name__}",
    }


def _shim(what: str, defining_module: str, names: list[str]) -> str:
    from linspec import __version__

    lines = [_HEADER.format(what=what, version=__version__), f"from {defining_module} import (\n"]
    lines += [f"    {name},\n" for name in names]
    lines += [")\n", "\n", "__all__ = [\n", *[f'    "{name}",\n' for name in names], "]\n"]
    return "".join(lines)


def write_remote_code(directory: str | os.PathLike, classes: list[tuple[type, type]]) -> list[Path]:
    """Write the shim files re-exporting ``classes`` (``(config class, model class)`` pairs, all defined in one
    module) into ``directory``, each atomically; returns their paths."""
    directory = Path(directory)
    module = classes[0][0].__module__
    config_names = [config.__name__ for config, _ in classes]
    model_names = [model.__name__ for _, model in classes]
    written = []
    for filename, what, names in (
        (FILES[0], "Configuration classes", config_names),
        (FILES[1], "Causal-LM classes", model_names),
    ):
        path = directory / filename
        atomic_write_text(path, _shim(what, module, names))
        written.append(path)
    return written
