"""One module per stage kind, each read top to bottom: prepare the model, define the objective, run the shared
loop (``linspec/train/loop.py``). ``STAGE_KINDS`` maps a recipe's ``kind`` to the ``run`` function of a stage that
trains the model; ``drafter`` (a drafter for the model, which stays as it is) writes a drafter instead, so the run
(``linspec/train/run.py``) calls it apart."""

from __future__ import annotations

from linspec.train.stages import attention_transfer, finetune

STAGE_KINDS = {
    "attention_transfer": attention_transfer.run,
    "lora": finetune.run,
    "full": finetune.run,
}
