"""The math of augmented grouped linear attention, as plain functions on tensors.

Every execution mode of docs/design.md §3 lives here with one shared calling convention:

* ``q``: ``[B, H, T, Dk]`` feature-mapped queries (φ already applied, RoPE before φ).
* ``k``: ``[B, Hkv, T, Dk]`` feature-mapped keys, ``v``: ``[B, Hkv, T, Dv]`` values. Query head ``h`` reads
  key/value head ``h // (H // Hkv)`` — the same grouping as Hugging Face's ``repeat_kv``.
* ``conv_weight``: ``[H, P]``; ``conv_weight[h, j]`` multiplies ``v`` at position ``t - j``.
* ``global_scale``: a 0-d tensor γ.

``reference`` is the obvious quadratic form and the spec; ``chunked`` (training and prefill), ``extend`` (prefill
or continuation on a recurrent state, with padding), ``recurrent_step`` (one-token decode) and ``verify``
(speculative tree of candidates) are tested equal to it.
"""

from linspec.ops.chunked import chunked_attention
from linspec.ops.conv import causal_depthwise_conv
from linspec.ops.extend import append_tokens, extend_attention
from linspec.ops.recurrent import recurrent_step
from linspec.ops.reference import reference_attention
from linspec.ops.state import LinearAttentionState, empty_state
from linspec.ops.verify import tree_ancestors, verify_attention

__all__ = [
    "LinearAttentionState",
    "append_tokens",
    "causal_depthwise_conv",
    "chunked_attention",
    "empty_state",
    "extend_attention",
    "recurrent_step",
    "reference_attention",
    "tree_ancestors",
    "verify_attention",
]
