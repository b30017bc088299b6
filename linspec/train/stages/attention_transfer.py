"""Stage kind ``attention_transfer``: every linear layer learns to reproduce its frozen softmax parent's output.

The hooks (``linspec/train/transfer.py``) pass each layer the original model's hidden states and record a
per-layer relative MSE; backward runs only inside each layer. Trainable: γ (with the decays), the conv, an
optional LoRA on q/k/v/o, feature-map parameters.
"""

from __future__ import annotations

from linspec.train.distributed import wrap
from linspec.train.loop import Objective, TrainingRun, optimise
from linspec.train.recipe import Stage
from linspec.train.trainable import set_trainable
from linspec.train.transfer import AttentionTransfer


class TransferObjective(Objective):
    def __init__(self, transfer: AttentionTransfer) -> None:
        self.transfer = transfer

    def loss(self, forward, batch):
        forward(input_ids=batch, use_cache=False, logits_to_keep=1)  # the hooks record each layer's loss
        return self.transfer.loss()

    def step_metrics(self) -> dict:
        # Which layers linearise badly: candidates for conversion.softmax_layers.
        return {"layer_losses": [round(x, 5) for x in self.transfer.take_layer_losses()]}

    def evaluating(self):
        return self.transfer.paused()  # measure the linear model, not the softmax outputs the hooks pass on


def run(ctx: TrainingRun, index: int, stage: Stage, model):
    """Train ``stage`` on ``model``; returns the (peft-wrapped when it has a LoRA) model."""
    weights_dtype = next(model.parameters()).dtype
    model = set_trainable(model, stage, weights_dtype, ctx.recipe.seed + index)
    model.to(ctx.env.device).train()
    forward = wrap(model, ctx.recipe, ctx.env, stage)
    with AttentionTransfer(model) as transfer:
        optimise(ctx, index, stage, model, forward, TransferObjective(transfer))
    return model
