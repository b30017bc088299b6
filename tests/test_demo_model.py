"""The real demo model (SmolLM2-135M-Instruct) end to end: convert -> save -> load -> generate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linspec
from linspec.cli import main
from linspec.data.prompts import encode_prompt
from linspec.models import hf
from linspec.sources.loading import load_source

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a short poem about rain.", "List three prime numbers."]


@pytest.fixture(scope="module")
def converted_dir(demo_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "smollm2-linear"
    assert main(["convert", str(demo_model_path), str(out)]) == 0
    return out


def test_converted_demo_model_loads_generates_and_reloads_identically(converted_dir):
    model = AutoModelForCausalLM.from_pretrained(converted_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    assert type(model).__name__ == "LinspecLlamaForCausalLM" and len(model.linspec_modules()) == 30
    assert tokenizer.chat_template, "the chat template must travel with the converted model"
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[0])])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), min_new_tokens=12, max_new_tokens=12, do_sample=False
    )
    assert out.shape == (1, ids.shape[1] + 12)
    again = AutoModelForCausalLM.from_pretrained(converted_dir).eval()
    with torch.no_grad():
        assert torch.equal(again(out).logits, model(out).logits)


def test_cached_decoding_matches_full_forward_on_real_weights(converted_dir):
    model = AutoModelForCausalLM.from_pretrained(converted_dir).eval()
    with torch.no_grad():  # give the linear path real work: non-zero γ and conv
        for module in model.linspec_modules():
            module.global_scale.fill_(0.3)
            module.conv_weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(module.layer_idx))
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        prefill = model(ids[:, :130], **hf.cache_kwargs(cache)).logits
        steps = [model(ids[:, t : t + 1], **hf.cache_kwargs(cache)).logits for t in range(130, 150)]
    incremental = torch.cat([prefill, *steps], dim=1)
    assert (incremental - full).abs().max().item() < 2e-3 * full.abs().max().item()
    assert (incremental[0, -20:].argmax(-1) == full[0, -20:].argmax(-1)).all()


def test_every_layer_kept_softmax_reproduces_the_original_exactly(demo_model_path):
    original, tokenizer = load_source(str(demo_model_path))
    hybrid, _ = load_source(str(demo_model_path))
    hybrid = linspec.convert(hybrid, linspec.LinspecConfig(softmax_layers=tuple(range(30))))
    for prompt in PROMPTS:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        expected = original.generate(ids, **kwargs)
        assert torch.equal(hybrid.generate(ids, **kwargs), expected), prompt
    with torch.no_grad():
        assert torch.equal(hybrid(expected).logits, original(expected).logits)


def test_demo_command_converts_generates_and_times_and_shows_a_trained_model(
    demo_model_path, converted_dir, tmp_path, capsys
):
    from linspec.cli import main

    out = tmp_path / "converted"
    args = ["demo", "--model", str(demo_model_path), "--max-new-tokens", "4", "--contexts", "64"]
    assert main([*args, "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines to the terminal width
    assert "converting" in printed and "30 linear layers" in printed and "converted (" in printed
    assert "linspec demo --trained" in printed  # the raw conversion is untrained: say how to see a trained one
    assert (out / "config.json").is_file()
    assert main([*args, "--out", str(out)]) == 0
    assert "reusing the converted model" in " ".join(capsys.readouterr().out.split())
    config = json.loads((out / "config.json").read_text())
    config["linspec"].update(local_window=128, sink_positions="absolute")  # converted by an older window preset
    (out / "config.json").write_text(json.dumps(config))
    assert main([*args, "--out", str(out)]) == 2  # it might be the user's own model: replaced only when told
    assert "pass --force to replace it" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["linspec"]["local_window"] == 128
    assert main([*args, "--out", str(out), "--force"]) == 0
    assert "converting" in " ".join(capsys.readouterr().out.split())
    assert json.loads((out / "config.json").read_text())["linspec"]["local_window"] == 512
    # any linspec model made from the base can stand in for a trained one; no conversion happens then
    assert main([*args, "--trained", str(converted_dir)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "using the trained model in" in printed and "converting" not in printed
    code = main([*args, "--trained", str(demo_model_path)])  # a softmax model is not a trained linspec model
    assert code == 2 and "is not a linspec model" in capsys.readouterr().err
