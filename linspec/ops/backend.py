"""The one dispatch between the Triton kernels (``linspec.ops.triton``) and the PyTorch ops, decided per call.

The public functions of ``linspec.ops`` that have a Triton twin are the ones below: each asks ``route`` which side
runs it and calls that side with the same arguments (both sides share one signature per mode). The choice is made
from the call itself — the tensors' device, the memory and local kernel it asks for, whether it records an
autograd graph — so one model moves between devices without reconfiguration.

``auto`` (the default) sends CUDA tensors to Triton and everything else to PyTorch; ``torch`` and ``triton`` force
one side. Precedence: the ``backend(name)`` context manager, then ``set_backend(name)``, then the
``LINSPEC_BACKEND`` environment variable. Forcing ``triton`` on CPU tensors runs the kernels through Triton's
interpreter — slow, and meant for tests.

What runs where for the recommended ``window`` preset on CUDA: the softmax window (its last ``local_window``
tokens and sinks) is ``linspec.ops.window``, on PyTorch's fused scaled-dot-product attention in every mode; the
layer's grouped term — the decayed, mean-normalised global memory and the conv, with no in-group κ
(``local_kernel`` "none") — runs on the kernels here: the chunked form with its backward (training, prefill from
position 0; gradients reach q, k, v, the conv, γ and ``log λ``), ``grouped_terms`` and the conv (prefill on a
state, extend), the recurrent step (decode) and verify (speculative trees). The paper's and the ``stable`` preset's
layers run wholly on the kernels. A far memory (``window-hedgehog``) reads its run through ``run_readout``'s kernel,
which ``linspec.ops.far_memory`` asks for with ``far_readout_on_triton``; its feature maps and softmax column are
PyTorch ops (``window-hedgehog`` has no grouped term, so the readout is its one kernel).

A call the kernels do not implement (``linspec.ops.triton.capabilities``: the "key" normaliser, a graph through a
forward-only kernel — e.g. ``log λ`` requiring grad in decode) runs on PyTorch whatever the backend says, so every
option works on every device. Where Triton was wanted — a CUDA tensor under ``auto``, or a forced ``triton`` — that
is a fallback, and the first call of each op for each reason emits one ``KernelFallbackWarning`` that names the
setting. ``route`` answers the same question for one call without running anything, and ``plan`` for every op of
a ``LinspecConfig`` on a device (what ``linspec env`` or a benchmark can print).
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

import linspec.ops.chunked as chunked
import linspec.ops.conv as conv
import linspec.ops.recurrent as recurrent
import linspec.ops.verify as verify
from linspec.config import LinspecConfig
from linspec.ops.memory import GlobalMemory
from linspec.ops.state import LinearAttentionState
from linspec.ops.triton.capabilities import FORWARD_ONLY, OPS, memory_features, missing, needs_autograd

BACKENDS = ("auto", "torch", "triton")

_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("linspec_backend", default=None)
_process_wide: str | None = None
_announced: set[str] = set()  # fallback messages already warned about in this process
# What each op serves, for messages: a user meets the modes, not the op names.
SERVES = {
    "chunked_attention": "training and prefill",
    "grouped_terms": "prefill on a state, extend_attention",
    "recurrent_step": "one-token decode",
    "verify_attention": "speculative verification",
    "causal_depthwise_conv": "the conv of extend_attention",
    "run_readout": "the far memory's readout",
}


class KernelFallbackWarning(UserWarning):
    """A call that could have run on the Triton kernels runs on PyTorch; the message says why."""


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def current_backend() -> str:
    """The backend in force for this context: scoped override, process-wide setting, env var, else ``auto``."""
    name = _scoped.get() or _process_wide or os.environ.get("LINSPEC_BACKEND") or "auto"
    return _checked(name.lower())


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process (``None`` returns to the env var / ``auto``)."""
    global _process_wide
    _process_wide = None if name is None else _checked(name)


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (context-local, so threads and tasks do not leak into each other)."""
    token = _scoped.set(_checked(name))
    try:
        yield
    finally:
        _scoped.reset(token)


@dataclass(frozen=True)
class Route:
    """Which side runs one call of ``op`` and why. ``fallback``: PyTorch although Triton was wanted."""

    op: str
    backend: str  # "triton" or "torch"
    reason: str
    fallback: bool = False

    @property
    def triton(self) -> bool:
        return self.backend == "triton"

    def __str__(self) -> str:
        side = "Triton" if self.triton else "PyTorch"
        return f"{self.op} ({SERVES[self.op]}) → {side}: {self.reason}"


def route(
    op: str,
    device: torch.device | str,
    *,
    memory: GlobalMemory | None = None,
    local_kernel: str = "relu2",
    needs_grad: bool = False,
) -> Route:
    """Where a call of ``op`` on ``device`` runs under the current backend, and why. Runs nothing.

    ``needs_grad``: the call records an autograd graph (only the forward-only kernels care). Raises
    ``ImportError`` when ``triton`` is forced and not installed, ``ValueError`` for an unknown op or backend.
    """
    decay, norm = memory_features(memory)
    return _decide(
        op, torch.device(device).type, decay, norm, local_kernel, needs_grad, current_backend(), triton_available()
    )


@cache
def _decide(
    op: str, device_type: str, decay: bool, norm: str, local_kernel: str, needs_grad: bool, name: str, available: bool
) -> Route:
    """``route`` on hashable arguments, memoised: decode calls it once per layer and token."""
    reasons = missing(op, decay=decay, norm=norm, local_kernel=local_kernel, needs_grad=needs_grad)
    if name == "torch":
        return Route(op, "torch", "the torch backend is forced (LINSPEC_BACKEND, set_backend or backend())")
    wanted = name == "triton" or device_type == "cuda"
    if not wanted:
        return Route(op, "torch", f"{device_type} tensors: the Triton kernels run on CUDA")
    if reasons:
        return Route(op, "torch", "; ".join(reasons), fallback=True)
    if name == "triton":
        if not available:
            raise ImportError("LINSPEC_BACKEND=triton needs the triton package (pip install triton)")
        return Route(op, "triton", "the triton backend is forced")
    if not available:
        return Route(op, "torch", "triton is not installed (pip install 'linspec[gpu]')", fallback=True)
    return Route(op, "triton", "CUDA tensors, and the kernels implement this call")


def plan(settings: LinspecConfig, device: torch.device | str) -> list[Route]:
    """Where each op runs for a model converted with ``settings`` on ``device`` (inference: no autograd graph
    through the forward-only kernels; training's ``chunked_attention`` has a Triton backward either way).
    ``run_readout`` is listed only for settings with a far memory, the only layers that call it, and the grouped
    term's ops only for settings that keep it (``grouped_term``)."""
    features = (settings.global_decay, settings.global_norm, settings.in_group_kernel, False)
    name, available, device_type = current_backend(), triton_available(), torch.device(device).type
    ops = [op for op in OPS if (settings.far_memory if op == "run_readout" else settings.grouped_term)]
    return [_decide(op, device_type, *features, name, available) for op in ops]


def _announce(chosen: Route) -> None:
    message = f"linspec: {chosen.op} ({SERVES[chosen.op]}) runs on PyTorch, not the Triton kernels: {chosen.reason}"
    if message not in _announced:
        _announced.add(message)
        warnings.warn(message, KernelFallbackWarning, stacklevel=4)


def _runs_on_triton(
    op: str,
    device: torch.device,
    memory: GlobalMemory | None,
    local_kernel: str,
    graph_inputs: tuple[torch.Tensor | None, ...],
    state: LinearAttentionState | None = None,
) -> bool:
    """The decision for one call, with the fallback said once. ``graph_inputs`` (and ``state``'s tensors, and the
    memory's ``log λ``) are read for autograd only where it matters: a forward-only kernel, under grad mode."""
    needs_grad = op in FORWARD_ONLY and torch.is_grad_enabled()
    if needs_grad:
        log_decay = None if memory is None else memory.log_decay
        state_tensors = () if state is None else state.tensors().values()
        needs_grad = needs_autograd(*graph_inputs, log_decay, *state_tensors)
    chosen = route(op, device, memory=memory, local_kernel=local_kernel, needs_grad=needs_grad)
    if chosen.fallback:
        _announce(chosen)
    return chosen.triton


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """The chunked form (training, prefill from position 0): ``linspec.ops.chunked.chunked_attention`` or its
    Triton twin, which has a backward."""
    if _runs_on_triton("chunked_attention", q.device, memory, local_kernel, ()):
        from linspec.ops.triton.chunked import chunked_attention as implementation
    else:
        implementation = chunked.chunked_attention
    return implementation(q, k, v, conv_weight, global_scale, group_size, local_kernel, memory)


def grouped_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    local_kernel: str = "relu2",
    initial_kv: torch.Tensor | None = None,
    memory: GlobalMemory | None = None,
    initial_key_sum: torch.Tensor | None = None,
    first_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The local and global terms on an initial S (what ``extend_attention`` builds on):
    ``linspec.ops.chunked.grouped_terms`` or its forward-only Triton twin."""
    if _runs_on_triton("grouped_terms", q.device, memory, local_kernel, (q, k, v, initial_kv)):
        from linspec.ops.triton.chunked import grouped_terms as implementation
    else:
        implementation = chunked.grouped_terms
    return implementation(q, k, v, group_size, local_kernel, initial_kv, memory, initial_key_sum, first_group)


def causal_depthwise_conv(
    v: torch.Tensor, conv_weight: torch.Tensor, history: torch.Tensor | None = None
) -> torch.Tensor:
    """The causal depthwise conv over V: ``linspec.ops.conv.causal_depthwise_conv`` or its Triton twin (which has
    a backward). It does not touch the memory, so it runs on the kernel whatever memory the layer keeps."""
    if _runs_on_triton("causal_depthwise_conv", v.device, None, "relu2", ()):
        from linspec.ops.triton.conv import causal_depthwise_conv as implementation
    else:
        implementation = conv.causal_depthwise_conv
    return implementation(v, conv_weight, history)


def far_readout_on_triton(features: torch.Tensor) -> bool:
    """Whether a call of the far memory's ``run_readout`` (``linspec.ops.far_memory``) on ``features``' device runs
    on its Triton twin, ``linspec.ops.triton.readout.run_readout`` (which has a backward, so any call can). The far
    memory module holds the PyTorch side and asks here, so the one dispatch decides without importing it."""
    return _runs_on_triton("run_readout", features.device, None, "identity", ())


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One-token decode: ``linspec.ops.recurrent.recurrent_step`` or its forward-only Triton twin."""
    graph_inputs = (q, k, v, conv_weight, global_scale)
    if _runs_on_triton("recurrent_step", q.device, memory, local_kernel, graph_inputs, state):
        from linspec.ops.triton.recurrent import recurrent_step as implementation
    else:
        implementation = recurrent.recurrent_step
    return implementation(q, k, v, conv_weight, global_scale, state, local_kernel, memory)


def verify_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    conv_weight: torch.Tensor,
    global_scale: torch.Tensor,
    state: LinearAttentionState,
    parents: torch.Tensor | verify.TreeLayout,
    local_kernel: str = "relu2",
    memory: GlobalMemory | None = None,
) -> torch.Tensor:
    """Every node of a speculative tree: ``linspec.ops.verify.verify_attention`` or its forward-only Triton twin
    (which takes the parent indices; it builds its ancestry on the device)."""
    graph_inputs = (q, k, v, conv_weight, global_scale)
    if _runs_on_triton("verify_attention", q.device, memory, local_kernel, graph_inputs, state):
        from linspec.ops.triton.verify import verify_attention as kernel

        raw_parents = parents.parents if isinstance(parents, verify.TreeLayout) else parents
        return kernel(q, k, v, conv_weight, global_scale, state, raw_parents, local_kernel, memory)
    return verify.verify_attention(q, k, v, conv_weight, global_scale, state, parents, local_kernel, memory)
