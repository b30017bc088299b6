"""``softmax_layers: auto:N``: keep as softmax the N decoder layers whose linearisation costs the most, measured.

A user who wants retrieval back for a small part of the KV cache names how many softmax layers to keep, not
which. The choice is measured, not guessed from per-layer transfer losses (a layer with a large relative error can
matter little downstream): each linear layer is run alone as softmax attention with its current weights
(``linspec.evaluation.perplexity.softmax_restored``) and scored on held-out text — perplexity by default, or any
score such as the passkey key loss — and sets of layers are built from that ranking (``rank_layers``, printed by
``linspec eval layers``). ``auto:N`` keeps the best N ranked alone (``choose_softmax_layers``). Ranking a raw
conversion measures local-only attention; ranking after attention transfer measures the layer as it will be
trained, and since transfer trains every layer against the original residual stream, that ranking carries over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from linspec.config import LinspecConfig
from linspec.conversion.choice import Auto
from linspec.conversion.convert import convert
from linspec.errors import LinspecError
from linspec.evaluation.perplexity import perplexity_of_sequences, softmax_restored
from linspec.utils.validation import check_count

SEARCHES = ("single", "greedy")


@dataclass
class LayerRanking:
    baseline: float  # score (perplexity, or passkey NLL) with every layer linear
    single: dict[int, float]  # layer -> score with only that layer restored to softmax
    cumulative: list[tuple[list[int], float]]  # the chosen sets of 1..top layers and their score


@torch.no_grad()
def rank_layers(
    model,
    sequences: torch.Tensor | None,
    top: int = 8,
    progress: bool = True,
    score: Callable[[Any], float] | None = None,
    search: str = "single",
    pool: int | None = None,
) -> LayerRanking:
    """Which layers to keep softmax: restore each linear layer alone and score what that leaves (lower is better;
    default: the perplexity of ``sequences``), then build sets of 1..``top`` layers.

    ``search="single"`` takes the best ``k`` single layers together. ``"greedy"`` (forward selection) adds, at
    each step, the layer that scores best *together with* the ones already chosen, among the ``pool`` best single
    layers (default: all): layers that each help alone often do the same job (two retrieval heads reading the
    same key), and the second one then adds little — forward selection finds the layer that helps next. A
    passkey scorer (``linspec.evaluation.passkey.key_nll_scorer``) ranks by retrieval instead of fluency."""
    if search not in SEARCHES:
        raise LinspecError(f"search must be one of {', '.join(SEARCHES)}; got {search!r}")
    if score is None:

        def score(m) -> float:
            return perplexity_of_sequences(m, sequences).ppl

    def restored_score(layers: list[int]) -> float:
        with softmax_restored(model, layers):
            return score(model)

    model.eval()
    layers = [m.layer_idx for m in model.linspec_modules()]
    baseline = score(model)
    single = {layer: restored_score([layer]) for layer in tqdm(layers, desc="one layer softmax", disable=not progress)}
    order = sorted(layers, key=single.__getitem__)
    steps = min(top, len(order))
    cumulative = []
    if search == "single":
        for k in tqdm(range(1, steps + 1), desc="best k together", disable=not progress):
            chosen = sorted(order[:k])
            cumulative.append((chosen, single[order[0]] if k == 1 else restored_score(chosen)))
        return LayerRanking(baseline, single, cumulative)
    candidates = order[: max(pool or len(order), steps)]
    chosen = [order[0]]
    cumulative.append((chosen, single[order[0]]))
    for _ in tqdm(range(2, steps + 1), desc="forward selection", disable=not progress):
        scores = {layer: restored_score(sorted([*chosen, layer])) for layer in candidates if layer not in chosen}
        best = min(scores, key=scores.__getitem__)
        chosen = sorted([*chosen, best])
        cumulative.append((chosen, scores[best]))
    return LayerRanking(baseline, single, cumulative)


def choose_softmax_layers(model, sequences: torch.Tensor, n: int, progress: bool = False) -> tuple[int, ...]:
    """The ``n`` layers to keep softmax (``softmax_layers: auto:N``): the best ``n`` of :func:`rank_layers`.

    ``model`` is an all-linear linspec model (a raw conversion or, better, one after attention transfer);
    ``sequences [N, L]`` is held-out text. Layers are ranked alone and the best ``n`` kept together, which is
    what ``linspec eval layers`` prints as its ``n``-th candidate."""
    layers = [m.layer_idx for m in getattr(model, "linspec_modules", list)()]
    check_count(n, "auto:N (the softmax layers kept, at most the model's linear layers)", 1, len(layers))
    ranking = rank_layers(model, sequences, top=n, progress=progress)
    return tuple(ranking.cumulative[-1][0])


def resolve_softmax_layers(
    base, settings: LinspecConfig, auto: Auto, sequences: torch.Tensor, progress: bool = True
) -> LinspecConfig:
    """``settings`` with ``softmax_layers`` chosen for the softmax model ``base``: convert it all-linear (sharing
    its weights, nothing is modified), rank its layers on ``sequences`` and keep the best ``auto.count``."""
    if auto.count >= base.config.num_hidden_layers:
        raise LinspecError(f"{auto} keeps every layer of a {base.config.num_hidden_layers}-layer model softmax")
    all_linear = convert(base, dataclasses.replace(settings, softmax_layers=()))
    chosen = choose_softmax_layers(all_linear.eval(), sequences, auto.count, progress=progress)
    return dataclasses.replace(settings, softmax_layers=chosen)
