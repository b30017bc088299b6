"""Perplexity: scoring windows score every token once; ablations zero γ / conv and put them back; layers restored to
softmax, and the ranking of layers by what that leaves (``linspec eval layers``)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import randomize_linspec_parameters, tiny_base, tiny_linspec

import linspec
from linspec.evaluation.perplexity import ablated, perplexity_of_ids, perplexity_of_sequences, scoring_windows


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(50, 16, 16), (50, 16, 5), (17, 16, 16), (16, 16, 3), (3, 8, 8)]
)
def test_scoring_windows_score_every_token_once_with_context(length, window, stride):
    ids = torch.arange(length)
    scored = []
    for chunk, skip in scoring_windows(ids, window, stride):
        assert len(chunk) <= window and skip >= 1  # position 0 of a window has nothing to predict it from
        scored.extend(chunk[skip:].tolist())
    assert scored == list(range(1, length))


def test_perplexity_matches_a_direct_computation():
    model = tiny_linspec("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (40,))
    with torch.no_grad():  # windows [0, 16) and [15, 31) score tokens 1..30, each once
        nll = [F.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum") for w in (ids[:16], ids[15:31])]
    expected = math.exp(sum(float(x) for x in nll) / 30)
    assert perplexity_of_ids(model, ids[:31], window=16, progress=False).ppl == pytest.approx(expected, rel=1e-5)
    packed = ids[:32].view(2, 16)
    with torch.no_grad():
        nll = F.cross_entropy(model(packed).logits[:, :-1].transpose(1, 2), packed[:, 1:])
    assert perplexity_of_sequences(model, packed).ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_ablations_change_the_result_and_restore_the_parameters():
    model = tiny_linspec("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (64,))
    before = [(m.global_scale.clone(), m.conv_weight.clone()) for m in model.linspec_modules()]
    full = perplexity_of_ids(model, ids, window=32, progress=False).ppl
    results = {}
    for name, parts in {"no-gamma": ("gamma",), "no-conv": ("conv",), "local-only": ("gamma", "conv")}.items():
        with ablated(model, parts):
            assert all(float(m.global_scale.detach()) == 0 for m in model.linspec_modules()) == ("gamma" in parts)
            assert all(not m.conv_weight.any() for m in model.linspec_modules()) == ("conv" in parts)
            results[name] = perplexity_of_ids(model, ids, window=32, progress=False).ppl
    for (gamma, conv), module in zip(before, model.linspec_modules(), strict=True):
        assert torch.equal(gamma, module.global_scale) and torch.equal(conv, module.conv_weight)
    assert len({full, *results.values()}) == 4  # each component changes the model's predictions
    assert perplexity_of_ids(model, ids, window=32, progress=False).ppl == full


def run_eval_cli(tmp_path, model, capsys, task: str, *options: str) -> str:
    """Save ``model`` with the tiny tokenizer and a text file, run ``linspec eval TASK`` on them; its stdout."""
    from linspec.cli import evaluate as evaluate_cli
    from linspec.data.corpus import SAMPLE
    from linspec.train.tiny import tiny_tokenizer

    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(SAMPLE)
    parser = argparse.ArgumentParser(prog="linspec")
    evaluate_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", task, str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), *options])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_eval_cli_prints_one_row_per_ablation(tmp_path, capsys):
    from linspec.train.tiny import tiny_tokenizer

    model = linspec.convert(tiny_base("llama", vocab_size=len(tiny_tokenizer())), linspec.LinspecConfig(group_size=8))
    randomize_linspec_parameters(model)
    table = run_eval_cli(tmp_path, model, capsys, "ppl", "--window", "64", "--ablations")
    for name in ("full", "no-gamma", "no-conv", "local-only"):
        assert f"| {name} |" in table


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_restoring_a_layer_to_softmax_equals_the_hybrid_conversion(arch):
    from linspec.evaluation.perplexity import softmax_restored

    ids = torch.randint(0, 97, (2, 24))
    linear = tiny_linspec(arch)  # γ and conv random: the restored layer must drop them
    hybrid = tiny_linspec(arch, softmax_layers=(1,))
    by_layer = {m.layer_idx: m for m in linear.linspec_modules()}
    with torch.no_grad():
        for module in hybrid.linspec_modules():  # the layers both keep linear get the same γ and conv
            module.global_scale.copy_(by_layer[module.layer_idx].global_scale)
            module.conv_weight.copy_(by_layer[module.layer_idx].conv_weight)
        hybrid_logits = hybrid(ids, use_cache=False).logits
        plain = linear(ids, use_cache=False).logits
        with softmax_restored(linear, [1]):
            restored = linear(ids, use_cache=False).logits
        assert torch.equal(linear(ids, use_cache=False).logits, plain)  # hooks removed on exit
    torch.testing.assert_close(restored, hybrid_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, hybrid_logits, atol=1e-3)
    with pytest.raises(linspec.LinspecError, match="not linear-attention layers"), softmax_restored(hybrid, [1]):
        pass


def test_eval_layers_ranks_every_linear_layer_and_measures_the_best_sets(tmp_path, capsys):
    from linspec.conversion.softmax_layers import rank_layers
    from linspec.evaluation.perplexity import softmax_restored
    from linspec.train.tiny import tiny_tokenizer

    model = linspec.convert(tiny_base("llama", vocab_size=len(tiny_tokenizer())), linspec.LinspecConfig(group_size=8))
    randomize_linspec_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 32))
    ranking = rank_layers(model, ids, top=2, progress=False)
    assert sorted(ranking.single) == [m.layer_idx for m in model.linspec_modules()]
    best = min(ranking.single, key=ranking.single.__getitem__)
    assert ranking.cumulative[0] == ([best], ranking.single[best])
    with softmax_restored(model, ranking.cumulative[-1][0]):
        assert perplexity_of_sequences(model, ids).ppl == pytest.approx(ranking.cumulative[-1][1], rel=1e-6)
    assert ranking.baseline == pytest.approx(perplexity_of_sequences(model, ids).ppl, rel=1e-6)

    out = run_eval_cli(tmp_path, model, capsys, "layers", "--seq-len", "32", "--max-sequences", "2", "--top", "2")
    assert "| layer kept softmax |" in out and "| conversion.softmax_layers |" in out
    out = run_eval_cli(tmp_path, model, capsys, "layers", "--seq-len", "32", "--max-sequences", "2", "--top", "2",
                       "--search", "greedy", "--pool", "2")  # fmt: skip
    assert "| conversion.softmax_layers |" in out


def test_eval_layers_by_passkey_ranks_by_the_keys_loss(tmp_path, capsys):
    """``--by passkey`` ranks layers by the teacher-forced loss of the key; the scorer is that loss, computed."""
    from linspec.conversion.softmax_layers import rank_layers
    from linspec.evaluation.passkey import key_nll_scorer, make_trials
    from linspec.evaluation.perplexity import softmax_restored
    from linspec.train.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = linspec.convert(
        tiny_base("llama", vocab_size=len(tokenizer), max_position_embeddings=1024), linspec.LinspecConfig(group_size=8)
    )
    randomize_linspec_parameters(model)
    score = key_nll_scorer(tokenizer, 512, trials=2)
    losses = []
    for trial in make_trials(tokenizer, 512, 2, seed=1):
        answer = tokenizer.encode(" " + trial.key, add_special_tokens=False)
        ids = torch.tensor([trial.prompt_ids + answer])
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0, -len(answer) - 1 : -1]
        losses.append(F.cross_entropy(logits, ids[0, -len(answer) :]).item())
    assert score(model) == pytest.approx(sum(losses) / 2, rel=1e-6) and min(losses) > 0
    ranking = rank_layers(model, None, top=2, progress=False, score=score)
    best = min(ranking.single, key=ranking.single.__getitem__)
    assert ranking.cumulative[0] == ([best], ranking.single[best])
    with softmax_restored(model, ranking.cumulative[-1][0]):
        assert score(model) == pytest.approx(ranking.cumulative[-1][1], rel=1e-6)

    out = run_eval_cli(tmp_path, model, capsys, "layers", "--by", "passkey", "--passkey-length", "512", "--trials", "1",
                       "--top", "1")  # fmt: skip
    assert "passkey key NLL" in out and "| conversion.softmax_layers |" in out


def test_greedy_search_adds_the_layer_that_helps_most_together(tmp_path, capsys):
    """Layers 0 and 1 each help a lot alone but do the same job; layer 2 helps less alone but adds to either.
    Taking the best two alone gives {0, 1}; forward selection finds {0, 2}. The scores are a table over the set
    of layers actually restored to softmax while the scorer runs."""
    from linspec.conversion.softmax_layers import rank_layers

    model = linspec.convert(tiny_base("llama"), linspec.LinspecConfig(group_size=8))
    table = {(): 10.0, (0,): 5.0, (1,): 5.5, (2,): 7.0, (0, 1): 4.9, (0, 2): 2.0, (1, 2): 2.5}
    calls = []

    def score(m) -> float:
        restored = tuple(x.layer_idx for x in m.linspec_modules() if x._forward_hooks)  # softmax_restored's hooks
        calls.append(restored)
        return table[restored]

    single = rank_layers(model, None, top=2, progress=False, score=score)
    assert single.cumulative == [([0], 5.0), ([0, 1], 4.9)]
    greedy = rank_layers(model, None, top=2, progress=False, score=score, search="greedy")
    assert greedy.cumulative == [([0], 5.0), ([0, 2], 2.0)] and greedy.single == single.single
    calls.clear()
    pooled = rank_layers(model, None, top=2, progress=False, score=score, search="greedy", pool=2)
    assert pooled.cumulative == [([0], 5.0), ([0, 1], 4.9)]  # layer 2 is not among the 2 best alone
    assert (0, 2) not in calls
    with pytest.raises(linspec.LinspecError, match="search must be one of"):
        rank_layers(model, None, top=2, progress=False, score=score, search="beam")
