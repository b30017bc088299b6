"""``softmax_layers: auto:N``: keep as softmax the N layers whose linearisation costs the most, measured.

A user who wants retrieval back for a small part of the KV cache names how many softmax layers to keep, not
which: the layers are chosen by ``choose_softmax_layers`` (each layer restored alone, ranked by the perplexity that
leaves on held-out text, the best N kept together). Ranking a raw conversion measures
local-only attention; ranking after attention transfer measures the layer as it will be trained, and since
transfer trains every layer against the original residual stream, that ranking carries over unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from linspec.config import MAX_LAYERS, LinspecConfig
from linspec.errors import LinspecError

_AUTO = re.compile(r"auto:(\d+)")


@dataclass(frozen=True)
class AutoLayers:
    """``auto:N`` — choose ``count`` softmax layers by measurement."""

    count: int

    def __str__(self) -> str:
        return f"auto:{self.count}"


def parse_softmax_layers(value: str | Sequence[int]) -> tuple[int, ...] | AutoLayers:
    """``"0,5-7"`` -> ``(0, 5, 6, 7)``; ``"auto:4"`` -> ``AutoLayers(4)``; a list of ints passes through."""
    if not isinstance(value, str):
        return tuple(value)
    text = value.strip()
    if text.startswith("auto"):
        match = _AUTO.fullmatch(text)
        if not match or int(match.group(1)) < 1:
            raise LinspecError(f"expected auto:N with N >= 1 (softmax layers chosen by measurement), got {value!r}")
        return AutoLayers(int(match.group(1)))
    layers: list[int] = []
    shown = text if len(text) <= 40 else text[:37] + "..."
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        if not low.strip().isdigit() or (dash and not high.strip().isdigit()):
            raise LinspecError(f"expected layer indices like '0,5-7' or auto:N, got {shown!r}")
        first, last = int(low), int(high if dash else low)
        if last < first:  # refused, not silently empty
            raise LinspecError(f"layer range {part!r:.30} is reversed; write {last}-{first}")
        if last >= MAX_LAYERS:  # refused before expanding a range into millions of indices
            raise LinspecError(f"layer index {last} is past any model (at most {MAX_LAYERS - 1})")
        layers.extend(range(first, last + 1))
    if not layers and text:
        raise LinspecError(f"expected layer indices like '0,5-7' or auto:N, got {shown!r}")
    return tuple(layers)


def text_sequences(ids: torch.Tensor, seq_len: int, max_sequences: int) -> torch.Tensor:
    """The first ``max_sequences`` whole ``seq_len``-token sequences of a 1-D id tensor, ``[N, seq_len]``."""
    if seq_len < 2 or max_sequences < 1:
        raise LinspecError(f"need seq_len >= 2 and max_sequences >= 1; got {seq_len}, {max_sequences}")
    count = min(max_sequences, len(ids) // seq_len)
    if count == 0:
        raise LinspecError(f"the text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def resolve_softmax_layers(
    base, settings: LinspecConfig, auto: AutoLayers, sequences: torch.Tensor, progress: bool = True
) -> LinspecConfig:
    """``settings`` with ``softmax_layers`` chosen for the softmax model ``base``: convert it all-linear (sharing
    its weights, nothing is modified), rank its layers on ``sequences`` and keep the best ``auto.count``."""
    from linspec.conversion.convert import convert
    from linspec.evaluation.perplexity import choose_softmax_layers

    if auto.count >= base.config.num_hidden_layers:
        raise LinspecError(f"{auto} keeps every layer of a {base.config.num_hidden_layers}-layer model softmax")
    all_linear = convert(base, dataclasses.replace(settings, softmax_layers=()))
    chosen = choose_softmax_layers(all_linear.eval(), sequences, auto.count, progress=progress)
    return dataclasses.replace(settings, softmax_layers=chosen)
