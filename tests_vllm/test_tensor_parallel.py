"""Tensor parallelism over kv heads on vLLM's CPU backend (two ranks, one core each): greedy tokens at TP 2 equal
those at TP 1 and linspec's own generation, for an all-linear model (window, sinks, a distance-decayed far memory,
decayed global memory, conv; biases on every projection, so row-parallel biases too), a hybrid (a softmax layer
on vLLM's paged attention) and an all-linear model with a 16-token sparse cache (its slots churn through the longer
prompts: each rank keeps, and evicts from, its own kv head's cache), for concurrent prompts some past the 64-token
window with chunked prefill; and each rank holds half of every state tensor and of the softmax layer's KV."""

from __future__ import annotations

import pytest
from parity import engine, linspec_greedy, prompts, served_greedy

LENGTHS = (3, 17, 40, 70, 130, 300)
MODELS = {
    "all-linear": (
        "llama",
        ("--preset", "window-hedgehog", "--memory-distance-decay"),
        {"attention_bias": True, "mlp_bias": True},
    ),
    "hybrid": ("qwen3", ("--softmax-layers", "1"), {}),
    "sparse-cache": ("qwen3", ("--preset", "window-hedgehog", "--sparse-cache", "16"), {}),
}


def _served(model_dir, batch, tensor_parallel: int, monkeypatch) -> tuple[list[list[int]], list]:
    """Greedy tokens from an engine at ``tensor_parallel`` ranks, and the cache specs its ranks reported."""
    if tensor_parallel > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(tensor_parallel)))
    llm = engine(model_dir, chunked=True, max_num_seqs=len(batch), tensor_parallel_size=tensor_parallel)
    try:
        tokens = served_greedy(llm, batch)
        core = llm.llm_engine.engine_core.engine_core
        specs = [group.kv_cache_spec for group in core.scheduler.kv_cache_config.kv_cache_groups]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return tokens, specs


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_tokens_at_two_ranks_equal_one_rank_and_linspec_generate(kind, tiny_models, monkeypatch):
    arch, flags, overrides = MODELS[kind]
    model_dir = tiny_models(f"tp-{kind}", arch, *flags, **overrides)
    batch = prompts(model_dir, LENGTHS)
    reference = linspec_greedy(model_dir, batch)
    one, one_specs = _served(model_dir, batch, 1, monkeypatch)
    two, two_specs = _served(model_dir, batch, 2, monkeypatch)
    assert one == reference
    assert two == reference
    states = [(a.shapes, b.shapes) for a, b in zip(one_specs, two_specs, strict=True) if hasattr(a, "shapes")]
    assert states, "no state pages"
    for whole, half in states:  # every state tensor leads with the kv heads: each rank keeps one of the two
        assert [shape[0] for shape in whole] == [2] * len(whole)
        assert [(1, *shape[1:]) for shape in whole] == list(half)
    pairs = zip(one_specs, two_specs, strict=True)
    kv = [(a.num_kv_heads, b.num_kv_heads) for a, b in pairs if hasattr(a, "num_kv_heads")]
    assert bool(kv) == (kind == "hybrid")
    assert all(pair == (2, 1) for pair in kv)
