"""Speculative generation end to end on the real demo model (SmolLM2-135M-Instruct), original and converted."""

from __future__ import annotations

import json

import pytest
import torch

import linspec
from linspec.cli import main
from linspec.data.prompts import encode_prompts
from linspec.sources.loading import load_source
from linspec.speculative import EarlyExitDrafter, ModelDrafter, PromptLookupDrafter, speculative_generate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


PROMPTS = [
    "Repeat exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n\nRename the function add to plus and show the code.",
    "What is the capital of France?",
    "Quote the first line and then the second line: roses are red / violets are blue",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def demo_pair(demo_model_path):
    """``(original, converted, tokenizer)``; the converted model is the raw paper-preset conversion."""
    original, tokenizer = load_source(str(demo_model_path), progress=False)
    converted = linspec.convert(load_source(str(demo_model_path), progress=False)[0], linspec.LinspecConfig())
    return original.eval(), converted.eval(), tokenizer


def _check_greedy_equals_generate(target, tokenizer, drafters):
    input_ids, mask = encode_prompts(tokenizer, PROMPTS)
    eos, pad = target.generation_config.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        expected = target.generate(
            input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad
        )
    width = expected.shape[1]
    for name, drafter in drafters.items():
        out = speculative_generate(
            target, drafter, input_ids, NEW_TOKENS, attention_mask=mask, eos_token_id=eos, pad_token_id=pad
        )
        assert torch.equal(out.sequences[:, :width], expected), name
        assert (out.sequences[:, width:] == pad).all(), name
        yield name, out.stats


def test_greedy_speculative_equals_plain_greedy_on_the_original_demo_model(demo_pair):
    """Chains and trees from prompt lookup, early exit and the converted model as drafter, batched prompts."""
    original, converted, tokenizer = demo_pair
    drafters = {
        "lookup-chain": PromptLookupDrafter(num_tokens=6),
        "lookup-tree": PromptLookupDrafter(num_tokens=6, num_drafts=3),
        "early-exit-tree": EarlyExitDrafter(exit_layer=8, num_tokens=2, tree_width=2),
        "converted-drafts-for-parent": ModelDrafter(converted, num_tokens=2),
    }
    stats = dict(_check_greedy_equals_generate(original, tokenizer, drafters))
    assert stats["lookup-tree"].tokens_per_call > 1.5  # the quoting prompts are grounded: lookup pays off


def test_greedy_speculative_equals_plain_greedy_on_the_converted_demo_model(demo_pair):
    _, converted, tokenizer = demo_pair
    drafters = {
        "lookup-tree": PromptLookupDrafter(num_tokens=6, num_drafts=2),
        "early-exit-chain": EarlyExitDrafter(exit_layer=10, num_tokens=2),
    }
    for _ in _check_greedy_equals_generate(converted, tokenizer, drafters):
        pass


def test_generate_command_runs_speculatively_and_reports_statistics(demo_model_path, capsys):
    code = main(
        ["generate", str(demo_model_path), "--prompt", PROMPTS[0], "--draft", "lookup", "--tree-width", "2",
         "--max-new-tokens", "12", "--json"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert "quick brown fox" in result["texts"][0]
    assert result["stats"]["target_calls"] < result["stats"]["new_tokens"]


def test_generate_command_turns_bad_input_into_one_line_and_exit_2(demo_model_path, capsys):
    assert main(["generate", str(demo_model_path), "--prompt", "hi", "--do-sample", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["linspec generate: error: temperature must be >= 0 and finite, got -1.0"]
    assert main(["generate", str(demo_model_path), "--prompt", "hi", "--draft", "model", "--draft-model", "x"]) == 2
