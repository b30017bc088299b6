"""What the plugin cannot serve is refused while the engine starts, with one line that says why: vLLM's speculative
decoding (vLLM 0.32 rolls rejected draft tokens out of a state layer only for its own backends, so a linspec layer
would decode differently from plain decoding) and tensor parallelism (the layers and state are not sharded)."""

from __future__ import annotations

import pytest
from parity import engine

from linspec.serving.architecture import PARALLEL_REFUSAL, SPECULATIVE_REFUSAL

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@pytest.mark.parametrize("model", ("window_model", "softmax_layers_model"), ids=("all-linear", "hybrid"))
def test_ngram_speculative_decoding_is_refused_with_one_line(model, request):
    model_dir = request.getfixturevalue(model)
    with pytest.raises(NotImplementedError) as refused:
        engine(model_dir, chunked=False, max_num_seqs=2, speculative_config=NGRAM)
    message = str(refused.value)
    assert message == SPECULATIVE_REFUSAL
    assert "\n" not in message and "speculative" in message


def test_tensor_parallelism_is_refused_with_one_line(window_model):
    with pytest.raises(NotImplementedError) as refused:
        engine(window_model, chunked=False, max_num_seqs=2, tensor_parallel_size=2)
    assert str(refused.value) == PARALLEL_REFUSAL
    assert "\n" not in PARALLEL_REFUSAL
