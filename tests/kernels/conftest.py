"""Kernel tests run Triton's interpreter on CPU tensors; the flag must be set before the kernels are defined.

``@triton.jit`` reads ``TRITON_INTERPRET`` when the kernel modules (``linspec.ops.triton.*``) are imported, which
happens lazily (the first time a call is dispatched to them), so setting it here at conftest import is early enough
even when the root conftest or another test module has already imported ``triton`` or ``linspec``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")


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
    """Fail loudly if the kernels were built for a GPU (the flag came too late) rather than the interpreter."""
    from linspec.ops.triton.utils import interpreting

    assert interpreting(), "the kernel modules were imported before TRITON_INTERPRET=1 was set"
