"""The dispatch: PyTorch for CPU tensors under ``auto``, overrides by env var, setter and context manager, and for a
CUDA device the decision and its reason per op and setting — asked without a GPU, since ``route`` runs nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from linspec.config import PRESETS, LinspecConfig
from linspec.ops import backend as backend_module
from linspec.ops.backend import (
    SERVES,
    KernelFallbackWarning,
    backend,
    chunked_attention,
    current_backend,
    plan,
    route,
    set_backend,
)
from linspec.ops.memory import GlobalMemory
from linspec.ops.triton.capabilities import ATTENTION_OPS, FORWARD_ONLY, OPS

DECAYED = GlobalMemory(log_decay=torch.tensor([-0.1, -0.5]))
RECOMMENDED = GlobalMemory(log_decay=torch.tensor([-0.1, -0.5]), norm="mean")  # the stable and window presets'
KEY_NORMED = GlobalMemory(log_decay=torch.tensor([-0.1, -0.5]), norm="key")  # the one memory the kernels lack


@pytest.fixture(autouse=True)
def clean_backend(monkeypatch):
    monkeypatch.delenv("LINSPEC_BACKEND", raising=False)
    set_backend(None)
    yield
    set_backend(None)


def uses_triton(device: str = "cpu") -> bool:
    return route("chunked_attention", device).triton


def test_auto_sends_cpu_tensors_to_pytorch():
    assert current_backend() == "auto"
    assert not uses_triton()
    assert all(not r.triton and not r.fallback and "cpu tensors" in r.reason for r in plan(LinspecConfig(), "cpu"))


def test_precedence_context_then_setter_then_env(monkeypatch):
    monkeypatch.setenv("LINSPEC_BACKEND", "triton")
    assert uses_triton()
    set_backend("torch")
    assert not uses_triton()
    with backend("triton"):
        assert uses_triton()
        with backend("torch"):
            assert not uses_triton()
            assert not uses_triton("cuda") and not route("chunked_attention", "cuda").fallback  # asked for
        assert current_backend() == "triton"
    assert current_backend() == "torch"


def test_unknown_backend_or_op_is_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("cuda")
    with pytest.raises(ValueError, match="op must be one of"):
        route("softmax", "cuda")
    monkeypatch.setenv("LINSPEC_BACKEND", "fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        uses_triton()


def test_forcing_triton_without_triton_installed_says_so(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    assert not uses_triton()
    with backend("triton"), pytest.raises(ImportError, match="pip install triton"):
        uses_triton()


def test_cuda_without_triton_installed_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    chosen = route("recurrent_step", "cuda")
    assert not chosen.triton and chosen.fallback and "triton is not installed" in chosen.reason


@pytest.mark.parametrize("op", OPS)
def test_cuda_tensors_of_the_paper_and_the_recommended_memories_go_to_the_kernels(op):
    """The paper's plain sum, a decay, the "mean" normaliser and both, under every in-group kernel — "none" is
    the softmax window's layer, whose grouped term (memory and conv) the kernels serve."""
    memories = (None, GlobalMemory(), DECAYED, GlobalMemory(norm="mean"), RECOMMENDED)
    for memory in memories:
        for local_kernel in ("relu2", "identity", "none"):
            chosen = route(op, torch.device("cuda", 0), memory=memory, local_kernel=local_kernel)
            assert chosen.triton and not chosen.fallback, chosen


SETTINGS = [  # (memory, local_kernel, the setting the reason must name)
    (KEY_NORMED, "identity", "global_norm 'key'"),
    (GlobalMemory(norm="key"), "none", "global_norm 'key'"),
    (RECOMMENDED, "softmax", "local_kernel 'softmax'"),  # the ops name the window's layer "none"
]


@pytest.mark.parametrize("op", ATTENTION_OPS)
@pytest.mark.parametrize(("memory", "local_kernel", "setting"), SETTINGS)
def test_what_the_kernels_lack_runs_on_pytorch_with_the_setting_named(op, memory, local_kernel, setting):
    for name in ("auto", "triton"):
        with backend(name):
            chosen = route(op, "cuda", memory=memory, local_kernel=local_kernel)
        assert not chosen.triton and chosen.fallback, chosen
        assert setting in chosen.reason and "not implemented in the Triton kernels" in chosen.reason
    with backend("triton"):  # a forced triton on CPU tensors falls back the same way
        assert route(op, "cpu", memory=memory, local_kernel=local_kernel).fallback


def test_the_conv_runs_on_its_kernel_whatever_the_memory():
    assert route("causal_depthwise_conv", "cuda", memory=DECAYED, local_kernel="none").triton


@pytest.mark.parametrize("op", OPS)
def test_only_the_forward_only_kernels_hand_graphs_to_pytorch(op):
    chosen = route(op, "cuda", needs_grad=True)
    assert chosen.triton == (op not in FORWARD_ONLY)
    if op in FORWARD_ONLY:
        assert chosen.fallback and "forward-only" in chosen.reason


def test_plan_sends_every_op_of_the_window_preset_to_the_kernels():
    routes = {r.op: r for r in plan(LinspecConfig.from_preset("window"), "cuda")}
    assert set(OPS) == set(SERVES) and set(routes) == set(OPS) - {"run_readout"}  # no far memory: never read
    for op in routes:
        assert routes[op].triton and not routes[op].fallback, routes[op]
        assert str(routes[op]) == f"{op} ({SERVES[op]}) → Triton: CUDA tensors, and the kernels implement this call"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_plan_sends_a_preset_to_the_kernels_exactly_when_they_carry_its_settings(preset):
    settings = LinspecConfig.from_preset(preset)
    carried = settings.global_norm != "key"  # the one setting of a shipped preset the kernels lack
    for chosen in plan(settings, "cuda"):
        assert chosen.triton == (carried or chosen.op == "causal_depthwise_conv"), chosen
        if not chosen.triton:
            assert chosen.fallback and "global_norm 'key' is not implemented" in chosen.reason, chosen


def test_a_fallback_warns_once_with_its_reason_and_a_cpu_call_under_auto_not_at_all():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    q, k = q.abs(), k.abs()  # non-negative features: "key" divides by q̂ᵀz
    args = (q, k, v, torch.randn(2, 3, generator=gen), torch.tensor(0.5), 4, "relu2", KEY_NORMED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on CPU: PyTorch is the plan, nothing to say
        expected = chunked_attention(*args)
    with backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = chunked_attention(*args)
        second = chunked_attention(*args)
    assert torch.equal(first, expected) and torch.equal(second, expected)  # PyTorch ran
    assert [w.category for w in caught] == [KernelFallbackWarning]
    assert "chunked_attention (training and prefill) runs on PyTorch" in str(caught[0].message)
    assert "global_norm 'key' is not implemented in the Triton kernels" in str(caught[0].message)
