"""Hybrid linspec models served by vLLM: softmax layers and softmax heads keep their keys and values in vLLM's paged
KV cache and attend through vLLM's ``Attention``, beside the linear layers' state pages. Greedy tokens equal
linspec's own generation for concurrent prompts of different lengths (some past the 512-token window), with
chunked prefill off and on."""

from __future__ import annotations

import pytest
import torch
from parity import engine, linspec_greedy, prompts, served_greedy

MODELS = ("softmax_layers_model", "softmax_heads_model")


@pytest.fixture(scope="module", params=MODELS)
def hybrid(request):
    """``(model directory, prompts, linspec's greedy tokens)`` of one hybrid."""
    model_dir = request.getfixturevalue(request.param)
    batch = prompts(model_dir)
    return model_dir, batch, linspec_greedy(model_dir, batch)


@pytest.mark.parametrize("chunked", (False, True), ids=("whole-prefill", "chunked-prefill"))
def test_greedy_tokens_equal_linspec_generate(hybrid, chunked, monkeypatch):
    from linspec.serving import softmax

    model_dir, batch, reference = hybrid
    paged = []  # tokens of every call into vLLM's paged attention, by what called it

    def recorded(original, kind):
        def call(*args, **kwargs):
            paged.append((kind, args[1].shape[2]))
            return original(*args, **kwargs)

        return call

    # the engine runs in this process: record the calls of both softmax routes
    monkeypatch.setattr(softmax, "paged_attention", recorded(softmax.paged_attention, "layer"))
    monkeypatch.setattr(softmax.PagedHeadsTerm, "attend", recorded(softmax.PagedHeadsTerm.attend, "heads"))
    llm = engine(model_dir, chunked, max_num_seqs=len(batch))
    config = llm.llm_engine.vllm_config
    assert config.model_config.is_hybrid
    assert config.model_config.architecture == "LinspecHybridForCausalLM"
    assert served_greedy(llm, batch) == reference
    kinds = {kind for kind, _ in paged}
    assert kinds == ({"layer"} if "layers" in model_dir.name else {"heads"})
    # one call per softmax part and step covers every scheduled token: prefills and decodes in one flat batch
    assert max(tokens for _, tokens in paged) <= (128 if chunked else 2048)
    assert any(tokens > len(batch) for _, tokens in paged)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_the_state_layout_vllm_sizes_pages_by_is_the_one_the_layers_declare(softmax_heads_model, dtype):
    """vLLM sizes a hybrid's attention blocks from the state shapes the class gives for a config, before any model
    exists; they are those every linear layer of the real model declares (16-bit weights keep float32 state)."""
    from transformers import AutoModelForCausalLM

    from linspec.serving.state import compute_dtype, config_state_layout, linear_attentions, state_layout

    model = AutoModelForCausalLM.from_pretrained(softmax_heads_model, dtype=dtype)
    layout = config_state_layout(model.config, dtype)
    layers = linear_attentions(model)
    assert len(layers) == model.config.num_hidden_layers
    assert {state_layout(attention, compute_dtype(dtype)) for attention in layers.values()} == {layout}
    assert set(layout[1]) == {torch.float32}
