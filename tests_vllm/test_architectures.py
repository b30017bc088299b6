"""Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral and Llama conversions served by vLLM: greedy tokens equal linspec's
own generation for concurrent prompts some past the 64-token window, with chunked prefill mixing prefills and
decodes, all-linear and hybrid, and with a sparse cache (a 16-token cache churns through a 300-token prompt's
evictions, chosen by the far memory's recall error or, without one, by ‖v‖²). Their configs name every layer in
``layer_types``, which vLLM reads to tell a hybrid from a plain attention model: a hybrid must still be served as
one."""

from __future__ import annotations

import pytest
from parity import engine, linspec_greedy, prompts, served_greedy

LENGTHS = (3, 17, 40, 70, 130, 300)
MODELS = {
    "qwen2-all-linear": ("qwen2", ("--preset", "window")),
    "qwen2-softmax-layers": ("qwen2", ("--softmax-layers", "1")),
    "qwen3-all-linear": ("qwen3", ("--preset", "window-hedgehog")),
    "qwen3-softmax-heads": ("qwen3", ("--softmax-heads", "1:0")),
    "mistral-all-linear": ("mistral", ("--preset", "window")),
    "qwen3-all-linear-sparse-cache": ("qwen3", ("--preset", "window-hedgehog", "--sparse-cache", "16")),
    "llama-softmax-layers-sparse-cache": ("llama", ("--softmax-layers", "1", "--sparse-cache", "16")),
}


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_equal_linspec_generate(name, tiny_models):
    arch, flags = MODELS[name]
    model_dir = tiny_models(name, arch, *flags)
    batch = prompts(model_dir, LENGTHS)
    llm = engine(model_dir, chunked=True, max_num_seqs=len(batch))
    try:
        model_config = llm.llm_engine.vllm_config.model_config
        hybrid = "all-linear" not in name
        assert model_config.is_hybrid == hybrid
        assert model_config.architecture == ("LinspecHybridForCausalLM" if hybrid else model_config.architectures[0])
        served = served_greedy(llm, batch)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert served == linspec_greedy(model_dir, batch)
