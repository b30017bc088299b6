"""The far memory's readout in Triton: strictly causal linear attention over a run, on an initial state.

Twin of ``linspec.ops.far_memory.run_readout`` (same arguments and return): query ``r`` reads
``initial + Σ_{u < r} φ_k(u) [v_u, 1]ᵀ``. Shifting the run's entries one place later (``u → u + 1``, a zero entry
first) turns "entries before r" into "entries up to r", which is the chunked kernels' in-group term with the identity
κ plus their exclusive group sum — so the readout is ``linspec.ops.triton.chunked`` with γ = 1, no conv and the
initial state as ``S_0``, forward and backward (the backward also returns the initial state's gradient, ``D_0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .capabilities import check_supported
from .chunked import chunk_backward, chunk_output, chunk_states
from .utils import check_inputs

# Entries per group of the chunked kernels: the in-group scores are one BLOCK×BLOCK tile.
BLOCK = 64


class RunReadoutFunction(torch.autograd.Function):
    """``out[r] = qᵣᵀ (S_0 + Σ_{u ≤ r} kᵤ vᵤᵀ)`` over already-shifted entries, differentiable in all four."""

    @staticmethod
    def forward(ctx, features, keys, values, initial):
        no_conv = features.new_zeros(features.shape[1], 1)
        one = torch.ones((), dtype=torch.float32, device=features.device)
        states = chunk_states(keys, values, BLOCK, initial)
        out, _ = chunk_output(features, keys, values, states, no_conv, one, BLOCK, "identity")
        ctx.save_for_backward(features, keys, values, states, no_conv, one)
        ctx.initial_dtype = None if initial is None else initial.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, keys, values, states, no_conv, one = ctx.saved_tensors
        dq, dk, dv, *_, dh0 = chunk_backward(
            features, keys, values, no_conv, one, states, grad_out.contiguous(), BLOCK, "identity",
            conv_grad=False, initial_grad=ctx.initial_dtype is not None and ctx.needs_input_grad[3],
        )  # fmt: skip
        return dq, dk, dv, None if dh0 is None else dh0.to(ctx.initial_dtype)


def run_readout(
    features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, initial: torch.Tensor | None
) -> torch.Tensor:
    """Triton twin of ``linspec.ops.far_memory.run_readout``: ``[B, H, L, Dv + 1]`` for ``features [B, H, L, F]``,
    ``keys [B, Hkv, L, F]``, ``values [B, Hkv, L, Dv + 1]`` and ``initial [B, Hkv, F, Dv + 1]`` (None: zero);
    differentiable in all four."""
    check_supported("run_readout", None, "identity")
    check_inputs(features, keys, values, *(() if initial is None else (initial,)))
    if features.shape[2] == 0:
        return features.new_zeros(*features.shape[:3], values.shape[-1])
    length = keys.shape[2]
    shifted = [F.pad(x, (0, 0, 1, 0))[:, :, :length].contiguous() for x in (keys, values)]  # entry u at u + 1
    initial = None if initial is None else initial.contiguous()
    return RunReadoutFunction.apply(features.contiguous(), *shifted, initial)
