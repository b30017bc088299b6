"""Drafter recipes: a YAML whose top level has ``drafter:``, validated like the training recipes (same
``key=value`` overrides, unknown keys and bad values refused with one line naming the key) — a recipe kind of
its own, trained by :mod:`linspec.drafting.train`, not a stage of the model-training pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from linspec.data.prompts import check_kinds, verbatim_prompts
from linspec.drafting.base import MAX_DEPTH
from linspec.errors import LinspecError
from linspec.train.recipe import (
    MAX_STEPS,
    _check_source,
    _positive,
    build_recipe,
    check_seeds,
    read_recipe_file,
)


@dataclass
class DrafterSpec:
    """What to train: kind medusa (K heads on the last hidden state), eagle (a feature-level layer, autoregressive)
    or redrafter (a recurrent cell over token embeddings)."""

    kind: Literal["medusa", "eagle", "redrafter"] = "medusa"  # drafter architecture
    depth: int = 4  # tokens drafted per round it is trained for (medusa: number of heads)
    draft_vocab: int | None = 8192  # most frequent target tokens the drafter may propose (null: the whole vocabulary)
    intermediate_size: int = 1024  # eagle: width of the layer's MLP


@dataclass
class DistillData:
    """Self-distillation data: the target's own greedy continuations of instruction prompts built from a corpus,
    and its final hidden states on them; cached in linspec's cache, keyed by target and these settings."""

    prompts: str = "builtin:wiki-en"  # builtin:NAME, a corpus file, or prompts verbatim (.txt lines, .jsonl "prompt")
    prompt_kinds: list[str] | None = (
        None  # kinds built from a corpus, in turn (linspec.data.prompts.KINDS; null: TEMPLATES)
    )
    num_prompts: int = 96  # training prompts
    eval_prompts: int = 8  # held-out prompts for the per-depth accuracy
    max_new_tokens: int = 96  # continuation length per prompt
    batch_size: int = 16  # prompts generated together
    seed: int = 0  # which paragraphs become prompts (and which text windows are read)
    text: str = "builtin:wiki-en"  # plain text the target reads in parallel, labelled with its own next-token choice
    text_tokens: int = 0  # tokens of it (0: none); ~7x cheaper per position than generating continuations
    text_length: int = 256  # tokens per text window (the context the target sees when labelling)


@dataclass
class Optimisation:
    """AdamW over the drafter's own weights (the target stays frozen), warm-up then cosine decay."""

    steps: int = 400  # optimiser steps
    batch_size: int = 64  # positions per step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay
    warmup_steps: int = 20  # linear warm-up steps
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    grad_clip: float = 1.0  # max gradient norm
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)


@dataclass
class CheckpointEvery:
    """Atomic checkpoints under OUTPUT/checkpoints; --resume continues from the newest."""

    every: int = 100  # steps between checkpoints (0: only at the end and on Ctrl-C)
    keep: int = 2  # newest checkpoints kept


@dataclass
class DrafterRecipe:
    """Train a drafter for TARGET from the target itself; the result is OUTPUT/drafter."""

    target: str = "smollm2-135m"  # the model the drafter drafts for: demo name, model directory, .gguf or hub id
    output: str = "runs/drafter"  # run directory: checkpoints/, metrics.jsonl, drafter/
    drafter: DrafterSpec = field(default_factory=DrafterSpec)
    data: DistillData = field(default_factory=DistillData)
    train: Optimisation = field(default_factory=Optimisation)
    checkpoint: CheckpointEvery = field(default_factory=CheckpointEvery)
    threads: int | None = 1  # torch CPU threads (null: torch's default)
    seed: int = 0  # initialisation and batch order


def is_drafter_recipe(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a file or a shipped name) is a drafter recipe; anything unreadable is left to the
    ordinary recipe loader to report."""
    try:
        data, _ = read_recipe_file(path)
    except (LinspecError, OSError):
        return False
    return isinstance(data, dict) and "drafter" in data


def validate(recipe: DrafterRecipe) -> DrafterRecipe:
    spec, data, opt = recipe.drafter, recipe.data, recipe.train
    if not recipe.target.strip():
        raise LinspecError("recipe key target: empty")
    if not recipe.output.strip():
        raise LinspecError("recipe key output: empty")
    if not 1 <= spec.depth <= MAX_DEPTH:
        raise LinspecError(f"recipe key drafter.depth: must be in 1..{MAX_DEPTH}, got {spec.depth}")
    _positive(spec.draft_vocab, "drafter.draft_vocab", limit=1 << 24)
    _positive(spec.intermediate_size, "drafter.intermediate_size", limit=1 << 16)
    _check_source(data.prompts, "data.prompts")
    if data.prompt_kinds is not None:
        try:
            check_kinds(data.prompt_kinds)
        except LinspecError as error:
            raise LinspecError(f"recipe key data.prompt_kinds: {error}") from None
        if verbatim_prompts(data.prompts) is not None:
            raise LinspecError(f"recipe key data.prompt_kinds: {data.prompts} holds prompts verbatim; kinds apply to "
                               "prompts built from a corpus")  # fmt: skip
    if data.text_tokens:
        _check_source(data.text, "data.text")
    _positive(data.text_tokens, "data.text_tokens", allow_zero=True, limit=1 << 26)
    _positive(data.text_length, "data.text_length", limit=1 << 14)
    if data.text_length < 2:
        raise LinspecError(f"recipe key data.text_length: must be at least 2, got {data.text_length}")
    limits = {"num_prompts": 1 << 20, "eval_prompts": 1 << 16, "max_new_tokens": 1 << 14, "batch_size": 1 << 12}
    for key, limit in limits.items():
        _positive(getattr(data, key), f"data.{key}", limit=limit)
    _positive(opt.steps, "train.steps", limit=MAX_STEPS)
    _positive(opt.batch_size, "train.batch_size", limit=1 << 16)
    _positive(opt.lr, "train.lr")
    _positive(opt.weight_decay, "train.weight_decay", allow_zero=True)
    _positive(opt.warmup_steps, "train.warmup_steps", allow_zero=True, limit=MAX_STEPS)
    _positive(opt.grad_clip, "train.grad_clip")
    _positive(opt.eval_every, "train.eval_every", allow_zero=True, limit=MAX_STEPS)
    if not 0 <= opt.min_lr_ratio <= 1:
        raise LinspecError(f"recipe key train.min_lr_ratio: must be in [0, 1], got {opt.min_lr_ratio!r}")
    _positive(recipe.checkpoint.every, "checkpoint.every", allow_zero=True, limit=MAX_STEPS)
    _positive(recipe.checkpoint.keep, "checkpoint.keep", limit=1000)
    _positive(recipe.threads, "threads", limit=1024)
    check_seeds(recipe)
    return recipe


def load_drafter_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> DrafterRecipe:
    """Read a drafter recipe (a file, or a shipped recipe's name), apply ``key=value`` overrides, validate."""
    return validate(build_recipe(DrafterRecipe, path, overrides, "drafter:, target:, ..."))
