"""``linspec generate MODEL --prompt``: plain decoding streams the chat-templated greedy continuation."""

from __future__ import annotations

import pytest
import torch

from linspec.cli import main
from linspec.demo import chat_input_ids
from linspec.sources import load_source


@pytest.mark.slow
def test_plain_generate_streams_the_greedy_chat_answer(demo_model_path, capsys):
    prompt = "Name three colours."
    code = main(["generate", str(demo_model_path), "--prompt", prompt, "--max-new-tokens", "12"])
    streamed = capsys.readouterr().out.strip()
    model, tokenizer = load_source(str(demo_model_path), progress=False)
    ids = chat_input_ids(tokenizer, prompt)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert code == 0
    assert streamed == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert streamed  # the chat template makes the instruct model answer
