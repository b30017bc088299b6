"""The demo recipe end to end on the real SmolLM2-135M (shortened: a few steps of 128-192 tokens, 2 chat answers)."""

from __future__ import annotations

import json

import pytest
import torch

from linspec.train.recipe import load_recipe
from linspec.train.run import train

pytestmark = pytest.mark.slow
DEMO = "smollm2-135m-demo"  # the shipped recipe, by name


def test_demo_recipe_runs_both_stages_on_the_real_model(demo_model_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))  # after the fixture: the model stays cached
    overrides = [
        f"base={demo_model_path}",
        f"output={tmp_path / 'run'}",
        "data.train=[builtin:sample]",
        "data.eval=null",
        "data.eval_fraction=0.25",
        "data.seq_len=128",  # two groups of 64: the global path (γ) gets a gradient
        "data.max_eval_sequences=2",
        "stages.0.steps=2",
        "stages.0.curriculum=[{seq_len: 128, steps: 1}, {seq_len: 192, steps: 1}]",
        "stages.0.batch_size=1",
        "stages.0.micro_batch_size=1",
        "stages.1.steps=1",
        "stages.1.curriculum=[{seq_len: 192, steps: 1, gradient_checkpointing: true}]",
        "stages.1.batch_size=1",
        "data.chat.prompts=builtin:sample",  # two answers from the real model, mixed in
        "data.chat.num_prompts=2",
        "data.chat.max_new_tokens=8",
        "data.chat.ratio=0.5",
    ]
    recipe = load_recipe(DEMO, overrides)
    output = train(recipe)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["ppl"]
    assert list(summary) == ["original", "converted", "transfer", "lora"]
    # The held-out sequences (128 tokens) fit in the window preset's 512-token softmax window and γ and the conv
    # start at zero, so the raw conversion is the original model there: exact, not merely close.
    assert summary["converted"] == pytest.approx(summary["original"], rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(output)
    kept = set(recipe.conversion.softmax_layers)  # the demo is a hybrid: these layers stay softmax
    assert type(model).__name__ == "LinspecLlamaForCausalLM"
    assert sorted(m.layer_idx for m in model.linspec_modules()) == [i for i in range(30) if i not in kept]
    assert all(float(m.global_scale.detach()) != 0 for m in model.linspec_modules())
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
