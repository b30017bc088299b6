"""Quality curves: chunked scoring == one forward, greedy == generate, perplexity by length scores the same
tokens at every length, passkey prompts, prompts and repetition measures, agreement, and softmax_layers auto:N."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import randomize_linspec_parameters, tiny_base, tiny_linspec

import linspec
from linspec.cli import main
from linspec.errors import LinspecError
from linspec.evaluation.greedy import greedy_generate
from linspec.evaluation.perplexity import next_token_scores


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Small forwards on a shared 2-core machine: one thread each."""


@pytest.mark.parametrize(
    ("model", "chunk"),
    [
        (lambda: tiny_linspec("llama"), 37),
        (lambda: tiny_base("qwen3"), 64),
        (lambda: tiny_linspec("mistral", softmax_layers=(1,)), 5),
    ],
    ids=["linear", "softmax", "hybrid"],
)
def test_chunked_scoring_through_the_cache_equals_one_forward(model, chunk):
    model = model()
    ids = torch.randint(3, model.config.vocab_size, (150,))
    logprobs, greedy = next_token_scores(model, ids, chunk=chunk)
    with torch.no_grad():
        logits = model(ids[None], use_cache=False).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy, logits.argmax(-1) == ids[1:])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generate_equals_plain_generate(arch):
    for model in (tiny_linspec(arch), tiny_base(arch)):
        prompt = torch.randint(3, model.config.vocab_size, (45,))
        expected = model.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert greedy_generate(model, prompt, 20, chunk=16) == expected[0, 45:].tolist()
    first = greedy_generate(model, prompt, 20)
    end = first.index(first[3]) + 1  # the answer ends after the first occurrence of a stop id
    assert greedy_generate(model, prompt, 20, stop={first[3]}) == first[:end]
    assert greedy_generate(model, prompt, 20, should_stop=lambda tokens: len(tokens) == 2) == first[:2]


def test_perplexity_by_length_scores_the_same_tokens_with_more_context():
    from linspec.evaluation.lengths import perplexity_by_length

    model = tiny_linspec("llama").eval()
    ids = torch.randint(3, model.config.vocab_size, (300,))
    points = perplexity_by_length(model, ids, [64, 16, 128], max_windows=5, progress=False)
    assert [p.length for p in points] == [16, 64, 128]
    assert all(p.tokens == 2 * 8 and p.windows == 2 for p in points)  # 300 tokens hold two blocks of 128
    with torch.no_grad():  # length 64: the last 64 tokens of each 128-block, scoring their last 8
        nll = [
            F.cross_entropy(model(w[None]).logits[0, -9:-1], w[-8:], reduction="sum")
            for w in (ids[64:128], ids[192:256])
        ]
    assert points[1].ppl == pytest.approx(math.exp(sum(float(x) for x in nll) / 16), rel=1e-4)


@pytest.mark.parametrize(
    ("lengths", "fragment"), [([0, 16], "2.."), ([16, 512], "exceeds the model's 256 positions"), ([200], "text has")]
)
def test_perplexity_by_length_refuses_bad_lengths(lengths, fragment):
    from linspec.evaluation.lengths import perplexity_by_length

    with pytest.raises(LinspecError, match=fragment):
        perplexity_by_length(tiny_linspec("llama"), torch.arange(150), lengths, progress=False)


def test_repetition_measures():
    from linspec.evaluation.repetition import Repetition, distinct_n, has_loop, longest_repeated_ngram

    assert distinct_n([1, 2, 3, 1, 2], 2) == pytest.approx(3 / 4) and distinct_n([1], 2) == 1.0
    assert longest_repeated_ngram([1, 2, 3, 9, 1, 2, 3]) == 3
    assert longest_repeated_ngram([5, 5, 5, 5]) == 3  # overlapping occurrences count
    assert longest_repeated_ngram([1, 2, 3]) == 0
    assert has_loop([7, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # period 3, three times
    assert has_loop([4] * 8) and not has_loop([4] * 7)  # a short stutter is not a loop
    assert not has_loop(list(range(40)))
    summary = Repetition.of([[1, 2, 3, 1, 2, 3, 1, 2, 3], list(range(9))])
    assert summary.loop_share == 0.5 and summary.max_longest_repeat == 6


def test_prompts_are_reproducible_and_cycle_through_the_templates(tmp_path):
    from linspec.data.prompts import TEMPLATES, build_prompts, load_prompts

    documents = [" ".join(f"word{d}_{i}" for i in range(60)) + ".\nshort line" for d in range(12)]
    prompts = build_prompts(documents, 10, seed=3)
    assert prompts == build_prompts(documents, 10, seed=3) != build_prompts(documents, 10, seed=4)
    assert [p.kind for p in prompts] == [*TEMPLATES, *TEMPLATES]
    assert all("short line" not in p.text for p in prompts)
    with pytest.raises(LinspecError, match="12 paragraphs"):
        build_prompts(documents, 13)
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "one"}) + "\n")
    assert [p.text for p in load_prompts(str(tmp_path / "p.txt"), 5)] == ["first", "second"]
    assert [p.text for p in load_prompts(str(tmp_path / "p.jsonl"), 5)] == ["one"]
    with pytest.raises(LinspecError, match="no such prompt file"):
        load_prompts(str(tmp_path / "missing.txt"), 5)


def test_open_ended_prompt_kinds_ask_about_each_paragraphs_subject():
    from linspec.data.prompts import KINDS, OPEN_TEMPLATES, build_prompts, subject

    assert subject("The keeper of the Port of Mobile, Alabama, kept a log.") == "Port of Mobile"
    assert subject("Some frogs inflate. They are green.") == "Some frogs inflate"  # no name: the first words
    assert subject("In 1871 the lighthouse was built by Thomas Smith.") == "Thomas Smith"
    filler = " ".join(f"word{i}" for i in range(50))
    documents = [f"The archive of the Royal Society of Edinburgh holds {filler}.", f"Then Ada Lovelace wrote {filler}."]
    kinds = ["story", "summarise", "list"]
    prompts = build_prompts(documents, 2, seed=0, kinds=kinds) + build_prompts(documents[::-1], 2, seed=0, kinds=kinds)
    assert [p.kind for p in prompts] == ["story", "summarise", "story", "summarise"]
    stories = [p.text for p in prompts if p.kind == "story"]
    assert sorted(stories) == sorted(
        OPEN_TEMPLATES["story"].format(subject=s) for s in ("Royal Society of Edinburgh", "Ada Lovelace")
    )
    assert set(KINDS) >= set(OPEN_TEMPLATES)
    with pytest.raises(LinspecError, match="unknown prompt kind 'poem'"):
        build_prompts(documents, 2, kinds=["poem"])


def test_agreement_counts_the_prefix_until_the_first_difference():
    from linspec.evaluation.agreement import Agreement

    result = Agreement.of([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 9], [5, 6]])
    assert result.prefix_agreement == pytest.approx((2 / 4 + 1) / 2)
    assert result.exact_match == 0.5 and result.first_divergence == 2.0


def test_passkey_prompts_fit_their_length_hide_the_key_and_are_seeded(tiny_bpe_dir):
    from transformers import AutoTokenizer

    from linspec.evaluation.passkey import DEPTH_BUCKETS, answer_key, make_trials

    tokenizer = AutoTokenizer.from_pretrained(tiny_bpe_dir)
    trials = make_trials(tokenizer, 512, 6, seed=1)
    assert trials == make_trials(tokenizer, 512, 6, seed=1) and trials != make_trials(tokenizer, 512, 6, seed=2)
    for trial in trials:
        assert 400 < len(trial.prompt_ids) <= 512
        text = tokenizer.decode(trial.prompt_ids)
        assert text.count(trial.key) == 2 and text.endswith("The pass key is")
        before, after = text.split(f"The pass key is {trial.key}.")
        units = [part.count("There and back again.") for part in (before, after)]
        assert units[0] == round(trial.depth * sum(units))  # the key sits where the depth says, in whole sentences
    assert sorted({t.bucket for t in trials}) == sorted(DEPTH_BUCKETS)
    assert answer_key(" 12345. Remember") == "12345" and answer_key("no idea") is None
    with pytest.raises(LinspecError, match="too short"):
        make_trials(tokenizer, 20, 1)


def test_the_demo_model_finds_the_passkey(demo_model_path):
    from linspec.evaluation.passkey import passkey_accuracy
    from linspec.sources.loading import load_model_dir

    model, tokenizer = load_model_dir(demo_model_path, progress=False)
    (result,) = passkey_accuracy(model, tokenizer, [256], trials=2, progress=False)
    assert result.accuracy == 1.0, result.answers


def test_the_demo_answers_with_the_one_prompt_encoder_and_greedy_decoder(demo_model_path):
    """``linspec demo``'s answer is the chat-templated greedy continuation ``generate`` gives, decoded."""
    from linspec.bench.demo import greedy_text
    from linspec.data.prompts import encode_prompt
    from linspec.sources.loading import load_model_dir

    model, tokenizer = load_model_dir(demo_model_path, progress=False)
    prompt = "Name three colours."
    text, seconds = greedy_text(model, tokenizer, prompt, 12)
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    assert ids[0].tolist() != tokenizer.encode(prompt)  # the chat template wraps the user turn
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text and seconds > 0


def test_auto_softmax_layers_keep_the_layers_rank_layers_ranks_best():
    from linspec.conversion.choice import Auto, parse_softmax_layers
    from linspec.conversion.softmax_layers import choose_softmax_layers, rank_layers, resolve_softmax_layers

    assert parse_softmax_layers("auto:2") == Auto(2) and parse_softmax_layers("0,3-4") == (0, 3, 4)
    for bad in ("auto:0", "auto:x", "auto", "1-x"):
        with pytest.raises(LinspecError):
            parse_softmax_layers(bad)
    model = linspec.convert(tiny_base("llama", num_hidden_layers=4), linspec.LinspecConfig(group_size=8))
    randomize_linspec_parameters(model)
    sequences = torch.randint(3, model.config.vocab_size, (2, 48))
    ranking = rank_layers(model, sequences, top=4, progress=False)
    best = sorted(ranking.single, key=ranking.single.__getitem__)
    for n in (1, 2):
        assert choose_softmax_layers(model, sequences, n) == tuple(sorted(best[:n]))
    with pytest.raises(LinspecError, match=r"auto:N .* must be an integer in 1\.\.4, got 5"):
        choose_softmax_layers(model, sequences, 5)
    base = tiny_base("llama", num_hidden_layers=4)
    settings = resolve_softmax_layers(base, model.config.linspec_settings, Auto(2), sequences, progress=False)
    assert len(settings.softmax_layers) == 2 and settings.group_size == 8


def test_convert_softmax_layers_auto_measures_on_data(tiny_bpe_dir, text_file, tmp_path, capsys):
    from linspec.config import LinspecConfig

    code = main(
        ["convert", str(tiny_bpe_dir), str(tmp_path / "out"), "--softmax-layers", "auto:1", "--data", str(text_file)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    chosen = LinspecConfig.from_dict(config["linspec"]).softmax_layers
    assert len(chosen) == 1 and f"keeping layers {list(chosen)} softmax" in out
    assert main(["convert", str(tiny_bpe_dir), str(tmp_path / "o2"), "--softmax-layers", "auto:1"]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_eval_ppl_lengths_writes_and_records_a_curve_per_model(tiny_bpe_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"  # --record-bench writes its section beside the results, never into the repo
    code = main(
        ["eval", "ppl", str(tiny_bpe_dir), "--data", str(text_file), "--lengths", "32", "128", "--reference",
         str(tiny_bpe_dir), "--max-windows", "2", "--out", str(out), "--record-bench", "ppl-test"]
    )  # fmt: skip
    assert code == 0
    assert "ppl @ 32 | ppl @ 128" in capsys.readouterr().out
    data = json.loads((out / "ppl-length.json").read_text())
    assert data["command"].startswith(f"linspec eval ppl {tiny_bpe_dir} --data {text_file} --lengths 32 128")
    section = (out / "benchmarks.md").read_text()
    assert "<!-- bench:ppl-test:begin -->" in section and "![ppl-test](ppl-test.png)" in section
    model, reference = data["curves"].values()
    assert [p["length"] for p in model] == [32, 128]
    assert [p["ppl"] for p in model] == [p["ppl"] for p in reference]  # the same model on the same windows
    assert (out / "ppl-length.png").stat().st_size > 0


@pytest.fixture(scope="module")
def window_models(tiny_bpe_dir, tmp_path_factory):
    """The tiny BPE model converted with a 32-token softmax window: as converted (γ and the conv zero: the memory
    is off) and with random non-zero γ and conv (the memory is on)."""
    from linspec.config import LinspecConfig
    from linspec.conversion.checkpoint import convert_checkpoint
    from linspec.sources.loading import load_model_dir

    root = tmp_path_factory.mktemp("window-models")
    settings = LinspecConfig.from_preset("window", local_window=32, sink_tokens=2, group_size=8, conv_taps=4)
    convert_checkpoint(str(tiny_bpe_dir), root / "fresh", settings)
    model, tokenizer = load_model_dir(root / "fresh", progress=False)
    randomize_linspec_parameters(model)
    model.save_pretrained(root / "memory")
    tokenizer.save_pretrained(root / "memory")
    return root / "fresh", root / "memory"


def test_ppl_curves_show_the_window_only_baseline_and_the_ablations(window_models, text_file, tmp_path, capsys):
    fresh, memory = window_models

    def run(model, *options):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        argv = ["eval", "ppl", str(model), "--data", str(text_file), "--lengths", "32", "96", "--max-windows", "2"]
        assert main([*argv, "--out", str(out), *options]) == 0
        data = json.loads((out / "ppl-length.json").read_text())
        curves = {data["variants"][key]: [p["ppl"] for p in points] for key, points in data["curves"].items()}
        return curves, data, out

    curves, _, _ = run(fresh)  # by default: the model and its window-only baseline
    assert list(curves) == ["model", "window-only"] and curves["model"] == curves["window-only"]  # memory off
    curves, _, _ = run(memory)
    assert list(curves) == ["model", "window-only"]
    assert all(m != w for m, w in zip(curves["model"], curves["window-only"], strict=True))  # the memory acts
    assert list(run(memory, "--no-baselines")[0]) == ["model"]
    curves, _, _ = run(memory, "--ablations")
    assert list(curves) == ["model", "no-gamma", "no-conv", "window-only"] and len({*map(tuple, curves.values())}) == 4
    curves, data, out = run(memory, "--ablate", "gamma", "--reference", str(fresh), "--record-bench", "abl")
    assert list(curves) == ["model", "no-gamma", "window-only", "reference"]
    assert "--ablate gamma" in data["command"] and "| " + f"{memory} (window-only) |" in capsys.readouterr().out
    assert (out / "ppl-length.png").stat().st_size > 0 and "<!-- bench:abl:begin -->" in (
        out / "benchmarks.md"
    ).read_text()
    window_only = ["--window", "32", "--ablate", "window-only", "--out", str(tmp_path / "plain")]
    assert main(["eval", "ppl", str(fresh), "--data", str(text_file), *window_only]) == 0
    assert "| window-only |" in capsys.readouterr().out  # the sliding-window table names the variant the same way


def test_eval_passkey_and_agreement_write_their_results(tiny_bpe_dir, tmp_path, capsys):
    code = main(["eval", "passkey", str(tiny_bpe_dir), "--lengths", "256", "--trials", "3", "--out", str(tmp_path)])
    assert code == 0 and "| length | accuracy |" in capsys.readouterr().out.replace(str(tiny_bpe_dir) + " ", "")
    results = json.loads((tmp_path / "passkey.json").read_text())["curves"][str(tiny_bpe_dir)]
    assert len(results[0]["answers"]) == 3 and (tmp_path / "passkey.png").exists()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Continue the text: the river was high\nWhat is water?\n")
    code = main(
        ["eval", "agreement", str(tiny_bpe_dir), "--reference", str(tiny_bpe_dir), "--prompts", str(prompts),
         "--max-new-tokens", "6", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0 and "Prefix agreement 1.000" in capsys.readouterr().out  # a model agrees with itself
    agreement = json.loads((tmp_path / "agreement.json").read_text())["agreement"]
    assert agreement["exact_match"] == 1.0 and agreement["model"] == agreement["reference"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["eval", "passkey", "M", "--lengths", "0"], "must be an integer in 1.."),
        (["eval", "passkey", "M", "--trials", "0"], "must be an integer in 1.."),
        (["eval", "ppl", "M", "--data", "x", "--lengths", "-5"], "must be an integer in 1.."),
    ],
)
def test_bad_counts_are_refused_by_the_parser(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_bad_input_is_one_line(tiny_bpe_dir, text_file, tmp_path, capsys):
    cases = [
        (["eval", "passkey", str(tiny_bpe_dir), "--lengths", "8192"], "exceeds the model's 4096 positions"),
        (["eval", "passkey", str(tmp_path / "missing")], "no such file or directory"),
        (["eval", "ppl", str(tiny_bpe_dir), "--data", str(text_file), "--lengths", "8192"], "exceeds"),
        (
            ["eval", "agreement", str(tiny_bpe_dir), "--reference", str(tiny_bpe_dir), "--prompts", "nope.txt"],
            "no such",
        ),
        (["eval", "harness", str(tiny_bpe_dir), "--tasks", "t", "--include-path", str(tmp_path / "none")], "no such"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert fragment in err[-1] and "Traceback" not in "".join(err), err
