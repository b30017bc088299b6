"""Kernel tests run Triton's interpreter on CPU tensors; the flag must be set before the kernels are defined.

``@triton.jit`` reads ``TRITON_INTERPRET`` when the kernel modules (``linspec.ops.triton.*``) are imported, which
happens lazily (the first time a call is dispatched to them), so setting it here at conftest import is early enough
even when the root conftest or another test module has already imported ``triton`` or ``linspec``.

``LINSPEC_KERNEL_DEVICE=cuda`` (what ``.ci/gpu`` sets, with ``TRITON_INTERPRET=0``) runs the same tests on compiled
kernels instead: every kernel entry point is wrapped to move its tensors to that device and its results back, so
each test builds its inputs and float64 references on the CPU as always and only the kernels run on the GPU.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1" if os.environ.get("LINSPEC_KERNEL_DEVICE", "cpu") == "cpu" else "0")

import pytest
import torch

pytest.importorskip("triton")

KERNEL_DEVICE = os.environ.get("LINSPEC_KERNEL_DEVICE", "cpu")

if KERNEL_DEVICE != "cpu" and not (KERNEL_DEVICE.startswith("cuda") and torch.cuda.is_available()):
    pytest.exit(f"LINSPEC_KERNEL_DEVICE={KERNEL_DEVICE}: no such CUDA device is visible", returncode=2)

# Every kernel entry point, by module: what the native mode wraps.
ENTRY_POINTS = {
    "chunked": ("chunked_attention", "grouped_terms"),
    "conv": ("causal_depthwise_conv",),
    "recurrent": ("recurrent_step",),
    "verify": ("verify_attention",),
    "readout": ("run_readout",),
}


def moved(value, device: str):
    """``value`` with every tensor inside it (tuples, lists, a state, a memory) moved to ``device``,
    differentiably."""
    from linspec.ops.memory import GlobalMemory
    from linspec.ops.state import LinearAttentionState

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, LinearAttentionState):
        return value.map(lambda t: t.to(device))
    if isinstance(value, GlobalMemory):
        return dataclasses.replace(value, log_decay=moved(value.log_decay, device))
    if isinstance(value, (tuple, list)):
        return type(value)(moved(x, device) for x in value)
    return value


def on_device(kernel, device: str):
    """``kernel`` run on ``device``: arguments moved there, results moved back to the CPU."""

    def run(*args, **kwargs):
        result = kernel(*moved(args, device), **{name: moved(x, device) for name, x in kwargs.items()})
        return moved(result, "cpu")

    return run


@pytest.fixture(autouse=True)
def kernels_on_the_test_device(monkeypatch):
    """In the native mode, every entry point runs on ``LINSPEC_KERNEL_DEVICE``; on the CPU nothing changes."""
    if KERNEL_DEVICE == "cpu":
        return
    import importlib

    for module_name, names in ENTRY_POINTS.items():
        module = importlib.import_module(f"linspec.ops.triton.{module_name}")
        for name in names:
            monkeypatch.setattr(module, name, on_device(getattr(module, name), KERNEL_DEVICE))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every ``torch.empty``/``empty_like`` during a test starts as NaN (or a huge int), so unwritten outputs fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


@pytest.fixture(autouse=True)
def fresh_fallback_warnings(monkeypatch):
    """The dispatch warns once per fallback reason and process; each test sees its own first warnings."""
    from linspec.ops import backend

    monkeypatch.setattr(backend, "_announced", set())


@pytest.fixture(autouse=True)
def interpreted_kernels():
    """Fail loudly if the kernels were built for a GPU (the flag came too late) rather than the interpreter — or,
    in the native mode, for the interpreter rather than the GPU."""
    from linspec.ops.triton.utils import interpreting

    if KERNEL_DEVICE == "cpu":
        assert interpreting(), "the kernel modules were imported before TRITON_INTERPRET=1 was set"
    else:
        assert not interpreting(), "the native kernel tests need TRITON_INTERPRET=0"
