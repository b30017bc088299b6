"""Greedy tokens from vLLM's offline engine on a converted model equal linspec's own greedy generation, for
concurrent prompts of different lengths (some past the softmax window), with chunked prefill off and on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linspec.serving.registration import architectures, register

NEW_TOKENS = 16
# Prompt lengths in tokens: short ones, around the 512-token window, and well past it.
LENGTHS = (3, 41, 130, 333, 511, 600, 800, 1100)
EOS = 2


def prompts(model_dir: Path) -> list[list[int]]:
    """Real text (linspec's own documentation), cut at different offsets and lengths, as token ids."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "\n\n".join(path.read_text() for path in sorted(docs.glob("*.md")))
    ids = tokenizer(text).input_ids
    assert len(ids) > 4 * max(LENGTHS), "not enough documentation text for the prompts"
    return [ids[97 * i : 97 * i + length] for i, length in enumerate(LENGTHS)]


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def linspec_greedy(model_dir: Path, batch: list[list[int]]) -> list[list[int]]:
    """linspec's greedy generation (its model class and constant-size cache), one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in batch:
        with torch.no_grad():
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(until_eos(tokens[0, len(ids) :].tolist()))
    return out


@pytest.fixture(scope="module")
def expected(window_model):
    batch = prompts(window_model)
    return batch, linspec_greedy(window_model, batch)


def test_the_plugin_registers_every_architecture_a_converted_config_names(window_model):
    import json

    from vllm import ModelRegistry

    register()
    named = json.loads((window_model / "config.json").read_text())["architectures"]
    assert set(named) <= set(architectures())
    assert set(architectures()) <= set(ModelRegistry.get_supported_archs())


@pytest.mark.parametrize("chunked", (False, True), ids=("whole-prefill", "chunked-prefill"))
def test_greedy_tokens_equal_linspec_generate(window_model, expected, chunked, monkeypatch):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from linspec.serving.model import LinspecForCausalLM

    register()
    segments = []  # (rows, new tokens per row, fewest tokens seen before) of every run through the layers
    run = LinspecForCausalLM._run

    def recorded(self, ids, pos, slots, context):
        segments.append((ids.shape[0], ids.shape[1], int(context.min())))
        return run(self, ids, pos, slots, context)

    monkeypatch.setattr(LinspecForCausalLM, "_run", recorded)  # the engine runs in this process
    batch, reference = expected
    llm = LLM(
        model=str(window_model),
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=chunked,
        # chunked: prefills cut into 128-token pieces, mixed with other requests' decodes in one batch
        max_num_batched_tokens=128 if chunked else 2048,
        max_num_seqs=len(batch),
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params)
    got = [until_eos(list(o.outputs[0].token_ids)) for o in outputs]
    assert [len(o.prompt_token_ids) for o in outputs] == list(LENGTHS)
    assert got == reference
    assert any(rows > 1 and length == 1 for rows, length, _ in segments), "decodes were never batched"
    continued = [seen for rows, length, seen in segments if length > 1 and seen > 0]
    assert bool(continued) == chunked, "a prefill continued on a stored state exactly when chunked"
