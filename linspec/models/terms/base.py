"""What a term of a ``LinspecAttention`` layer is: one contribution to the layer's output, with its own slice of
the layer's decode state and one method per execution mode.

A layer is a sum of terms (``linspec.models.terms`` lists them). Each forward the layer projects its input once
(``TermInputs``), decides the mode once (``linspec.models.context.Mode``) and calls that mode's method on every
term; the terms' outputs are summed in registration order (float sums are not associative, and every mode is
pinned to the same order). A term that answers for some query heads only (``query_heads``) replaces the sum on
those heads. The state each term returns replaces its own slice; ``position`` is the layer's, advanced once by
the layer after all of its terms, so no term depends on running before another.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch

from linspec.ops.state import held_bytes
from linspec.ops.verify import TreeLayout


@dataclass(frozen=True)
class TermInputs:
    """What every term of a layer reads in one forward, computed once by the layer.

    ``q [B, H, T, D]``, ``k [B, Hkv, T, D]``: RoPE'd queries and keys before any feature map (a term applies its
    own); ``v [B, Hkv, T, Dv]``; all in the compute dtype. ``sink_q``: the queries rotated at the window's
    position ``P`` for adjacent sinks, else None. ``token_mask [B, T]``: the real columns (None: all of them).
    ``layout``: the candidate tree of a verification pass. ``attention_mask`` and ``cache``: what the model
    passed for its softmax layers (a term with growing KV columns keeps them in the cache and masks them so).
    ``state_writable``: a step may write the state's new slice into the old one's tensors rather than copies
    (the layer replaces the state in its cache and nothing else reads the old one; autograd off).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sink_q: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    layout: TreeLayout | None = None
    attention_mask: torch.Tensor | None = None
    cache: Any = None
    state_writable: bool = False


def slice_tensors(part: Any) -> dict[str, torch.Tensor]:
    """A term's state slice (a dataclass of tensors) by field name; fields it does not use (None) left out."""
    return {f.name: getattr(part, f.name) for f in fields(part) if getattr(part, f.name) is not None}


def map_slice(part: Any, fn) -> Any:
    """A copy of a state slice with ``fn`` applied to each of its tensors."""
    return replace(part, **{name: fn(t) for name, t in slice_tensors(part).items()})


@dataclass
class LayerState:
    """One linear layer's decode state: ``position [B]`` (real tokens seen per row: each row's true position for
    the next token; padding never advances it) and each term's own slice, by term name."""

    position: torch.Tensor
    slices: dict[str, Any]

    def advanced(self, slices: dict[str, Any], count: torch.Tensor | int) -> LayerState:
        """The state after ``count`` (``[B]`` or one number) more real tokens, with the terms' new ``slices``."""
        return LayerState(self.position + count, {**self.slices, **slices})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, named ``position`` and ``<term>.<field>``."""
        named = {"position": self.position}
        for name, part in self.slices.items():
            named.update({f"{name}.{field}": t for field, t in slice_tensors(part).items()})
        return named

    def map(self, fn) -> LayerState:
        """A new state with ``fn`` applied to every tensor (device moves, row selection, copies)."""
        return LayerState(fn(self.position), {name: map_slice(part, fn) for name, part in self.slices.items()})

    def nbytes(self) -> int:
        return held_bytes(self.tensors().values())


class Term:
    """One term of a layer. A subclass sets ``name`` (its slice's key) and implements ``for_layer`` and the mode
    methods; the defaults below fit a term that keeps no state of its own.

    Per mode: ``chunked(x)`` — a whole sequence from position 0, every column real, nothing kept; ``extend(x,
    state)`` — several columns on a state (padding allowed, zeros out), returning the output and the term's new
    slice; ``step(x, state)`` — one real token per row (decode; by default ``extend``); ``verify(x, state)`` — the
    nodes of a candidate tree against a state that does not change, returning the output and what the commit
    needs (None: nothing); ``commit(state, kept, path, path_mask)`` — the slice after the accepted path's nodes.
    ``state`` is the whole ``LayerState`` before the forward, read only: a term finds its slice under its name
    and may read the others'. Outputs are ``[B, H, T, Dv]`` in the compute dtype, or ``[B, len(query_heads), T,
    Dv]`` for a term with ``query_heads``.
    """

    name: ClassVar[str]

    @classmethod
    def for_layer(cls, layer) -> Term | None:
        """This term for ``layer`` (a ``LinspecAttention``), or None when its settings do not ask for it. It may
        register parameters on the layer, under flat names (state-dict names never depend on the terms)."""
        raise NotImplementedError

    def query_heads(self, device: torch.device) -> torch.Tensor | None:
        """The query heads this term answers for alone (an index tensor on ``device``), or None: every head,
        summed with the other terms."""
        return None

    def reset_parameters(self) -> None:
        """Put the term's parameters back to their values right after conversion (none by default)."""

    def empty(self, batch: int, dtype: torch.dtype, device: torch.device) -> Any | None:
        """The term's slice before any token; None: it keeps nothing in the linear state."""
        return None

    def chunked(self, x: TermInputs) -> torch.Tensor:
        raise NotImplementedError

    def extend(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, Any | None]:
        raise NotImplementedError

    def step(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, Any | None]:
        return self.extend(x, state)

    def verify(self, x: TermInputs, state: LayerState) -> tuple[torch.Tensor, Any | None]:
        raise NotImplementedError

    def commit(self, state: LayerState, kept: Any, path: torch.Tensor, path_mask: torch.Tensor) -> Any:
        """The slice after appending the accepted nodes ``path [B, M]`` (real where ``path_mask``) from ``kept``."""
        raise NotImplementedError

    @classmethod
    def commit_layers(
        cls, items: list[tuple[Term, LayerState, Any]], path: torch.Tensor, path_mask: torch.Tensor
    ) -> list[Any]:
        """``commit`` for every layer that has this kind of term, ``(term, state, kept)`` each, in one call: the
        path is the same in every layer, so a kind whose commit is many small ops can batch the layers."""
        return [term.commit(state, kept, path, path_mask) for term, state, kept in items]
