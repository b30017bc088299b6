"""Greedy tokens from vLLM's offline engine on a converted model equal linspec's own greedy generation, for
concurrent prompts of different lengths (some past the softmax window), with chunked prefill off and on."""

from __future__ import annotations

import json

import pytest
from parity import engine, linspec_greedy, prompts, served_greedy

from linspec.serving.registration import architectures, register


@pytest.fixture(scope="module")
def expected(window_model):
    batch = prompts(window_model)
    return batch, linspec_greedy(window_model, batch)


def test_the_plugin_registers_every_architecture_a_converted_config_names(window_model):
    from vllm import ModelRegistry

    register()
    named = json.loads((window_model / "config.json").read_text())["architectures"]
    assert set(named) <= set(architectures())
    assert set(architectures()) <= set(ModelRegistry.get_supported_archs())


@pytest.mark.parametrize("chunked", (False, True), ids=("whole-prefill", "chunked-prefill"))
def test_greedy_tokens_equal_linspec_generate(window_model, expected, chunked, monkeypatch):
    from linspec.serving.model import LinspecForCausalLM

    segments = []  # (rows, new tokens per row, fewest tokens seen before) of every run of the linear layers
    cut = LinspecForCausalLM._segments

    def recorded(self, metadata):
        runs = cut(self, metadata)
        segments.extend((s.rows, (s.end - s.begin) // s.rows, int(s.context.min())) for s in runs)
        return runs

    monkeypatch.setattr(LinspecForCausalLM, "_segments", recorded)  # the engine runs in this process
    batch, reference = expected
    llm = engine(window_model, chunked, max_num_seqs=len(batch))
    assert served_greedy(llm, batch) == reference
    assert any(rows > 1 and length == 1 for rows, length, _ in segments), "decodes were never batched"
    continued = [seen for rows, length, seen in segments if length > 1 and seen > 0]
    assert bool(continued) == chunked, "a prefill continued on a stored state exactly when chunked"
