"""``auto:N`` or a list: how a conversion is told what stays softmax, read the same way for layers and heads.

Both choices — which decoder layers stay softmax (``softmax_layers``) and which kv heads of linear layers do
(``softmax_heads``) — are written either as an explicit comma-separated list or as ``auto:N``, "keep N, chosen by
measurement on held-out text". One type stands for ``auto:N`` and one parser reads both forms, so a recipe key and
a command-line flag accept the same text and refuse it with the same words; each choice adds only how one list
item is written. How the N are measured is the business of ``softmax_layers`` and ``softmax_heads``; this module
imports neither torch nor transformers, so a flag or a recipe is refused before anything heavy loads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from linspec.config import MAX_HEADS, MAX_LAYERS
from linspec.errors import LinspecError
from linspec.utils.validation import check_count

if TYPE_CHECKING:
    import torch

Item = TypeVar("Item")
_AUTO = re.compile(r"auto:(\d+)")
_SHOWN = 40  # characters of a refused value quoted back: a pasted megabyte must not become the message


@dataclass(frozen=True)
class Auto:
    """``auto:N`` — keep ``count`` layers (or heads) softmax, chosen by measurement rather than named."""

    count: int

    def __str__(self) -> str:
        return f"auto:{self.count}"


def parse_choice(
    value: Any, what: str, expected: str, read_item: Callable[[str], Iterable[Item] | None]
) -> tuple[Item, ...] | Auto:
    """``value`` as ``Auto(N)`` for ``"auto:N"``, or as the items of its comma-separated parts, each read by
    ``read_item`` (None: malformed; it raises ``LinspecError`` itself for a well-formed but impossible part).

    A list (a recipe's YAML list) passes through as a tuple, its inner lists as tuples; the settings validate it.
    Empty text means none. ``what`` ("softmax layers") and ``expected`` ("layer indices like '0,5-7'") word the
    one-line refusals."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(item) if isinstance(item, list) else item for item in value)
    text = value.strip() if isinstance(value, str) else repr(value)
    shown = text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
    if not isinstance(value, str):
        raise LinspecError(f"expected {expected} or auto:N, got {shown}")
    if text.startswith("auto"):
        match = _AUTO.fullmatch(text)
        if not match or int(match.group(1)) < 1:
            raise LinspecError(f"expected auto:N with N >= 1 ({what} chosen by measurement), got {shown!r}")
        return Auto(int(match.group(1)))
    chosen: list[Item] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        items = read_item(part)
        if items is None:
            raise LinspecError(f"expected {expected} or auto:N, got {shown!r}")
        chosen.extend(items)
    if not chosen and text:
        raise LinspecError(f"expected {expected} or auto:N, got {shown!r}")
    return tuple(chosen)


def parse_softmax_layers(value: Any) -> tuple[int, ...] | Auto:
    """``"0,5-7"`` -> ``(0, 5, 6, 7)``; ``"auto:4"`` -> ``Auto(4)``; a list of ints passes through."""
    return parse_choice(value, "softmax layers", "layer indices like '0,5-7'", _layer_range)


def parse_softmax_heads(value: Any) -> tuple[tuple[int, int], ...] | Auto:
    """``"4:1,7:0"`` -> ``((4, 1), (7, 0))`` (layer:kv head); ``"auto:12"`` -> ``Auto(12)``; a list of pairs
    passes through (validated by ``LinspecConfig``)."""
    return parse_choice(value, "softmax heads", "layer:kv-head pairs like '4:1,7:0'", _head_pair)


def _layer_range(part: str) -> range | None:
    """``"5-7"`` -> ``range(5, 8)``, ``"3"`` -> ``range(3, 4)``; None when the part is not written that way."""
    low, dash, high = part.partition("-")
    if not low.strip().isdigit() or (dash and not high.strip().isdigit()):
        return None
    first, last = int(low), int(high if dash else low)
    if last < first:  # refused, not silently empty
        raise LinspecError(f"layer range {part!r:.30} is reversed; write {last}-{first}")
    if last >= MAX_LAYERS:  # refused before expanding a range into millions of indices
        raise LinspecError(f"layer index {last} is past any model (at most {MAX_LAYERS - 1})")
    return range(first, last + 1)


def _head_pair(part: str) -> list[tuple[int, int]] | None:
    """``"4:1"`` -> ``[(4, 1)]``; None when the part is not written that way."""
    layer, colon, head = part.partition(":")
    if not colon or not layer.strip().isdigit() or not head.strip().isdigit():
        return None
    if int(layer) >= MAX_LAYERS or int(head) >= MAX_HEADS:
        raise LinspecError(f"softmax head {part!r:.30} is past any model")
    return [(int(layer), int(head))]


def text_sequences(ids: torch.Tensor, seq_len: int, max_sequences: int) -> torch.Tensor:
    """The first ``max_sequences`` whole ``seq_len``-token sequences of a 1-D id tensor, ``[N, seq_len]``: the
    held-out text an ``auto:N`` choice is measured on."""
    check_count(seq_len, "the sequence length", 2)
    check_count(max_sequences, "the number of sequences")
    count = min(max_sequences, len(ids) // seq_len)
    if count == 0:
        raise LinspecError(f"the text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)
