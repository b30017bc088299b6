"""What a forward pass through linspec layers *is*: the execution context every ``LinspecAttention`` reads.

A linear layer runs in one of four modes (``Mode``) — chunked (no cache: training, full forwards), step (one token
on a state: decode), extend (several tokens on a state, padding allowed) and verify (a tree of candidates read
against the state, which does not change). The first three follow from the inputs; verify and the padding mask
cannot, so they are stated explicitly in an ``ExecutionContext`` passed down as the ``linspec_context`` keyword,
never parked on the cache for a layer to discover. The layer decides the mode once per forward and runs that
mode's method of each of its terms (``linspec.models.terms``).

Training may also shrink every softmax window for a while (``window_size``): SWAX-style stochastic windows, so
that most positions of short, cheap sequences must read the far memory. A process-wide setting rather than a
keyword, because it has to reach the layers through the model's own forward, which knows nothing of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from linspec.ops.verify import TreeLayout


class Mode(Enum):
    """How a layer treats the new columns of one forward; decided once per forward (``ExecutionContext.mode``)."""

    CHUNKED = "chunked"  # a whole sequence from position 0, every column real, nothing kept: training, full forwards
    EXTEND = "extend"  # several columns on a state, padding allowed: prefill, continuation
    STEP = "step"  # one real token per row on a state: decode
    VERIFY = "verify"  # a tree of candidates read against a state that does not change: speculative verification


@dataclass
class TreeCandidates:
    """One verification pass over a tree of candidates.

    Linear layers evaluate the tree against their committed state without changing it and leave here, per layer
    and term, what the commit needs (``keep``: a term's candidate ``(k̂, v)`` say); the cache's commit appends
    the accepted path's entries from here, so nothing is recomputed and nothing needs rolling back.
    """

    layout: TreeLayout
    _entries: dict[int, dict[Any, Any]] = field(default_factory=dict)

    def keep(self, layer_idx: int, kept: dict[Any, Any]) -> None:
        """Store layer ``layer_idx``'s candidates: each of its terms (the key) with what its ``commit`` takes."""
        self._entries[layer_idx] = kept

    def entries(self) -> dict[int, dict[Any, Any]]:
        return self._entries


@dataclass(frozen=True)
class ExecutionContext:
    """How linear layers treat the new columns of this forward.

    ``token_mask [B, T]``: which new columns are real tokens (None: all of them). Padding never enters a state.
    ``tree``: set for a speculative verification pass — the columns are a tree of candidates, not a sequence.
    """

    token_mask: torch.Tensor | None = None
    tree: TreeCandidates | None = None

    @property
    def all_real(self) -> bool:
        return self.token_mask is None

    def mode(self, length: int, cached: bool) -> Mode:
        """The mode of a forward over ``length`` new columns, with a cache (``cached``) or without one: a tree →
        verify; no cache and no padding → chunked; one real token → step; otherwise → extend (a forward with
        padding and no cache runs on an empty state and keeps nothing)."""
        if self.tree is not None:
            return Mode.VERIFY
        if not cached and self.all_real:
            return Mode.CHUNKED
        if length == 1 and self.all_real:
            return Mode.STEP
        return Mode.EXTEND


_WINDOW_SIZE: ContextVar[int | None] = ContextVar("linspec_window_size", default=None)


@contextlib.contextmanager
def window_size(size: int) -> Iterator[None]:
    """Every softmax window sees ``size`` tokens (sinks unchanged) until the context ends, whatever the layers'
    settings say: for training forwards (stochastic window sizes). A state built inside must not be read outside."""
    if size < 1:
        raise ValueError(f"a window covers at least one token, got {size}")
    token = _WINDOW_SIZE.set(size)
    try:
        yield
    finally:
        _WINDOW_SIZE.reset(token)


def window_size_override() -> int | None:
    """The window size set by an enclosing ``window_size`` context, or None (the layers' own)."""
    return _WINDOW_SIZE.get()
