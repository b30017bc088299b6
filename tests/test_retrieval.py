"""The retrieval suite: the teacher-forced score is the log-softmax of one forward, the prompts hide what they say
where they say, a model that sees only a short window loses the key outside it, and the commands write and record
their results."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import tiny_base, tiny_linspec

import linspec
from linspec.cli import main
from linspec.errors import LinspecError
from linspec.evaluation.retrieval import (
    PAIR,
    needle_probes,
    passkey_grid_probes,
    recall_probes,
    score_answer,
    score_probes,
    summarize,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Small forwards on a shared 2-core machine: one thread each."""


@pytest.fixture(scope="module")
def window_dir(tiny_bpe_dir, tmp_path_factory):
    """The tiny BPE model converted with a 32-token softmax window and 2 sinks (γ and the conv still zero)."""
    from linspec.config import LinspecConfig
    from linspec.conversion.checkpoint import convert_checkpoint

    settings = LinspecConfig.from_preset("window", local_window=32, sink_tokens=2, group_size=8, conv_taps=4)
    out = tmp_path_factory.mktemp("window") / "model"
    convert_checkpoint(str(tiny_bpe_dir), out, settings)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_bpe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bpe_dir)


@pytest.mark.parametrize(
    "model",
    [lambda: tiny_linspec("llama", local_kernel="softmax", local_window=16, sink_tokens=2), lambda: tiny_base("qwen2")],
    ids=["window", "softmax"],
)
def test_the_teacher_forced_score_is_the_log_softmax_of_one_forward(model):
    model = model()
    prompt, answer = torch.randint(3, 97, (70,)).tolist(), torch.randint(3, 97, (5,)).tolist()
    score = score_answer(model, prompt, answer, chunk=9)  # the prompt crosses several chunks
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]), use_cache=False).logits[0, len(prompt) - 1 : -1].double()
    logprobs = torch.log_softmax(logits, -1)[torch.arange(5), torch.tensor(answer)]
    assert score.logprob == pytest.approx(float(logprobs.sum()), abs=1e-4) and score.tokens == 5
    assert not score.greedy  # random answer tokens are not all the argmax

    greedy = []  # the greedy continuation is, by definition, a greedy answer
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(model(torch.tensor([prompt + greedy])).logits[0, -1].argmax()))
    assert score_answer(model, prompt, greedy, chunk=32).greedy
    assert not score_answer(model, prompt, [*greedy[:3], (greedy[3] + 1) % 97], chunk=32).greedy


def test_probes_are_seeded_and_hide_what_they_ask(tokenizer):
    grid = passkey_grid_probes(tokenizer, [256], [0.0, 1.0], trials=2, seed=3)
    assert grid == passkey_grid_probes(tokenizer, [256], [1.0, 0.0], trials=2, seed=3)
    assert grid != passkey_grid_probes(tokenizer, [256], [0.0, 1.0], trials=2, seed=4)
    for item in grid:
        text = tokenizer.decode(item.prompt_ids)
        before = text.split(f"The pass key is {item.answer}.")[0]
        assert len(item.prompt_ids) <= 256 and (before.count("back again.") == 0) == (item.where["depth"] == 0)

    needles = needle_probes(tokenizer, [600], keys=3, trials=4, seed=1)
    assert needles == needle_probes(tokenizer, [600], keys=3, trials=4, seed=1)
    for item in needles:
        text = tokenizer.decode(item.prompt_ids)
        assert len(item.prompt_ids) <= 600 and text.count("The pass key of the") == 4  # three keys and the answer
        assert f"The pass key of the {item.where['asked']} is {item.answer}." in text
        assert text.endswith(f"The pass key of the {item.where['asked']} is")

    for item in recall_probes(tokenizer, [1, 4], gap=100, trials=3, seed=0):
        text = tokenizer.decode(item.prompt_ids)
        asked = item.where["asked"]
        assert PAIR.format(name=asked, value=item.answer) in text and text.endswith(f"The number of {asked} is")
        assert len(re.findall(r"^[a-z]+: \d{5}$", text, re.M)) == item.where["pairs"]  # every pair, stated once
        tail = tokenizer.encode(text.rsplit(PAIR.format(name=asked, value=item.answer), 1)[1])
        assert 100 <= item.where["filler_tokens"] < 130 and len(tail) > 100  # the list is beyond the gap
    with pytest.raises(LinspecError, match="too short"):
        needle_probes(tokenizer, [64], keys=3, trials=1)
    with pytest.raises(LinspecError, match="depths must be fractions"):
        passkey_grid_probes(tokenizer, [256], [1.5])


def test_summaries_average_accuracy_and_log_probability_per_cell():
    rows = [
        {"length": 8, "greedy": True, "logprob": -1.0, "answer_tokens": 2},
        {"length": 8, "greedy": False, "logprob": -3.0, "answer_tokens": 2},
        {"length": 16, "greedy": False, "logprob": -6.0, "answer_tokens": 3},
    ]
    assert summarize(rows, ["length"]) == [
        {"length": 8, "trials": 2, "accuracy": 0.5, "logprob": -2.0, "nll_per_token": 1.0},
        {"length": 16, "trials": 1, "accuracy": 0.0, "logprob": -6.0, "nll_per_token": 2.0},
    ]


def test_prompts_past_the_models_positions_are_refused(tokenizer):
    model = tiny_linspec("llama")  # 256 positions
    with pytest.raises(LinspecError, match=r"a prompt of [0-9]+ tokens exceeds the model's 256 positions"):
        score_probes(model, recall_probes(tokenizer, [2], gap=300, trials=1), progress=False)


def test_retrieval_commands_write_json_and_png_and_record(window_dir, tiny_bpe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    grid = ["eval", "passkey", str(window_dir), "--depths", "0", "1", "--lengths", "256", "512", "--trials", "2"]
    assert main([*grid, "--out", str(out), "--record-bench", "grid-test"]) == 0
    assert "| model | length | depth 0 | depth 1 |" in capsys.readouterr().out
    data = json.loads((out / "passkey-grid.json").read_text())
    cells = data["models"][str(window_dir)]["cells"]
    assert [(c["length"], c["depth"], c["trials"]) for c in cells] == [
        (256, 0, 2),
        (256, 1, 2),
        (512, 0, 2),
        (512, 1, 2),
    ]
    assert len(data["models"][str(window_dir)]["trials"]) == 8 and data["command"].startswith("linspec eval passkey")
    assert (out / "passkey-grid.png").stat().st_size > 0 and "<!-- bench:grid-test:begin -->" in (
        out / "benchmarks.md"
    ).read_text()
    assert main([*grid, "--out", str(tmp_path / "again")]) == 0  # the same seed: the same prompts and scores
    again = json.loads((tmp_path / "again" / "passkey-grid.json").read_text())
    assert again["models"] == data["models"]

    assert main(["eval", "needle", str(window_dir), str(tiny_bpe_dir), "--lengths", "512", "--keys", "2",
                 "--trials", "2", "--out", str(out)]) == 0  # fmt: skip
    needle = json.loads((out / "needle.json").read_text())["models"]
    assert set(needle) == {str(window_dir), str(tiny_bpe_dir)} and (out / "needle.png").stat().st_size > 0
    assert [t["answer"] for t in needle[str(window_dir)]["trials"]] == [
        t["answer"] for t in needle[str(tiny_bpe_dir)]["trials"]
    ]  # both models answer the same prompts

    assert main(["eval", "recall", str(window_dir), "--pairs", "1", "3", "--trials", "2", "--out", str(out)]) == 0
    assert "### Associative recall beyond 32 tokens" in capsys.readouterr().out  # W: the model's window
    recall = json.loads((out / "recall.json").read_text())
    assert recall["window"] == 32 and all(t["filler_tokens"] >= 32 for t in recall["models"][str(window_dir)]["trials"])
    assert main(["eval", "recall", str(tiny_bpe_dir)]) == 2  # a softmax model has no window to recall beyond
    assert "give --window W" in capsys.readouterr().err


@pytest.mark.slow
def test_a_window_only_conversion_of_the_demo_loses_the_key_outside_its_window(demo_model_path):
    """SmolLM2-135M converted with a 64-token window and γ = 0 can only see its window: the key far outside it
    scores far worse than the key inside it, while the original finds both exactly."""
    from linspec.evaluation.retrieval import passkey_grid_probes
    from linspec.sources.loading import load_model_dir

    original, tokenizer = load_model_dir(demo_model_path, progress=False)
    probes = passkey_grid_probes(tokenizer, [320], [0.0, 1.0], trials=2, seed=0)
    reference = summarize(score_probes(original, probes, progress=False), ["depth"])
    window = linspec.convert(original, linspec.LinspecConfig.from_preset("window", local_window=64))
    far, near = summarize(score_probes(window, probes, progress=False), ["depth"])
    assert [c["accuracy"] for c in reference] == [1.0, 1.0], reference
    assert (far["depth"], near["depth"]) == (0.0, 1.0) and far["accuracy"] == 0.0, (near, far)
    assert far["logprob"] < near["logprob"] - 10, (near, far)  # e^-10: the far key is all but unreachable
