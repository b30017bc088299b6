"""Where a model runs and in which precision: ``--device`` / ``--dtype`` for every command, ``device=`` / ``dtype=``
for the library.

``auto`` picks CUDA when it is present, else the CPU; the dtype ``auto`` is bfloat16 on a CUDA device that supports
it and float32 everywhere else — on CPUs bfloat16 prefill is several times slower than float32, so it is never
chosen there by default. linspec's linear attention runs its running sums in float32 whatever the weights' dtype.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from linspec.errors import LinspecError

if TYPE_CHECKING:  # torch loads only when a device or dtype is resolved, not when a parser is built
    import torch

# user-facing dtype name -> the torch attribute
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DEVICE_HELP = "auto (default: cuda when present, else cpu), cpu, cuda, cuda:N, mps"
DTYPE_HELP = "auto (default: bfloat16 on CUDA, float32 elsewhere), float32, bfloat16, float16"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A device that exists on this machine, or one clear error."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise LinspecError(f"unknown device {name!r}; use {DEVICE_HELP}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LinspecError(f"device {name!r}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LinspecError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise LinspecError(f"device {name!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise LinspecError(f"unsupported device {name!r}; use {DEVICE_HELP}")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: a name from ``DTYPES``, a ``torch.dtype``, or ``auto`` (see the module docstring)."""
    import torch

    if isinstance(name, torch.dtype):
        if name not in {getattr(torch, attribute) for attribute in DTYPES.values()}:
            raise LinspecError(f"dtype must be one of float32, bfloat16, float16; got {name}")
        return name
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise LinspecError(f"dtype must be auto or one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, DTYPES[name])


def placement(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"):
    """``(torch.device, torch.dtype)`` from user-facing names, validated together."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, the same on every command that loads a model."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
