"""Which implementation runs the ops: PyTorch everywhere, Triton (``linspec.ops.triton``) for CUDA tensors.

The choice is made per call from the tensors, so one model can move between devices without reconfiguration.
``auto`` (the default) sends CUDA tensors to Triton when it is importable and everything else to PyTorch;
``torch`` and ``triton`` force one side. Precedence: the ``backend(name)`` context manager, then
``set_backend(name)``, then the ``LINSPEC_BACKEND`` environment variable. Forcing ``triton`` on CPU tensors runs
the kernels through Triton's interpreter — slow, and meant for tests.

The kernels implement the paper's global memory and in-group kernels only: a call with a decayed or normalised
``GlobalMemory`` (``linspec.ops.memory``) or without an in-group term (the ``window`` preset) runs on PyTorch
whatever the backend says, so every option works on every device.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from linspec.ops.kernel_fn import TRITON_LOCAL_KERNELS
from linspec.ops.memory import GlobalMemory, is_plain

BACKENDS = ("auto", "torch", "triton")

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("linspec_backend", default=None)
_process_wide: str | None = None


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def current_backend() -> str:
    """The backend in force for this context: scoped override, process-wide setting, env var, else ``auto``."""
    name = _scoped.get() or _process_wide or os.environ.get("LINSPEC_BACKEND") or "auto"
    return _checked(name.lower())


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process (``None`` returns to the env var / ``auto``)."""
    global _process_wide
    _process_wide = None if name is None else _checked(name)


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (context-local, so threads and tasks do not leak into each other)."""
    token = _scoped.set(_checked(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def use_triton(*tensors: torch.Tensor, memory: GlobalMemory | None = None, local_kernel: str = "relu2") -> bool:
    """True when these tensors should go to the Triton kernels under the current backend.

    Always False for a decayed or normalised ``memory`` or a ``local_kernel`` the kernels do not carry (PyTorch
    runs those).
    """
    name = current_backend()
    if name == "torch" or not is_plain(memory) or local_kernel not in TRITON_LOCAL_KERNELS:
        return False
    if name == "triton":
        if not triton_available():
            raise ImportError("LINSPEC_BACKEND=triton needs the triton package (pip install triton)")
        return True
    return triton_available() and all(t.is_cuda for t in tensors)
