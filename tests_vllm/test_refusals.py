"""What the plugin cannot serve is refused while the engine starts, with one line that says why: vLLM's speculative
decoding (vLLM 0.32 rolls rejected draft tokens out of a state layer only for its own backends, so a linspec layer would
decode differently from plain decoding), pipeline parallelism, and tensor-parallel sizes that do not split the kv heads
(or a layer's softmax heads) evenly over the ranks."""

from __future__ import annotations

import pytest
from parity import engine

from linspec.serving.architecture import SPECULATIVE_REFUSAL

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@pytest.mark.parametrize("model", ("window_model", "softmax_layers_model"), ids=("all-linear", "hybrid"))
def test_ngram_speculative_decoding_is_refused_with_one_line(model, request):
    model_dir = request.getfixturevalue(model)
    with pytest.raises(NotImplementedError) as refused:
        engine(model_dir, chunked=False, max_num_seqs=2, speculative_config=NGRAM)
    message = str(refused.value)
    assert message == SPECULATIVE_REFUSAL
    assert "\n" not in message and "speculative" in message


def _refusal(model_dir, **parallel) -> str:
    with pytest.raises(NotImplementedError) as refused:
        engine(model_dir, chunked=False, max_num_seqs=2, **parallel)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_tensor_parallelism_that_cannot_split_the_kv_heads_is_refused_with_one_line(window_model):
    message = _refusal(window_model, tensor_parallel_size=2)  # SmolLM2-135M: 3 kv heads
    assert "3 kv heads" in message and "--tensor-parallel-size 2" in message


def test_softmax_heads_spread_unevenly_over_the_ranks_are_refused_with_one_line(tiny_models):
    model_dir = tiny_models("heads-1-0", "llama", "--softmax-heads", "1:0")  # kv head 0 of 2: rank 0 only
    message = _refusal(model_dir, tensor_parallel_size=2)
    assert "layer 1" in message and "softmax kv heads [0]" in message


def test_pipeline_parallelism_is_refused_with_one_line(window_model):
    assert "--pipeline-parallel-size 1" in _refusal(window_model, pipeline_parallel_size=2)
