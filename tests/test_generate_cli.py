"""``linspec generate MODEL --prompt``: plain decoding streams the chat-templated greedy continuation."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from linspec.cli import main
from linspec.data.prompts import encode_prompt
from linspec.sources.loading import load_source


@pytest.mark.slow
def test_plain_generate_streams_the_greedy_chat_answer(demo_model_path, capsys):
    prompt = "Name three colours."
    code = main(["generate", str(demo_model_path), "--prompt", prompt, "--max-new-tokens", "12"])
    streamed = capsys.readouterr().out.strip()
    model, tokenizer = load_source(str(demo_model_path), progress=False)
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert code == 0
    assert streamed == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert streamed  # the chat template makes the instruct model answer


STATS = re.compile(r"^\[(\d+) tokens in [\d.]+ s = [\d.]+ tokens/s; (\d+) target calls, ([\d.]+) tokens per call; ")


def generate_process(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "linspec", "generate", *argv]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600, env=env, check=False)


@pytest.mark.slow
def test_prompt_from_stdin_and_from_a_file_equal_the_same_text_given_inline(
    demo_model_path, tmp_path, capsys, one_torch_thread
):
    """Piped through a real process's stdin; the inline and file prompts in this process (one thread, as there)."""
    prompt = "Repeat exactly: The quick brown fox jumps over the lazy dog."
    (tmp_path / "prompt.txt").write_text(prompt + "\n")  # a text file's final newline is not part of the prompt
    flags = ("--max-new-tokens", "16", "--draft", "lookup")
    piped = generate_process(str(demo_model_path), "--prompt", "-", *flags, stdin=prompt + "\n")
    assert piped.returncode == 0, piped.stderr[-1000:]
    assert main(["generate", str(demo_model_path), "--prompt", prompt, *flags]) == 0
    inline = capsys.readouterr().out
    assert main(["generate", str(demo_model_path), "--prompt-file", str(tmp_path / "prompt.txt"), *flags]) == 0
    assert piped.stdout == inline == capsys.readouterr().out
    assert "quick brown fox" in inline  # the model read the prompt, not a literal "-"


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["none", "lookup"])
def test_stats_line_counts_agree(demo_model_path, draft, capsys):
    prompt = "Repeat exactly: The quick brown fox jumps over the lazy dog."
    argv = ["generate", str(demo_model_path), "--prompt", prompt, "--max-new-tokens", "8", "--draft", draft, "--stats"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    tokens, calls, per_call = STATS.match(line).groups()
    assert int(tokens) == 8  # the budget, all printed (the answer is longer than 8 tokens)
    assert f"{int(tokens) / int(calls):.2f}" == per_call  # tokens per call is printed tokens over target calls
    if draft == "none":
        assert int(calls) == int(tokens)  # plain decoding: one token per call
    else:
        assert int(calls) < int(tokens)  # lookup copies the quoted sentence: several tokens per call


def test_the_streamer_receives_the_prompt_then_each_rounds_kept_tokens(tiny_bpe_dir):
    """``speculative_generate(streamer=...)`` as ``generate()`` does it: the prompt, then token chunks that add
    up to the returned continuation, then ``end``; a drafter makes chunks longer, never different."""
    from linspec.speculative import PromptLookupDrafter
    from linspec.speculative.generate import speculative_generate

    model, tokenizer = load_source(str(tiny_bpe_dir), progress=False)
    prompt = torch.tensor([tokenizer.encode("the cat sat on the mat and the cat sat on the mat and the cat")])

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            assert not self.ended
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    outputs = {}
    for name, drafter in (("plain", None), ("lookup", PromptLookupDrafter(num_tokens=4))):
        recorder = Recorder()
        out = speculative_generate(model, drafter, prompt, 12, streamer=recorder)
        assert recorder.ended and recorder.chunks[0] == prompt[0].tolist()
        streamed = [token for chunk in recorder.chunks[1:] for token in chunk]
        assert streamed == out.sequences[0, prompt.shape[1] :].tolist()
        assert len(recorder.chunks) - 1 == out.stats.target_calls  # one chunk per round
        outputs[name] = streamed
    assert outputs["plain"] == outputs["lookup"]


def test_a_batch_cannot_stream(tiny_bpe_dir):
    from linspec.errors import LinspecError
    from linspec.speculative.generate import speculative_generate

    model, _ = load_source(str(tiny_bpe_dir), progress=False)
    with pytest.raises(LinspecError, match="one prompt at a time"):
        speculative_generate(model, None, torch.ones(2, 3, dtype=torch.long), 2, streamer=object())
