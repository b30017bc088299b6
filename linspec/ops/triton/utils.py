"""Launch helpers shared by the kernels: block sizes, dot precision, device checks."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Largest tile along a head dimension. Tests lower it to exercise the loops over several blocks.
MAX_BLOCK = 64


# ``@triton.jit`` reads TRITON_INTERPRET when it decorates, i.e. when the kernel modules are imported (each imports
# this one first); the value seen then is the one that counts. Without a CUDA device compiled Triton cannot run
# at all, so the interpreter is the only way CPU tensors (tests, a forced backend) can reach the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether the kernels were built for Triton's interpreter (CPU tensors) rather than compiled (CUDA)."""
    return _INTERPRETED


def block(dim: int, cap: int | None = None) -> int:
    """A power-of-two tile covering ``dim`` (up to ``cap``), at least 16 because ``tl.dot`` needs 16."""
    return max(16, min(cap or MAX_BLOCK, triton.next_power_of_2(dim)))


def full_block(dim: int) -> int:
    """A power-of-two tile covering all of ``dim`` (at least 16)."""
    return max(16, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE products for fp32/fp64 inputs, as PyTorch's matmul does by default; tensor-core rate for half types."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def check_inputs(*tensors: torch.Tensor) -> None:
    """Raise one clear error when a tensor cannot reach the kernels (CPU without the interpreter, mixed devices)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not tensors[0].is_cuda and not interpreting():
        raise RuntimeError(
            "CPU tensors reach the Triton kernels only through the interpreter: set TRITON_INTERPRET=1 before "
            "the kernel modules (linspec.ops.triton.*) are imported, or use LINSPEC_BACKEND=torch"
        )


# Triton's own library functions (tl.zeros, tl.sum, tl.cdiv) are jitted when triton is first imported, and that
# often happens before TRITON_INTERPRET is set (torch._dynamo imports triton). The interpreter cannot call those,
# so the kernels use builtins plus ``total`` below, jitted here after the flag is settled. It reduces with
# tl.sum's own combine function, which the interpreter recognises and runs as one numpy sum.
@triton.jit
def _add(a, b):
    return a + b


_sum_combine = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def total(x, axis: tl.constexpr):
    """``tl.sum(x, axis)``, also when triton was imported before the interpreter flag was set."""
    return tl.reduce(x, axis, _sum_combine)
