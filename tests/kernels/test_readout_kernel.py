"""The far memory's readout (strictly causal linear attention over a run, on an initial state) on its Triton twin:
output and the gradients of features, keys, values and the initial state against float64 autograd of PyTorch's
``linspec.ops.far_memory.run_readout``, for runs shorter than, equal to and longer than one kernel block."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import assert_close

import linspec.ops.triton.readout
from linspec.config import LinspecConfig
from linspec.ops.backend import backend, far_readout_on_triton, plan
from linspec.ops.far_memory import run_readout
from linspec.ops.triton.capabilities import OPS


def run_inputs(batch, heads, kv_heads, length, feature_dim, value_dim, seed):
    """Positive features (as the spiky maps give), random values with the ones column, a random initial S."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.rand(batch, heads, length, feature_dim, generator=gen)
    keys = torch.rand(batch, kv_heads, length, feature_dim, generator=gen) / feature_dim
    values = torch.cat(
        [torch.randn(batch, kv_heads, length, value_dim, generator=gen), torch.ones(batch, kv_heads, length, 1)], -1
    )
    initial = torch.rand(batch, kv_heads, feature_dim, value_dim + 1, generator=gen)
    return features, keys, values, initial


# (batch, heads, kv_heads, length, feature dim 2D, value dim)
SHAPES = [
    (1, 2, 2, 1, 32, 16),  # one query: it reads the initial state only
    (2, 4, 2, 64, 32, 16),  # exactly one block, GQA
    (1, 2, 1, 131, 32, 24),  # three blocks, the last partial; Dv + 1 = 25
]


@pytest.mark.parametrize("with_initial", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_readout_forward_and_gradients(shape, with_initial):
    inputs = list(run_inputs(*shape, seed=sum(shape)))
    if not with_initial:
        inputs[3] = None
    leaves = [x.requires_grad_() for x in inputs if x is not None]
    with backend("triton"):
        assert far_readout_on_triton(inputs[0])
        out = linspec.ops.triton.readout.run_readout(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, grad_out)
    exact = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    expected = run_readout(*exact)
    expected_grads = torch.autograd.grad(expected, [x for x in exact if x is not None], grad_out.double())
    assert_close(out, expected, "readout")
    for name, grad, expected_grad in zip(
        ["features", "keys", "values", "initial"], grads, expected_grads, strict=False
    ):
        assert_close(grad, expected_grad, f"d{name}")


def test_the_first_entry_is_read_by_later_queries_only():
    """Strictly causal: query r never reads entry r. A run whose only non-zero entry is u = 5 changes queries
    6.. and leaves 0..5 at the initial state's readout."""
    features, keys, values, initial = run_inputs(1, 2, 2, 70, 32, 16, seed=3)
    keys = torch.zeros_like(keys)
    keys[:, :, 5] = 1.0
    with backend("triton"):
        out = linspec.ops.triton.readout.run_readout(features, keys, values, initial)
    base = features @ initial  # (B, H, L, Dv + 1): the initial state alone
    assert torch.allclose(out[:, :, :6], base[:, :, :6], atol=1e-5)
    assert (out[:, :, 6:] - base[:, :, 6:]).abs().amax(dim=-1).min() > 1e-3  # every later query changed


def test_plan_lists_the_readout_for_far_memory_presets_only():
    assert "run_readout" not in {r.op for r in plan(LinspecConfig.from_preset("window"), "cuda")}
    routes = {r.op: r for r in plan(LinspecConfig.from_preset("window-hedgehog"), "cuda")}
    assert list(routes) == ["run_readout"]  # the preset has no grouped term: its readout is its one kernel
    assert routes["run_readout"].triton and not routes["run_readout"].fallback
    grouped = LinspecConfig.from_preset("window-hedgehog", grouped_term=True, global_decay=True, global_norm="mean")
    assert {r.op for r in plan(grouped, "cuda")} == set(OPS)
