"""Stage kind ``drafter``: a drafter for the model as the stages before it leave it (or the base as it is), trained
from the model itself, which stays frozen. The result is a drafter directory (``drafter.json`` +
``drafter.safetensors``) that ``linspec generate --draft KIND --drafter DIR`` loads.

The data is the model's own greedy continuations of instruction prompts and its hidden states on them
(``linspec.drafting.data``, cached by the model's fingerprint). A batch is ``batch_size`` (text, position) pairs
drawn by a generator seeded with the step, so a resumed run draws the same batches. The loss is the drafter's
cross-entropy to the model's choices at every draft depth; the evaluation, its held-out top-1 accuracy per depth.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from linspec.errors import LinspecError
from linspec.train.cards import drafter_card
from linspec.train.legacy_drafter import legacy_checkpoints, load_legacy_checkpoint
from linspec.train.loop import Checkpoints, Objective, TrainingRun, make_optimizer, optimise
from linspec.train.recipe import Phase, Stage
from linspec.train.state import checkpoint_dirs

EVAL_BATCH = 256  # held-out positions scored together


class DrafterObjective(Objective):
    def __init__(self, module, data: dict, seed: int) -> None:
        from linspec.drafting.data import positions

        self.module, self.data, self.seed = module, data, seed
        self.train_at = positions(data["train_tokens"])  # (M, 2) (text, position) pairs with a next token
        self.accuracy: list[float] = []

    def batch(self, ctx: TrainingRun, stage: Stage, step: int, phase: Phase) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.train_at[torch.randint(self.train_at.shape[0], (stage.batch_size,), generator=generator)]

    def tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0]  # positions: each drafts from one of the model's tokens

    def loss(self, forward, batch):
        from linspec.drafting.data import examples

        data = self.data
        parts = examples(data["train_tokens"], data["train_hidden"], data["train_labels"], batch, forward.max_depth)
        return forward.loss(*parts)[0]

    def step_metrics(self) -> dict:
        return {"seq_len": None}  # a drafter's batch is positions of the model's texts, not sequences

    def evaluate(self, ctx: TrainingRun, forward, stage: str, step: int) -> None:
        self.accuracy = accuracy_by_depth(self.module.eval(), self.data)
        ctx.log.write(event="eval", stage=stage, step=step, accuracy_by_depth=self.accuracy)
        ctx.say(f"held-out top-1 accuracy by draft depth ({stage}, step {step}): {self.accuracy}")


@torch.no_grad()
def accuracy_by_depth(module, data: dict) -> list[float]:
    """Held-out top-1 accuracy per draft depth on the model's continuations (depth 1 = first draft)."""
    from linspec.drafting.data import examples, positions

    tokens, hidden, labels = (data[f"eval_{name}"] for name in ("tokens", "hidden", "labels"))
    at = positions(tokens)
    hits = counted = 0
    for first in range(0, at.shape[0], EVAL_BATCH):
        _, h, c = module.loss(*examples(tokens, hidden, labels, at[first : first + EVAL_BATCH], module.max_depth))
        hits, counted = hits + h, counted + c
    return [round(float(h) / max(int(c), 1), 4) for h, c in zip(hits, counted, strict=True)]


def run(ctx: TrainingRun, index: int, stage: Stage, model, stage_dir: Path):
    """Train ``stage``'s drafter for ``model`` and write it to ``stage_dir`` and OUTPUT/drafter; returns ``model``
    unchanged. The self-distillation data is built on the CPU (``linspec.drafting.data`` runs there)."""
    from linspec.drafting.data import self_distillation_data
    from linspec.drafting.fingerprint import target_fingerprint
    from linspec.drafting.store import build, save_drafter
    from linspec.drafting.vocab import most_frequent_tokens
    from linspec.utils.paths import cache_root

    if ctx.env.world > 1:
        raise LinspecError(f"recipe key stages[{index}].kind: a drafter stage runs in one process, not under torchrun")
    settings = stage.drafter
    target = model.to("cpu").eval().requires_grad_(False)
    fingerprint = target_fingerprint(target)
    data = self_distillation_data(target, ctx.tokenizer, settings.data, cache_root() / "drafting", fingerprint)
    vocab_size = target.get_output_embeddings().weight.shape[0]
    token_ids = None
    if settings.draft_vocab is not None:
        token_ids = most_frequent_tokens(data["train_labels"], vocab_size, min(settings.draft_vocab, vocab_size))
    torch.manual_seed(ctx.recipe.seed)
    draft_vocab = None if token_ids is None else token_ids.numel()
    module = build(settings.kind, target, settings.module_settings(draft_vocab), token_ids).train()
    adopt_legacy_checkpoint(ctx, stage, module)
    objective = DrafterObjective(module, data, ctx.recipe.seed)
    optimise(ctx, index, stage, module, module, objective)
    training = {"recipe": asdict(ctx.recipe), "steps": stage.steps, "eval_accuracy_by_depth": objective.accuracy}
    fingerprint = target_fingerprint(target)
    if ctx.env.main:  # the run's result first, then the stage's copy, which marks the stage finished
        for path in (Path(ctx.recipe.output) / "drafter", stage_dir):
            card = drafter_card(module.kind, module.settings, fingerprint, training, str(path))
            save_drafter(module, path, target, ctx.tokenizer, training=training, force=True, card=card)
    return model.to(ctx.env.device)


def adopt_legacy_checkpoint(ctx: TrainingRun, stage: Stage, module) -> None:
    """Under ``--resume``, a run directory written before drafter training was a stage holds checkpoints of the
    old format (``checkpoints/step-N/``): the newest is read into ``module`` and a fresh optimiser and saved as a
    checkpoint of this stage at the same step, so the loop resumes from it like from any other."""
    run_dir = Path(ctx.recipe.output)
    found = legacy_checkpoints(run_dir)
    if not (ctx.resume and found) or checkpoint_dirs(run_dir, stage.name):
        return
    optimizer, scheduler = make_optimizer(stage, module.trainable_parameters())
    step = load_legacy_checkpoint(found[-1], module, optimizer, stage.steps)
    with warnings.catch_warnings():  # the schedule is moved to the step without optimiser steps in between
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    Checkpoints(ctx, stage, module, optimizer, scheduler).save(step)
    for path in found:
        shutil.rmtree(path)
    ctx.say(f"stage {stage.name}: read the old-format checkpoint {found[-1].name} of this run")
