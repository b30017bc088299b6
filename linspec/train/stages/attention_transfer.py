"""Stage kind ``attention_transfer``: every linear layer learns to reproduce its frozen softmax parent's output.

The hooks (``linspec/train/transfer.py``) pass each layer the original model's hidden states and record a
per-layer loss (relative MSE of the output, or the far attention KL); backward runs only inside each layer.
Trainable: γ (with the decays), the conv, an optional LoRA on q/k/v/o, feature-map and far-memory parameters.

With ``window_sizes`` every step draws one window size (a function of the seed and the step, so a resumed run
draws the same) and runs the layers and their loss with it (SWAX-style stochastic windows): most positions of a
short sequence then lie past a small window and must be served by the far memory. Evaluation keeps the model's
own window.
"""

from __future__ import annotations

import contextlib
import random

import torch

from linspec.models.context import window_size
from linspec.train.distributed import wrap
from linspec.train.loop import Objective, TrainingRun, optimise
from linspec.train.recipe import Phase, Stage
from linspec.train.trainable import set_trainable
from linspec.train.transfer import AttentionTransfer


def drawn_window_size(sizes: list[int], seed: int, step: int) -> int | None:
    """The window size of optimiser step ``step``: one of ``sizes``, drawn from the seed and the step alone
    (None without sizes: the model's own)."""
    if not sizes:
        return None
    return random.Random(f"window-size:{seed}:{step}").choice(sizes)


class TransferObjective(Objective):
    def __init__(self, transfer: AttentionTransfer, window_sizes: list[int] | None = None, seed: int = 0) -> None:
        self.transfer = transfer
        self.window_sizes = list(window_sizes or [])
        self.seed = seed
        self.size: int | None = None

    def batch(self, ctx: TrainingRun, stage: Stage, step: int, phase: Phase) -> torch.Tensor:
        self.size = drawn_window_size(self.window_sizes, self.seed, step)
        return super().batch(ctx, stage, step, phase)

    def loss(self, forward, batch):
        # The KL alone reads no layer output: the forward runs the parents' attention alone and keeps no graph.
        graph = contextlib.nullcontext() if self.transfer.needs_layer_outputs else torch.no_grad()
        window = contextlib.nullcontext() if self.size is None else window_size(self.size)
        with graph, window:
            forward(input_ids=batch, use_cache=False, logits_to_keep=1)  # the hooks record each layer's loss
        return self.transfer.loss()

    def step_metrics(self) -> dict:
        # Which layers linearise badly: candidates for conversion.softmax_layers.
        metrics = {"layer_losses": [round(x, 5) for x in self.transfer.take_layer_losses()]}
        if self.size is not None:
            metrics["window_size"] = self.size
        return metrics

    def evaluating(self):
        return self.transfer.paused()  # measure the linear model, not the softmax outputs the hooks pass on


def run(ctx: TrainingRun, index: int, stage: Stage, model):
    """Train ``stage`` on ``model``; returns the (peft-wrapped when it has a LoRA) model."""
    weights_dtype = next(model.parameters()).dtype
    model = set_trainable(model, stage, weights_dtype, ctx.recipe.seed + index)
    model.to(ctx.env.device).train()
    forward = wrap(model, ctx.recipe, ctx.env, stage)
    with AttentionTransfer(model, stage.loss, stage.output_mse_weight) as transfer:
        objective = TransferObjective(transfer, stage.window_sizes, ctx.recipe.seed + index)
        optimise(ctx, index, stage, model, forward, objective)
    return model
