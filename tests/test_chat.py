"""``linspec chat MODEL``: a real subprocess fed on stdin, replies checked against decoding the same conversation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from linspec.config import LinspecConfig
from linspec.conversion.checkpoint import convert_checkpoint
from linspec.sources.loading import load_source
from linspec.speculative.generate import speculative_generate

MAX_NEW = 6


@pytest.fixture(scope="module")
def chat_model(tiny_bpe_dir, tmp_path_factory):
    """The tiny BPE Llama converted to linspec (its tokenizer has a chat template)."""
    out = tmp_path_factory.mktemp("chat") / "linear"
    convert_checkpoint(str(tiny_bpe_dir), out, LinspecConfig(group_size=8, conv_taps=4))
    return out


def chat(model_dir, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "linspec", "chat", str(model_dir), "--max-new-tokens", str(MAX_NEW), *flags]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300, env=env, check=False)


def expected_replies(model_dir, messages: list[str]) -> list[str]:
    """Each turn's greedy reply to the conversation so far (earlier replies in the history), decoded."""
    model, tokenizer = load_source(str(model_dir), progress=False)
    conversation, replies = [], []
    for message in messages:
        conversation.append({"role": "user", "content": message})
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        out = speculative_generate(
            model, None, torch.tensor([ids["input_ids"]]), MAX_NEW, eos_token_id=model.generation_config.eos_token_id
        )
        new = out.sequences[0, len(ids["input_ids"]) :][: out.stats.new_tokens]
        reply = tokenizer.decode(new, skip_special_tokens=True)
        replies.append(reply)
        conversation.append({"role": "assistant", "content": reply.strip()})
    return replies


def test_chat_streams_each_reply_to_the_whole_conversation(chat_model):
    messages = ["the cat sat on the mat", "and then what happened"]
    done = chat(chat_model, "".join(m + "\n" for m in messages))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    replies = expected_replies(chat_model, messages)
    assert done.stdout == "".join(reply + "\n" for reply in replies)
    # the second reply depends on the first turn: without the history it is (for this model) another text
    alone = expected_replies(chat_model, messages[1:])
    assert alone[0] != replies[1]


def test_chat_with_a_drafter_says_exactly_the_same(chat_model):
    stdin = "the cat sat on the mat\nthe cat sat on the mat\n"
    plain = chat(chat_model, stdin)
    drafted = chat(chat_model, stdin, "--draft", "lookup")
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and plain.stdout.strip()


def test_exit_word_ends_the_chat_before_later_lines(chat_model):
    done = chat(chat_model, "hello there\n/exit\nnever read\n")
    assert done.returncode == 0
    assert done.stdout == expected_replies(chat_model, ["hello there"])[0] + "\n"


def test_ctrl_c_ends_the_chat_cleanly(chat_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "linspec", "chat", str(chat_model), "--max-new-tokens", str(MAX_NEW)]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    first = expected_replies(chat_model, ["hello there"])[0] + "\n"
    process.stdin.write("hello there\n")
    process.stdin.flush()
    seen = ""
    while len(seen) < len(first):  # the first reply is out: the chat now waits for the next message
        seen += process.stdout.read(1)
    assert seen == first
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_tokenizer_without_chat_template_is_one_line(tiny_bpe_dir, tmp_path):
    model, tokenizer = load_source(str(tiny_bpe_dir), progress=False)
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    for template in (tmp_path / "plain").glob("chat_template*"):
        template.unlink()
    done = chat(tmp_path / "plain", "hello\n")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"linspec chat: error: {tmp_path / 'plain'}'s tokenizer has no chat template; use linspec generate for "
        "plain text"
    )
