"""Perplexity as a function of context length: does more context help, or does the model fall apart past it?

The text is cut into blocks of ``max(lengths)`` tokens. For every length L, each block's last L tokens are one
window, and only the block's last ``score_tokens`` tokens are scored. So every length scores *the same
tokens*, each seen after L − score_tokens .. L − 1 tokens of context: the curve differs only in how much
context the model had, never in which text it was asked about. Windows run chunk-wise through the cache
(``linspec.evaluation.perplexity.next_token_scores``), so memory stays bounded at any length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from linspec.errors import LinspecError
from linspec.utils.validation import MAX_LENGTH, MAX_WINDOWS, check_count, is_count


@dataclass
class LengthPoint:
    length: int  # tokens per window
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int  # tokens scored (windows × score_tokens)
    windows: int
    seconds: float


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover (``None`` when the config does not say); a
    multimodal config keeps it in its text model's config."""
    config = model.config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def check_lengths(model, lengths: Sequence[int], minimum: int = 2) -> list[int]:
    """Sorted unique lengths, each ``>= minimum`` and within the model's positions; else one clear error."""
    if not lengths:
        raise LinspecError("give at least one length")
    bad = [n for n in lengths if not is_count(n, minimum, MAX_LENGTH)]
    if bad:
        raise LinspecError(f"lengths must be integers in {minimum}..{MAX_LENGTH}; got {bad[:5]}")
    check_within_positions(model, max(lengths))
    return sorted(set(lengths))


def check_within_positions(model, longest: int, what: str | None = None) -> None:
    """Refuse a context of ``longest`` tokens past the model's positions (``what`` names it in the error, by
    default ``length N``): RoPE and learnt positions are not defined there, so whatever ran would measure a model
    out of its range."""
    limit = max_positions(model)
    if isinstance(limit, int) and longest > limit:
        what = what or f"length {longest}"
        raise LinspecError(f"{what} exceeds the model's {limit} positions (max_position_embeddings)")


def perplexity_by_length(
    model,
    ids: torch.Tensor,
    lengths: Sequence[int],
    max_windows: int = 4,
    score_tokens: int | None = None,
    chunk: int = 512,
    progress: bool = True,
    label: str = "",
) -> list[LengthPoint]:
    """One :class:`LengthPoint` per length (see the module docstring). ``score_tokens`` defaults to half the
    shortest length; ``max_windows`` blocks of ``max(lengths)`` tokens are used, as many as the text holds."""
    from tqdm.auto import tqdm

    from linspec.evaluation.perplexity import next_token_scores

    lengths = check_lengths(model, lengths)
    check_count(max_windows, "max_windows", 1, MAX_WINDOWS)
    check_count(chunk, "chunk", 1, MAX_LENGTH)
    score = score_tokens if score_tokens is not None else max(lengths[0] // 2, 1)
    if not 1 <= score < lengths[0]:
        raise LinspecError(f"score_tokens must be in 1..{lengths[0] - 1} (below the shortest length); got {score}")
    block = lengths[-1]
    blocks = min(max_windows, len(ids) // block)
    if blocks == 0:
        raise LinspecError(f"the text has {len(ids)} tokens; length {block} needs at least that many")
    model.eval()
    points = []
    bar = tqdm(total=blocks * len(lengths), desc=f"perplexity by length {label}".strip(), disable=not progress)
    for length in lengths:
        total, start = 0.0, time.perf_counter()
        for b in range(blocks):
            window = ids[(b + 1) * block - length : (b + 1) * block]
            logprobs, _ = next_token_scores(model, window, chunk)
            total -= float(logprobs[-score:].sum())
            bar.update()
        count = blocks * score
        bar.set_postfix(length=length, ppl=f"{math.exp(total / count):.2f}")
        points.append(
            LengthPoint(length, math.exp(total / count), total / count, count, blocks, time.perf_counter() - start)
        )
    bar.close()
    return points


def plot_length_curves(
    curves: dict[str, list[LengthPoint]], title: str = "perplexity vs context length", dashed: set[str] = frozenset()
):
    """A log-y figure, one line per model; the curves named in ``dashed`` (ablated variants, baselines) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        style = "--" if label in dashed else "-"
        axes.plot([p.length for p in points], [p.ppl for p in points], style, marker="o", label=label)
    length_axis(axes, [p.length for points in curves.values() for p in points])
    axes.set_yscale("log")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity of the same scored tokens")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def length_axis(axes, lengths: Sequence[int]) -> None:
    """A log-2 x axis labelled with the measured lengths themselves (256, 1024, ...), not powers of two."""
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(lengths))
    axes.set_xscale("log", base=2)
    axes.set_xticks(ticks, [str(n) for n in ticks])
    axes.xaxis.set_minor_locator(NullLocator())
