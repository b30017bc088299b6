"""Backend selection: PyTorch for CPU tensors under ``auto``, overrides by env var, setter and context manager."""

from __future__ import annotations

import pytest
import torch

from linspec.ops import backend as backend_module
from linspec.ops.backend import backend, current_backend, set_backend, use_triton


@pytest.fixture(autouse=True)
def clean_backend(monkeypatch):
    monkeypatch.delenv("LINSPEC_BACKEND", raising=False)
    set_backend(None)
    yield
    set_backend(None)


def test_auto_sends_cpu_tensors_to_pytorch():
    assert current_backend() == "auto"
    assert not use_triton(torch.zeros(2))


def test_precedence_context_then_setter_then_env(monkeypatch):
    monkeypatch.setenv("LINSPEC_BACKEND", "triton")
    assert use_triton(torch.zeros(2))
    set_backend("torch")
    assert not use_triton(torch.zeros(2))
    with backend("triton"):
        assert use_triton(torch.zeros(2))
        with backend("torch"):
            assert not use_triton(torch.zeros(2))
        assert current_backend() == "triton"
    assert current_backend() == "torch"


def test_unknown_backend_is_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("cuda")
    monkeypatch.setenv("LINSPEC_BACKEND", "fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        use_triton(torch.zeros(2))


def test_forcing_triton_without_triton_installed_says_so(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    assert not use_triton(torch.zeros(2))
    with backend("triton"), pytest.raises(ImportError, match="pip install triton"):
        use_triton(torch.zeros(2))
