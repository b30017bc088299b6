"""One module per stage kind, each read top to bottom: prepare the model, define the objective, run the shared
loop (``linspec/train/loop.py``). ``STAGE_KINDS`` maps a recipe's ``kind`` to its ``run`` function."""

from __future__ import annotations

from linspec.train.stages import attention_transfer, finetune

STAGE_KINDS = {
    "attention_transfer": attention_transfer.run,
    "lora": finetune.run,
    "full": finetune.run,
}
