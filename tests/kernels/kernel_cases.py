"""Inputs and comparisons shared by the kernel tests: float32 kernels against float64 PyTorch references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.ops import empty_state

TOL = 3e-5  # relative to the largest expected magnitude; float32 sums over a few hundred terms


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference, in float64 (NaN, i.e. an unwritten output, stays NaN)."""
    return (actual.double() - expected.double()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, what
    assert actual.dtype == torch.float32, what
    scale = max(1.0, expected.abs().max().item())
    error = max_error(actual, expected)  # NaN (unwritten) fails here too
    assert error <= TOL * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


def make_inputs(batch, heads, kv_heads, length, key_dim, taps, seed, value_dim=None):
    """Fresh float32 inputs per case: unit-norm q̂/k̂ (the paper's φ), random values, conv taps and γ."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q = F.normalize(randn(batch, heads, length, key_dim), dim=-1)
    k = F.normalize(randn(batch, kv_heads, length, key_dim), dim=-1)
    v = randn(batch, kv_heads, length, value_dim or key_dim)
    return q, k, v, 0.5 * randn(heads, taps), torch.tensor(0.8)


def fresh_state(k, v, group, taps):
    return empty_state(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], group, taps, k.dtype)


def assert_states_close(actual, expected, what):
    assert actual.tensors().keys() == expected.tensors().keys(), what
    for name, tensor in actual.tensors().items():
        if name == "position":
            assert torch.equal(tensor, expected.position), what
        else:
            assert_close(tensor, expected.tensors()[name].float(), f"{what}: {name}")
