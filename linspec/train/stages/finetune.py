"""Stage kinds ``lora`` and ``full``: the whole network trains end to end, against the next token or against the
original model's distribution.

``lora`` trains a peft LoRA plus whatever ``trainable`` names; ``full`` trains every parameter. Under
``distributed: fsdp`` the model is sharded. Curriculum phases may turn activation checkpointing on: a long
phase's activations grow with its length, a short phase runs faster without recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linspec.models import hf
from linspec.train.distributed import wrap
from linspec.train.loop import Objective, TrainingRun, optimise
from linspec.train.recipe import Phase, Stage
from linspec.train.trainable import set_trainable


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) over the vocabulary at every position, × T² (Hinton et al.), mean over positions."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, -1)  # (B, L, V)
    target = F.log_softmax(teacher_logits.float() / t, -1)
    return F.kl_div(student, target, log_target=True, reduction="none").sum(-1).mean() * t * t


class FinetuneObjective(Objective):
    def __init__(self, stage: Stage, model, teacher, gradient_checkpointing: bool) -> None:
        self.stage, self.model, self.teacher = stage, model, teacher
        self.default_checkpointing = gradient_checkpointing
        self.checkpointing = False

    def loss(self, forward, batch):
        if self.stage.loss == "next_token":
            return forward(input_ids=batch, labels=batch, use_cache=False).loss
        student = forward(input_ids=batch, use_cache=False).logits
        with torch.no_grad():
            target = self.teacher(input_ids=batch, use_cache=False).logits
        return distillation_loss(student, target, self.stage.distill_temperature)

    def enter_phase(self, phase: Phase | None) -> None:
        wanted = False
        if phase is not None:
            wanted = (
                self.default_checkpointing if phase.gradient_checkpointing is None else phase.gradient_checkpointing
            )
        if wanted and not self.checkpointing:
            hf.set_activation_checkpointing(self.model, True)
        elif self.checkpointing and not wanted:
            hf.set_activation_checkpointing(self.model, False)
        self.checkpointing = wanted


def run(ctx: TrainingRun, index: int, stage: Stage, model):
    """Train ``stage`` on ``model``; returns the (peft-wrapped for ``lora``) model."""
    if stage.loss == "distill" and ctx.teacher is None:
        raise ValueError("a distillation stage needs the teacher (the original model)")
    weights_dtype = next(model.parameters()).dtype
    model = set_trainable(model, stage, weights_dtype, ctx.recipe.seed + index)
    model.to(ctx.env.device).train()
    objective = FinetuneObjective(stage, model, ctx.teacher, ctx.recipe.gradient_checkpointing)
    forward = wrap(model, ctx.recipe, ctx.env, stage)
    optimise(ctx, index, stage, model, forward, objective)
    return model
