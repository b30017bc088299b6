"""The math of augmented grouped linear attention, as plain functions on tensors.

One op, laid out by mode as flash-linear-attention lays out its ops: ``reference`` is the obvious quadratic form and
the spec; ``chunked`` (training, prefill), ``extend`` (prefill or continuation on a recurrent state, with padding),
``recurrent`` (one-token decode) and ``verify`` (a speculative tree of candidates) are its PyTorch forms, each
tested equal to the reference in float64; ``triton/`` holds CUDA kernels for the same modes with the same
signatures; ``backend`` is the one dispatch that picks, per call, the kernel or the PyTorch form and says why it
falls back. ``state``, ``memory``, ``kernel_fn`` and ``window`` are the pieces every mode shares. The functions
exported here are the dispatched ones. Every mode shares one calling convention:

* ``q``: ``[B, H, T, Dk]`` feature-mapped queries (φ already applied, RoPE before φ).
* ``k``: ``[B, Hkv, T, Dk]`` feature-mapped keys, ``v``: ``[B, Hkv, T, Dv]`` values. Query head ``h`` reads
  key/value head ``h // (H // Hkv)`` — the same grouping as Hugging Face's ``repeat_kv``.
* ``conv_weight``: ``[H, P]``; ``conv_weight[h, j]`` multiplies ``v`` at position ``t - j``.
* ``global_scale``: a 0-d tensor γ.
"""

from linspec.ops.backend import (
    KernelFallbackWarning,
    Route,
    causal_depthwise_conv,
    chunked_attention,
    plan,
    recurrent_step,
    route,
    verify_attention,
)
from linspec.ops.extend import append_tokens, extend_attention
from linspec.ops.reference import reference_attention
from linspec.ops.state import LinearAttentionState, empty_state
from linspec.ops.verify import tree_ancestors

__all__ = [
    "KernelFallbackWarning",
    "LinearAttentionState",
    "Route",
    "append_tokens",
    "causal_depthwise_conv",
    "chunked_attention",
    "empty_state",
    "extend_attention",
    "plan",
    "recurrent_step",
    "reference_attention",
    "route",
    "tree_ancestors",
    "verify_attention",
]
