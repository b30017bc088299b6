"""Held-out perplexity during training: ``linspec.evaluation.perplexity``'s scoring, split over the processes of a
run; and the final quality curve a trained model's card shows (perplexity by context length, beside its baselines)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from linspec.evaluation.perplexity import sequence_nll, token_nll
from linspec.train.distributed import DTYPES, Env
from linspec.train.recipe import Recipe, Stage

# Held-out tokens the curve scores per model: two 2048-token sequences for the demo recipe, about 70 s for the
# model, its window-only ablation and the original together on one CPU thread.
CURVE_TOKENS = 4096


def autocast(env: Env, precision: str):
    """The mixed precision the run trains in, for its evaluations too."""
    return torch.autocast(env.device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


@torch.no_grad()
def evaluate(
    forward, sequences: torch.Tensor, env: Env, precision: str, first_stage: Stage
) -> tuple[float, int, float]:
    """``(perplexity, tokens scored, seconds)`` over packed ``sequences [M, L]``. Each process scores its share
    (the same number each, so collectives stay in step) in micro batches of the first stage; the sums are added
    over processes. ``forward`` may be a DDP/FSDP wrapper; its train/eval mode is restored afterwards."""
    was_training = forward.training
    forward.eval()
    share = sequences[env.rank :: env.world][: len(sequences) // env.world]
    start = time.perf_counter()
    total, count = 0.0, 0
    for batch in share.split(max(1, first_stage.micro_batch_size)):
        with autocast(env, precision):
            nll, n = sequence_nll(forward, batch.to(env.device))
        total, count = total + nll, count + n
    total, count = env.sum([total, count])
    forward.train(was_training)
    return math.exp(total / count), int(count), time.perf_counter() - start


@dataclass
class LengthCurve:
    """Perplexity by context length: ``ppl[i]`` over the tokens predicted from ``bounds[i-1]`` (0 for the first)
    to ``bounds[i] − 1`` tokens of context, in ``sequences`` held-out sequences of ``bounds[-1]`` tokens."""

    bounds: list[int]
    ppl: list[float]
    tokens: list[int]
    sequences: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def curve_plan(recipe: Recipe, settings, held_out: int) -> list[int]:
    """The context bounds of the final curve: every sequence length the run trains or evaluates at, and the softmax
    window's edge (where the memory starts to matter), up to the longest that the held-out tokens fill once."""
    lengths = {recipe.data.seq_len, *(n for stage in recipe.stages for n in stage.seq_lens(recipe.data.seq_len))}
    if settings.softmax_window:
        lengths.add(settings.local_window)
    longest = min(max(lengths), held_out)
    return sorted({n for n in lengths if n < longest} | {longest})


def curve_sequences(eval_seqs: torch.Tensor, length: int) -> torch.Tensor:
    """The held-out tokens (packed back to back, as ``linspec.data.documents.pack`` cut them) regrouped into sequences
    of ``length``: the same text the run evaluates on, with longer contexts; at most ``CURVE_TOKENS`` tokens."""
    flat = eval_seqs.reshape(-1)
    count = max(1, min(len(flat) // length, math.ceil(CURVE_TOKENS / length)))
    return flat[: count * length].view(count, length)


@torch.no_grad()
def length_curve(model, sequences: torch.Tensor, bounds: list[int], env: Env, precision: str) -> LengthCurve:
    """Perplexity of ``model`` (a plain model, not a DDP/FSDP wrapper) by context length over ``sequences``: one
    forward per sequence, its token losses summed into the bands between ``bounds``."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    edges = torch.tensor(bounds)
    totals = torch.zeros(len(bounds), dtype=torch.float64)
    counts = torch.zeros(len(bounds), dtype=torch.long)
    context = torch.arange(1, sequences.shape[1])  # the context each next-token prediction has
    band = torch.bucketize(context, edges, right=True)  # the band of each prediction
    for sequence in sequences:
        with autocast(env, precision):
            nll = token_nll(model, sequence[None].to(env.device))[0].double().cpu()
        totals += torch.zeros_like(totals).index_add_(0, band, nll)
        counts += torch.bincount(band, minlength=len(bounds))
    model.train(was_training)
    ppl = [math.exp(t / c) if c else math.nan for t, c in zip(totals.tolist(), counts.tolist(), strict=True)]
    return LengthCurve(bounds, ppl, counts.tolist(), len(sequences), time.perf_counter() - start)


CURVE_KEYS = ("bounds", "ppl", "tokens", "sequences", "seconds")


def record_curve(ctx, model, label: str) -> None:
    """Measure ``model``'s :class:`LengthCurve` on the run's held-out tokens and log it (an ``eval``-like ``curve``
    record under ``label``). The main process alone measures: ``model`` is plain there, and the curve is small."""
    if not ctx.env.main:
        return
    recipe = ctx.recipe
    bounds = curve_plan(recipe, recipe.conversion.settings(), ctx.eval_seqs.numel())
    curve = length_curve(model, curve_sequences(ctx.eval_seqs, bounds[-1]), bounds, ctx.env, recipe.precision)
    ctx.log.write(event="curve", stage=label, **curve.to_dict())
    starts = [0, *bounds[:-1]]
    shown = ", ".join(f"{max(a, 1)}-{b - 1}: {p:.2f}" for a, b, p in zip(starts, bounds, curve.ppl, strict=True))
    ctx.say(f"held-out perplexity by context ({label}): {shown}")


def record_final_curves(ctx, model) -> None:
    """The trained model's curve, and the same model with its global memory and convolution ablated (``local-only``
    in ``linspec eval ppl --ablations``): the window alone, what the long-range path is measured against."""
    from linspec.evaluation.perplexity import ABLATIONS, ablated

    record_curve(ctx, model, "model")
    if model.linspec_modules():
        with ablated(model, ABLATIONS["local-only"]):
            record_curve(ctx, model, "local-only")
