"""``softmax_heads: auto:N``: keep as softmax the N kv heads whose attention a linear layer would lose the most of.

A linear layer keeps each head's recent context exactly (the softmax window, or the current group) and folds the
rest into a fixed-size memory. A head of the softmax parent that puts little of its attention beyond that local
span loses little; a head that spreads its attention over the whole context (an averaging head) or reaches far back
for one token (a retrieval head) loses what the memory cannot hold. The ranking is that measurement: on long
held-out text, the share of each head's attention (query positions past the local span, summed over the query
heads that read one kv head) that falls outside the span and the attention sinks. It needs one forward of the
softmax parent per sequence and no training (DuoAttention, Xiao et al. 2024, learns a similar split of heads with
trained gates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from linspec.config import LinspecConfig
from linspec.conversion.choice import text_sequences
from linspec.errors import LinspecError
from linspec.models import hf
from linspec.utils.validation import check_count

# Query rows scored at once: bounds the (rows × T) score matrix per head on long sequences.
_QUERY_BLOCK = 256


def local_span(settings: LinspecConfig) -> tuple[int, int]:
    """``(span, sinks)``: the tokens a linear layer of ``settings`` keeps exactly — its softmax window and sinks,
    or (in-group kernels) one group."""
    if settings.softmax_window:
        return settings.local_window, settings.sink_tokens
    return settings.group_size, 0


def ranking_sequences(ids: torch.Tensor, settings: LinspecConfig, max_sequences: int) -> torch.Tensor:
    """Held-out sequences of twice the local span of ``settings``, cut from a 1-D id tensor: the second half of
    each is queries past the span, whose far attention is what the ranking measures."""
    return text_sequences(ids, 2 * local_span(settings)[0], max_sequences)


@torch.no_grad()
def far_attention_mass(base, settings: LinspecConfig, sequences: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """``[layers, kv heads]``: the softmax model ``base``'s attention outside the local span of ``settings``.

    For every query past the span: the probability mass on keys that are neither among its ``span`` most recent
    tokens nor sinks, averaged over those queries and the sequences, summed over the query heads of a kv head
    (so a kv head read by R query heads scores up to R).
    """
    from linspec.models.attention import LinspecAttention

    span, sinks = local_span(settings)
    if sequences.shape[1] <= span:
        raise LinspecError(
            f"sequences of {sequences.shape[1]} tokens never reach past the {span}-token local span; "
            "rank softmax heads on longer ones"
        )
    layers = hf.decoder_layers(base)
    rotary = hf.rotary_embedding(base)
    # The linspec module around each softmax module: its ``project`` gives the RoPE'd q/k the heads score with.
    wrappers = [
        LinspecAttention(hf.attention_of(layer), replace(settings, softmax_heads=()), rotary) for layer in layers
    ]
    config = base.config
    kv_heads = config.num_key_value_heads
    repeats = config.num_attention_heads // kv_heads
    mass = torch.zeros(len(layers), kv_heads, dtype=torch.float64)

    def hook(index: int):
        def measure(module, args, kwargs):
            hidden, rotation = hf.attention_call_inputs(args, kwargs)
            q, k, _, _ = wrappers[index].project(hidden, rotation)
            mass[index] += _outside_mass(q, k, wrappers[index].scaling, span, sinks, repeats).double().cpu()

        return measure

    handles = [
        hf.attention_of(layer).register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        device = next(base.parameters()).device
        for row in tqdm(sequences, desc="ranking heads", unit="seq", disable=not progress, leave=False):
            base(row[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (mass / len(sequences)).float()


def _outside_mass(q: torch.Tensor, k: torch.Tensor, scale: float, span: int, sinks: int, repeats: int) -> torch.Tensor:
    """``[Hkv]``: mean over queries ``t ≥ span`` of the causal softmax mass outside ``(t − span, t]`` and the
    first ``sinks`` keys, summed over each kv head's query heads; ``q [1, H, T, D]``, ``k [1, Hkv, T, D]``."""
    length = q.shape[2]
    keys = k[0].repeat_interleave(repeats, dim=0)  # (H, T, D)
    total = torch.zeros(q.shape[1], dtype=torch.float64, device=q.device)
    positions = torch.arange(length, device=q.device)
    for start in range(span, length, _QUERY_BLOCK):
        rows = positions[start : start + _QUERY_BLOCK, None]
        scores = (q[0, :, start : start + _QUERY_BLOCK] @ keys.transpose(-1, -2)) * scale  # (H, rows, T)
        visible = positions[None, :] <= rows
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        outside = visible & (rows - positions[None, :] >= span) & (positions[None, :] >= sinks)
        total += (weights * outside).sum(dim=(-1, -2)).double()
    per_query_head = total / (length - span)
    return per_query_head.view(-1, repeats).sum(-1)


def choose_softmax_heads(
    base, settings: LinspecConfig, sequences: torch.Tensor, count: int, progress: bool = True
) -> tuple[tuple[int, int], ...]:
    """The ``count`` kv heads of linear layers with the most attention outside the local span (see the module)."""
    mass = far_attention_mass(base, settings, sequences, progress)
    return tuple(sorted(largest_heads(mass, count, settings.softmax_layers)))


def largest_heads(mass: torch.Tensor, count: int, softmax_layers: Sequence[int] = ()) -> list[tuple[int, int]]:
    """The ``count`` ``(layer, kv head)`` pairs of ``mass`` with the most attention outside the span, largest first,
    leaving out ``softmax_layers`` (already softmax, every head)."""
    mass = mass.clone()
    for layer in softmax_layers:
        mass[layer] = -1.0
    available = int((mass >= 0).sum())
    check_count(count, f"auto:N (softmax heads; the linear layers have {available} kv heads)", 1, available)
    heads = mass.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in mass.flatten().argsort(descending=True)[:count]]
