"""The terms a ``LinspecAttention`` layer sums: each one contribution to the output with its own slice of the
decode state and one method per execution mode (``base.Term``); ``TERM_KINDS`` lists them in summation order,
and a layer holds those its settings ask for."""

from __future__ import annotations

from linspec.models.terms.base import Term
from linspec.models.terms.grouped import GroupedTerm
from linspec.models.terms.heads import SoftmaxHeadsTerm
from linspec.models.terms.window import SoftmaxWindowTerm

# The order the outputs are summed in (float sums are not associative: every mode is pinned to this order). A term
# that answers for some query heads alone (the softmax heads) replaces the sum there, wherever it is listed.
TERM_KINDS: tuple[type[Term], ...] = (GroupedTerm, SoftmaxWindowTerm, SoftmaxHeadsTerm)


def layer_terms(layer) -> tuple[Term, ...]:
    """The terms of ``layer`` (a ``LinspecAttention`` whose projections and settings are set), in summation
    order; building them registers their parameters on the layer."""
    return tuple(term for kind in TERM_KINDS if (term := kind.for_layer(layer)) is not None)
