"""The cards a training run writes: the model card of a trained model and the ``README.md`` of a trained drafter.

Both say how to rebuild what they describe with the ``linspec train`` command of the shipped recipe and overrides
that give the resolved recipe (``linspec.train.reproduce``), and what the run measured; numbers it did not measure
are named as missing. The card itself and its rendering are ``linspec.models.card``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import yaml

from linspec.conversion.card import describe_source
from linspec.models.cache_size import measured_cache_growth, softmax_cache_growth
from linspec.models.card import ModelCard, Quality
from linspec.train.reproduce import drafter_train_argv, train_argv


def training_card(recipe, model, summary: dict) -> ModelCard:
    """The card of a trained model: ``recipe`` (a ``linspec.train.recipe.Recipe``) as the shipped recipe and
    overrides that give it, its stages and data, and what the run measured (``summary.json``)."""
    stages = []
    for stage in recipe.stages:
        lengths = "/".join(map(str, stage.seq_lens(recipe.data.seq_len)))
        stages.append(f"{stage.name}: {stage.kind}, {stage.steps} steps, sequences of {lengths} tokens")
    parts = [", ".join(recipe.data.train)]
    if recipe.data.chat is not None:
        parts.append(f"chat answers of the original to {recipe.data.chat.num_prompts} prompts")
    if recipe.data.recall is not None:
        parts.append(f"{recipe.data.recall.ratio:.0%} recall sequences (facts restated at the end)")
    held_out = (
        f"`{recipe.data.eval}`"
        if recipe.data.eval
        else f"{recipe.data.eval_fraction:.0%} of the training documents, set aside before training"
    )
    quality = Quality(
        data=held_out,
        curve=summary.get("curve", {}),
        phases=summary.get("ppl", {}),
        phase_length=recipe.data.seq_len,
    )
    return ModelCard(
        source=describe_source(recipe.base),
        settings=model.config.linspec_settings,
        location=str(Path(recipe.output) / "model"),
        reproduce=train_argv(recipe),
        recipe=yaml.safe_dump(asdict(recipe), sort_keys=False),
        training=stages,
        data="; ".join(parts),
        quality=quality,
        cache=measured_cache_growth(model),
        original_cache=softmax_cache_growth(model.config, next(model.parameters()).dtype),
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )


def drafter_card(kind: str, settings: dict, target: dict, training: dict, location: str) -> str:
    """The ``README.md`` of a trained drafter directory written to ``location``: what it drafts for, how to use it,
    and how it was trained — the ``linspec train`` command of its recipe when ``training`` records one."""
    recipe = training.get("recipe") if isinstance(training.get("recipe"), dict) else None
    target_name = recipe["base"] if recipe and isinstance(recipe.get("base"), str) else "TARGET"
    settings_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(settings.items()))
    measured = {key: value for key, value in training.items() if key != "recipe"}
    training_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(measured.items())) or "| — | — |"
    target_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(target.items()))
    drafter, model = shlex.quote(location), shlex.quote(target_name)
    placeholder = (
        "" if recipe else "\n`TARGET` stands for the model this drafter was trained for (its fingerprint is below).\n"
    )
    reproduce = ""
    if recipe:
        argv = drafter_train_argv(recipe)
        command = f"```bash\nlinspec {shlex.join(argv)}\n```\n\n" if argv else ""
        dumped = yaml.safe_dump(recipe, sort_keys=False).rstrip()
        reproduce = (
            f"## Reproduce\n\n{command}<details><summary>resolved recipe</summary>\n\n```yaml\n{dumped}\n```\n\n"
            "</details>\n\n"
        )
    return f"""---
library_name: linspec
tags: [linspec, speculative-decoding, drafter, {kind}]
---

# linspec {kind} drafter

A trained drafter for linspec's exact speculative decoding: it proposes tokens, the target verifies them in one
forward, and the output is exactly the target's (greedy: the same tokens; sampling: the same distribution). It
holds only its own weights; the target's embeddings and head are read from the target when it loads, so it
loads against the target it was trained for and no other (the fingerprint below is checked).

## Use

```bash
linspec generate {model} --draft {kind} --drafter {drafter} --prompt "..." --stats
```

```python
import linspec
from linspec.drafting import load_drafter

model, tokenizer = linspec.load({json.dumps(target_name)})
drafter = load_drafter({json.dumps(location)}, model, tokenizer).drafter()
out = linspec.speculative_generate(model, drafter, input_ids, max_new_tokens=64)
```
{placeholder}
## Settings

| setting | value |
|---|---|
{settings_rows}

## Target

| fingerprint | value |
|---|---|
{target_rows}

{reproduce}## Training

| key | value |
|---|---|
{training_rows}

Inference engines (vLLM, llama.cpp, TGI) have no linspec drafting and cannot load it; it runs in PyTorch through
`linspec`.
"""
