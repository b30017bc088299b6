"""What the Triton kernels implement, readable without importing triton.

The dispatch (``linspec.ops.backend``) asks ``missing`` before it sends a call here, and the kernels' entry points
ask it again so that a direct call cannot silently compute something else. One list of reasons serves both: the
text a user sees when a call runs on PyTorch instead names the setting the kernels lack.
"""

from __future__ import annotations

import torch

from linspec.ops.memory import GlobalMemory

# Every op with a Triton twin, by the name it has in ``linspec.ops`` (and in ``linspec.ops.backend``).
ATTENTION_OPS = ("chunked_attention", "grouped_terms", "recurrent_step", "verify_attention")
OPS = (*ATTENTION_OPS, "causal_depthwise_conv", "run_readout")
# Kernels without a backward: a call that records a graph runs on PyTorch.
FORWARD_ONLY = ("grouped_terms", "recurrent_step", "verify_attention")
# In-group kernels κ the attention kernels carry; "none" is the softmax window's layer, whose grouped term is the
# memory and the conv alone (the window itself runs on scaled-dot-product attention, ``linspec.ops.window``).
LOCAL_KERNELS = ("relu2", "identity", "none")
# The global memories the attention kernels carry: the paper's plain sum, a per-kv-head decay folded once per group,
# and the "mean" normaliser (a decay-weighted count of folded tokens). Not "key" (q̂ᵀz needs z in the state).
GLOBAL_NORMS = ("none", "mean")
GLOBAL_DECAY = True


def memory_features(memory: GlobalMemory | None) -> tuple[bool, str]:
    """``(decayed, norm)`` of a memory (``None`` is the paper's: no decay, norm "none")."""
    if memory is None:
        return False, "none"
    return memory.log_decay is not None, memory.norm


def missing(
    op: str, *, decay: bool = False, norm: str = "none", local_kernel: str = "relu2", needs_grad: bool = False
) -> tuple[str, ...]:
    """Why the kernels cannot run this call of ``op``, one reason per missing feature; empty when they can."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    lacking = []  # the settings of this call the kernels do not carry, as a user names them
    if op in ATTENTION_OPS:
        if decay and not GLOBAL_DECAY:
            lacking.append("global_decay")
        if norm not in GLOBAL_NORMS:
            lacking.append(f"global_norm {norm!r}")
        if local_kernel not in LOCAL_KERNELS:
            lacking.append(f"local_kernel {local_kernel!r}")
    reasons = []
    if lacking:
        listed = lacking[0] if len(lacking) == 1 else f"{', '.join(lacking[:-1])} and {lacking[-1]}"
        reasons.append(f"{listed} {'is' if len(lacking) == 1 else 'are'} not implemented in the Triton kernels")
    if needs_grad and op in FORWARD_ONLY:
        reasons.append(f"the Triton {op} kernel is forward-only and this call records an autograd graph")
    return tuple(reasons)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must record a graph (which the forward-only kernels cannot)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def check_supported(
    op: str, memory: GlobalMemory | None, local_kernel: str, *graph_inputs: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` naming what a direct call asks of the kernels that they do not implement.

    ``graph_inputs``: the tensors whose gradients a forward-only kernel would lose.
    """
    decay, norm = memory_features(memory)
    needs_grad = op in FORWARD_ONLY and needs_autograd(*graph_inputs)
    reasons = missing(op, decay=decay, norm=norm, local_kernel=local_kernel, needs_grad=needs_grad)
    if reasons:
        raise ValueError(f"{op}: {'; '.join(reasons)} (linspec.ops.backend.{op} runs such calls on PyTorch)")
