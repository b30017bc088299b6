"""Triton == PyTorch for every mode, through the public ops under ``backend("triton")`` (interpreted on CPU).

Forward results are compared with the float64 reference, gradients with float64 autograd of the PyTorch chunked
path; kernels run in float32, so tolerances are float32-sized and scaled by the expected magnitude. Outputs start
as NaN (``conftest.poisoned_outputs``), so any element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_cases import assert_close, assert_states_close, fresh_state, make_inputs

import linspec.ops.triton.chunked
import linspec.ops.triton.conv
import linspec.ops.triton.recurrent
import linspec.ops.triton.verify
from linspec.ops import (
    causal_depthwise_conv,
    chunked_attention,
    extend_attention,
    recurrent_step,
    reference_attention,
    tree_ancestors,
    verify_attention,
)
from linspec.ops.backend import KernelFallbackWarning, backend, grouped_terms, route
from linspec.ops.memory import GlobalMemory
from linspec.ops.triton import utils as kernel_utils
from linspec.ops.triton.capabilities import OPS

# (batch, heads, kv_heads, length, head_dim, group, taps)
CHUNK_SHAPES = [
    (1, 2, 2, 11, 16, 16, 4),  # T < G
    (2, 4, 2, 32, 32, 16, 8),  # T a multiple of G, batch > 1, GQA
    (1, 4, 2, 45, 16, 32, 9),  # partial last group, G = 32
    (2, 2, 1, 37, 16, 16, 40),  # taps reach back past two whole groups
]


@pytest.mark.parametrize("local_kernel", ["relu2", "identity"])
@pytest.mark.parametrize("shape", CHUNK_SHAPES)
def test_chunked_forward_and_gradients(shape, local_kernel):
    batch, heads, kv_heads, length, dim, group, taps = shape
    seed = zlib.crc32(repr((shape, local_kernel)).encode())
    inputs = make_inputs(batch, heads, kv_heads, length, dim, taps, seed=seed)
    inputs = [x.requires_grad_() for x in inputs]
    grad_out = torch.randn(batch, heads, length, dim)
    with backend("triton"):
        out = chunked_attention(*inputs, group, local_kernel)
    grads = torch.autograd.grad(out, inputs, grad_out)

    exact = [x.detach().double().requires_grad_() for x in inputs]
    expected = reference_attention(*exact, group, local_kernel)
    with backend("torch"):
        expected_grads = torch.autograd.grad(chunked_attention(*exact, group, local_kernel), exact, grad_out.double())
    assert_close(out, expected, "output")
    for name, grad, expected_grad in zip(["q", "k", "v", "conv_weight", "gamma"], grads, expected_grads, strict=True):
        assert expected_grad.abs().max() > 0 or name == "gamma", name  # the comparison means something
        assert_close(grad, expected_grad, f"d{name}")


def test_chunked_with_several_head_dim_tiles_and_distinct_value_dim(monkeypatch):
    """Head dims larger than one tile (loops over Dk/Dv blocks) and Dv != Dk."""
    monkeypatch.setattr(kernel_utils, "MAX_BLOCK", 16)
    q, k, v, w, gamma = make_inputs(1, 2, 1, 40, 32, 5, seed=3, value_dim=48)
    inputs = [x.requires_grad_() for x in (q, k, v, w, gamma)]
    grad_out = torch.randn(1, 2, 40, 48)
    with backend("triton"):
        out = chunked_attention(*inputs, 16)
    grads = torch.autograd.grad(out, inputs, grad_out)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    with backend("torch"):
        expected = chunked_attention(*exact, 16)
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    assert_close(out, expected, "output")
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, "grad")


def test_grouped_terms_with_initial_state():
    q, k, v, _, _ = make_inputs(2, 4, 2, 40, 16, 3, seed=5)
    initial_kv = torch.randn(2, 2, 16, 16)
    with backend("triton"):
        actual = grouped_terms(q, k, v, 16, "relu2", initial_kv)
    with backend("torch"):
        expected = grouped_terms(q.double(), k.double(), v.double(), 16, "relu2", initial_kv.double())
    assert actual[3] is None and expected[3] is None  # the paper's memory keeps no z
    for name, a, e in zip(["local", "global", "kv_through"], actual[:3], expected[:3], strict=True):
        assert_close(a, e, name)


def test_grouped_terms_keeps_autograd_by_handing_graphs_to_pytorch():
    q, k, v, _, _ = make_inputs(1, 2, 2, 20, 16, 3, seed=6)
    q.requires_grad_()
    with backend("triton"), pytest.warns(KernelFallbackWarning, match="grouped_terms kernel is forward-only"):
        local, *_ = grouped_terms(q, k, v, 16)
    assert local.grad_fn is not None


@pytest.mark.parametrize("with_history", [False, True])
def test_conv_forward_and_gradients(with_history):
    _, _, v, w, _ = make_inputs(2, 4, 2, 70, 16, 9, seed=7)  # 70 = one full 64-token tile and a partial one
    history = torch.randn(2, 2, 8, 16) if with_history else None
    inputs = [v, w] + ([history] if with_history else [])
    inputs = [x.requires_grad_() for x in inputs]
    with backend("triton"):
        out = causal_depthwise_conv(inputs[0], inputs[1], inputs[2] if with_history else None)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    with backend("torch"):
        expected = causal_depthwise_conv(exact[0], exact[1], exact[2] if with_history else None)
    assert_close(out, expected, "conv")
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, "conv grad")


def test_recurrent_steps_through_a_group_completion():
    """Rows at different positions (13 and 9 of G = 16); row 0 completes its group on the third step."""
    group, taps, steps = 16, 6, 5
    q, k, v, w, gamma = make_inputs(2, 4, 2, 13 + steps, 16, taps, seed=8)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False  # row 1 is left-padded: it sits at position 9
    prompt = (q[:, :, :13], k[:, :, :13], v[:, :, :13], w, gamma)
    _, state = extend_attention(*prompt, fresh_state(k, v, group, taps), mask)
    triton_state = state
    for t in range(13, 13 + steps):
        token = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], w, gamma)
        with backend("triton"):
            out, triton_state = recurrent_step(*token, triton_state)
        with backend("torch"):
            expected, state = recurrent_step(*token, state)
        assert_close(out, expected, f"step {t}")
        assert_states_close(triton_state, state, f"step {t}")
    assert triton_state.position.tolist() == [18, 14]
    assert triton_state.kv.abs().max() > 0  # the completed group reached S


@pytest.mark.parametrize("committed", [0, 13, 16])
def test_verify_tree_across_a_group_boundary(committed):
    """Depths 0..4 from position 13 cross the boundary at 16; siblings must not see each other."""
    group, taps = 16, 6
    tree = [-1, 0, 0, 1, 1, 2, 3, 6, 7, -1]
    parents = torch.tensor([tree, tree[:1] + [0] * (len(tree) - 1)])  # a deep tree and a bushy one
    q, k, v, w, gamma = make_inputs(2, 4, 2, committed + len(tree), 16, taps, seed=9 + committed)
    state = fresh_state(k, v, group, taps)
    if committed:
        _, state = extend_attention(q[:, :, :committed], k[:, :, :committed], v[:, :, :committed], w, gamma, state)
    nodes = (q[:, :, committed:], k[:, :, committed:], v[:, :, committed:], w, gamma, state, parents)
    with backend("triton"):
        out = verify_attention(*nodes)
    with backend("torch"):
        expected = verify_attention(*nodes)
    assert_close(out, expected, "verify")


def test_tree_ancestors_by_doubling_match_the_sequential_walk():
    gen = torch.Generator().manual_seed(10)
    parents = torch.stack([torch.randint(-1, max(i, 1), (3,), generator=gen) for i in range(23)], dim=1)
    parents[:, 0] = -1
    expected_ancestors, expected_depth = tree_ancestors(parents)
    ancestors, depth = linspec.ops.triton.verify.tree_ancestors(parents)
    assert torch.equal(ancestors, expected_ancestors)
    assert torch.equal(depth, expected_depth)


def test_extend_runs_on_the_kernels():
    """Prefill on a state (grouped_terms with an initial S, conv with history) through the Triton backend."""
    group, taps = 16, 5
    q, k, v, w, gamma = make_inputs(1, 2, 1, 30, 16, taps, seed=11)
    results = {}
    for name in ("triton", "torch"):
        with backend(name):
            _, state = extend_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], w, gamma, fresh_state(k, v, group, taps))
            results[name] = extend_attention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], w, gamma, state)
    assert_close(results["triton"][0], results["torch"][0], "extend output")
    assert_states_close(results["triton"][1], results["torch"][1], "extend state")


@pytest.mark.parametrize("decay", [None, [-0.1, -0.5]])
def test_a_key_normalised_memory_falls_back_to_pytorch(decay, monkeypatch):
    """The attention kernels do not carry the "key" normaliser (q̂ᵀz): such a memory runs their modes on PyTorch
    even under a forced Triton backend — the kernels are never entered — and gives PyTorch's result (the conv,
    which does not touch the memory, still runs on its kernel inside extend)."""
    memory = GlobalMemory(log_decay=None if decay is None else torch.tensor(decay), norm="key")
    q, k, v, w, gamma = make_inputs(1, 4, 2, 21, 16, 3, seed=12)
    q, k = q.abs(), k.abs()  # non-negative features: "key" divides by q̂ᵀz
    parents = torch.tensor([[-1, 0, 1, 0, 3]])

    def every_mode() -> list[torch.Tensor]:
        prompt = (q[:, :, :9], k[:, :, :9], v[:, :, :9], w, gamma, fresh_state(k, v, 4, 3), None)
        prefill, state = extend_attention(*prompt, "relu2", memory)
        token = (q[:, :, 9:10], k[:, :, 9:10], v[:, :, 9:10], w, gamma, state)
        tree = (q[:, :, 9:14], k[:, :, 9:14], v[:, :, 9:14], w, gamma, state, parents)
        return [
            chunked_attention(q, k, v, w, gamma, 4, "relu2", memory),
            prefill,
            recurrent_step(*token, "relu2", memory)[0],
            verify_attention(*tree, "relu2", memory),
        ]

    with backend("torch"):
        expected = every_mode()
    with backend("triton"):
        for op in ("chunked_attention", "grouped_terms", "recurrent_step", "verify_attention"):
            assert route(op, q.device).triton and route(op, q.device, memory=GlobalMemory()).triton
            assert not route(op, q.device, memory=memory).triton
        kernels = {
            linspec.ops.triton.chunked: ("chunked_attention", "grouped_terms"),
            linspec.ops.triton.recurrent: ("recurrent_step",),
            linspec.ops.triton.verify: ("verify_attention",),
        }
        for module, names in kernels.items():
            for name in names:
                monkeypatch.setattr(module, name, None)  # entering a kernel would fail
        with pytest.warns(KernelFallbackWarning, match="global_norm 'key' is not implemented in the Triton kernels"):
            results = every_mode()
    for got, want, mode in zip(results, expected, ["chunked", "extend", "recurrent", "verify"], strict=True):
        assert_close(got, want, mode)


ENTRY_POINTS = [  # (kernel module, entry point): one per op the dispatch can send to Triton
    (linspec.ops.triton.chunked, "chunked_attention"),
    (linspec.ops.triton.chunked, "grouped_terms"),
    (linspec.ops.triton.conv, "causal_depthwise_conv"),
    (linspec.ops.triton.recurrent, "recurrent_step"),
    (linspec.ops.triton.verify, "verify_attention"),
]


def test_a_triton_route_enters_its_kernel_in_every_mode(monkeypatch):
    """The outputs above match PyTorch's whichever side ran, so this checks the side: every entry point is
    wrapped to record that it was called (and still runs), and each mode must reach its kernels."""
    entered = []

    def recording(kernel, name):
        def run(*args, **kwargs):
            entered.append(name)
            return kernel(*args, **kwargs)

        return run

    for module, name in ENTRY_POINTS:
        monkeypatch.setattr(module, name, recording(getattr(module, name), name))
    q, k, v, w, gamma = make_inputs(1, 2, 1, 12, 16, 3, seed=13)
    state = fresh_state(k, v, 4, 3)
    with backend("triton"):
        chunked_attention(q, k, v, w, gamma, 4)
        _, state = extend_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], w, gamma, state)
        recurrent_step(q[:, :, 6:7], k[:, :, 6:7], v[:, :, 6:7], w, gamma, state)
        verify_attention(q[:, :, 6:9], k[:, :, 6:9], v[:, :, 6:9], w, gamma, state, torch.tensor([[-1, 0, 0]]))
    assert sorted(set(entered)) == sorted(set(OPS) - {"run_readout"})  # the far memory's: its own test


def test_the_kernels_refuse_a_call_they_do_not_implement():
    """Called directly (not through the dispatch), a kernel raises instead of computing another layer."""
    q, k, v, w, gamma = make_inputs(1, 2, 2, 8, 16, 3, seed=14)
    key_normed = GlobalMemory(log_decay=torch.tensor([-0.1, -0.5]), norm="key")
    with pytest.raises(ValueError, match="global_norm 'key' is not implemented"):
        linspec.ops.triton.chunked.chunked_attention(q, k, v, w, gamma, 4, "relu2", key_normed)
    with pytest.raises(ValueError, match="local_kernel 'softmax'"):
        linspec.ops.triton.chunked.grouped_terms(q, k, v, 4, "softmax")
    token = (q[:, :, :1].requires_grad_(), k[:, :, :1], v[:, :, :1], w, gamma, fresh_state(k, v, 4, 3))
    with pytest.raises(ValueError, match="recurrent_step kernel is forward-only"):
        linspec.ops.triton.recurrent.recurrent_step(*token)
