"""``linspec train RECIPE --dry-run``: the recipe's whole pipeline, every stage, on a tiny random Llama.

The recipe is validated as written; then only sizes change (model, sequence length, steps, batch, a drafter's
prompts) and the data becomes linspec's built-in sample text, so a GPU recipe (7B, 4096 tokens, bf16, hub data)
is exercised on a CPU in seconds: conversion, LoRA/peft, the losses, a drafter's self-distillation data,
checkpoints, evaluation and the output directory.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

from linspec.train.recipe import Recipe, validate
from linspec.train.tiny import make_tiny_base

TINY_LAYERS = 2
TINY_KV_HEADS = 2  # make_tiny_base's num_key_value_heads


def shrink(recipe: Recipe, base_dir: Path, output: Path) -> Recipe:
    """The same recipe at toy scale: 2 steps a stage, 2 sequences of 32 tokens a step (a curriculum: 32, then 64),
    G ≤ 8, P ≤ 4, chat data from two prompts."""
    small = copy.deepcopy(recipe)
    small.base, small.output, small.device = str(base_dir), str(output), "cpu"
    if small.conversion is not None:
        shrink_conversion(small)
    small.data.train, small.data.eval, small.data.eval_fraction = ["builtin:sample"], None, 0.25
    small.data.seq_len, small.data.max_train_sequences, small.data.max_eval_sequences = 32, None, 4
    small.checkpoint.every, small.eval.every, small.threads = 1, 0, None
    if small.data.chat is not None:  # two short answers from the tiny model, on the sample text
        chat = small.data.chat
        chat.prompts, chat.num_prompts, chat.max_new_tokens, chat.batch_size = "builtin:sample", 2, 4, 2
    for stage in small.stages:
        stage.steps, stage.batch_size, stage.micro_batch_size = 2, 2, 1
        stage.schedule.warmup_steps = min(stage.schedule.warmup_steps, 1)
        if stage.curriculum:  # a step at 32 tokens, then one at 64 with the last phase's other settings
            first, last = stage.curriculum[0], stage.curriculum[-1]
            stage.curriculum = [
                dataclasses.replace(first, seq_len=32, steps=1),
                dataclasses.replace(last, seq_len=64, steps=1),
            ]
        if stage.drafter is not None:  # 3 + 2 prompts of the sample text, answered in 4 tokens; 8 positions a step
            stage.batch_size = stage.micro_batch_size = 8
            stage.drafter.intermediate_size = min(stage.drafter.intermediate_size, 32)
            data = stage.drafter.data
            data.prompts, data.prompt_kinds, data.num_prompts, data.eval_prompts = "builtin:sample", None, 3, 2
            data.max_new_tokens, data.batch_size, data.text_tokens = 4, 5, 0
    return validate(small)


def shrink_conversion(small: Recipe) -> None:
    """The conversion at toy scale, on the layers and heads the tiny model has."""
    conversion = small.conversion.settings()
    small.conversion.group_size = min(conversion.group_size, 8)
    small.conversion.conv_taps = min(conversion.conv_taps, 4)
    if conversion.softmax_window:  # a window shorter than the toy sequences, so that it slides
        small.conversion.local_window = min(conversion.local_window, 8)
        small.conversion.sink_tokens = min(conversion.sink_tokens, 2)
    if isinstance(small.conversion.softmax_layers, list):
        small.conversion.softmax_layers = [i for i in small.conversion.softmax_layers if i < TINY_LAYERS]
    elif small.conversion.auto_layers() is not None:  # auto:N on the tiny model: at most one of its layers
        small.conversion.softmax_layers = "auto:1"
    if small.conversion.softmax_heads:  # heads the tiny model has (2 layers of 2 kv heads), else one of them
        layers = small.conversion.softmax_layers
        linear = [i for i in range(TINY_LAYERS) if isinstance(layers, list) and i not in layers]  # none if auto:N
        kept = [pair for pair in small.conversion.softmax_heads if pair[0] in linear and pair[1] < TINY_KV_HEADS]
        small.conversion.softmax_heads = kept or [[i, 0] for i in linear[:1]]


def dry_run(recipe: Recipe, keep: str | None = None) -> dict:
    """Run ``recipe`` shrunk; returns the run's summary (perplexities per phase, a drafter's accuracy by depth).
    ``keep``: run dir to keep."""
    import json

    from linspec.train.run import train

    with tempfile.TemporaryDirectory(prefix="linspec-dry-run-") as tmp:
        base_dir = make_tiny_base(Path(tmp) / "tiny-base", num_layers=TINY_LAYERS)
        output = Path(keep) if keep else Path(tmp) / "run"
        result = train(shrink(recipe, base_dir, output), force=True)
        summary = json.loads((output / "summary.json").read_text())
        summary["model_dir"] = str(result)
        return summary
