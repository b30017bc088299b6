"""Register the linspec model classes with transformers' Auto classes once transformers is imported.

``import linspec`` has to stay cheap (the ``linspec`` command imports the package before it parses a flag, and
``linspec --help`` must not wait for torch), yet a process that ran ``import linspec`` expects
``AutoModelForCausalLM.from_pretrained(linspec_dir)`` to work without remote code. The classes cannot be
registered without importing transformers' model code (and so torch), so registration waits until transformers
is imported: at once if it already is, otherwise right after its import finishes (a one-shot import hook).

Importing ``linspec.models.modeling`` is what registers (its last line), so any path that builds a linspec model
registers too. When transformers is first imported by a linspec module that is itself still being imported, the
modeling module cannot be imported yet (it needs that half-built module), so registration waits for the linspec
import that is in progress to finish.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import sys
from types import ModuleType

_MODELING = "linspec.models.modeling"


def register_when_transformers_loads() -> None:
    """Register now when transformers is loaded, else as soon as it is (idempotent)."""
    if "transformers" in sys.modules:
        importlib.import_module(_MODELING)
    elif not any(isinstance(finder, _RegistrationHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistrationHook())


def _linspec_import_in_progress() -> bool:
    # ``__spec__._initializing`` is how the import system itself marks a module whose code is still running.
    return any(
        name.startswith("linspec.") and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """Watches the imports of transformers and of linspec's modules, and registers at the first moment both
    transformers is loaded and no linspec module is half-imported; then leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith("linspec."):
            return None
        position = sys.meta_path.index(self)
        for finder in sys.meta_path[position + 1 :]:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader, spec, self)
                return spec
        return None

    def try_to_register(self) -> None:
        if "transformers" not in sys.modules or self not in sys.meta_path:
            return
        if _MODELING not in sys.modules and _linspec_import_in_progress():
            return  # the linspec import under way calls again when it finishes
        sys.meta_path.remove(self)  # first: the imports below come back here
        if _MODELING not in sys.modules:
            # linspec cannot load here (e.g. no torch): leave transformers usable for everything else
            with contextlib.suppress(ImportError):
                importlib.import_module(_MODELING)


class _ThenRegister(importlib.abc.Loader):
    """The module's own loader, then a registration attempt; puts the own loader back on the spec."""

    def __init__(self, loader: importlib.abc.Loader, spec, hook: _RegistrationHook) -> None:
        self._loader = loader
        self._spec = spec
        self._hook = hook

    def create_module(self, spec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            self._spec.loader = self._loader
            module.__loader__ = self._loader
        self._spec._initializing = False  # this module is complete: it must not count as an import in progress
        self._hook.try_to_register()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)
