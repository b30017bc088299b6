"""Perplexity: sliding windows score every token once; ablations zero γ / conv and put them back."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import randomize_linspec_parameters, tiny_base, tiny_linspec

import linspec
from linspec.evaluate import ablated, perplexity_of_ids, perplexity_of_sequences, sliding_windows


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(50, 16, 16), (50, 16, 5), (17, 16, 16), (16, 16, 3), (3, 8, 8)]
)
def test_sliding_windows_score_every_token_once_with_context(length, window, stride):
    ids = torch.arange(length)
    scored = []
    for chunk, skip in sliding_windows(ids, window, stride):
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
            assert all(float(m.global_scale) == 0 for m in model.linspec_modules()) == ("gamma" in parts)
            assert all(not m.conv_weight.any() for m in model.linspec_modules()) == ("conv" in parts)
            results[name] = perplexity_of_ids(model, ids, window=32, progress=False).ppl
    for (gamma, conv), module in zip(before, model.linspec_modules(), strict=True):
        assert torch.equal(gamma, module.global_scale) and torch.equal(conv, module.conv_weight)
    assert len({full, *results.values()}) == 4  # each component changes the model's predictions
    assert perplexity_of_ids(model, ids, window=32, progress=False).ppl == full


def test_eval_cli_prints_one_row_per_ablation(tmp_path, capsys):
    from linspec.cli import evaluate as evaluate_cli
    from linspec.train.corpus import SAMPLE
    from linspec.train.tiny import tiny_tokenizer

    model = linspec.convert(tiny_base("llama", vocab_size=len(tiny_tokenizer())), linspec.LinspecConfig(group_size=8))
    randomize_linspec_parameters(model)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(SAMPLE)
    parser = argparse.ArgumentParser(prog="linspec")
    evaluate_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "ppl", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"),
                              "--window", "64", "--ablations"])  # fmt: skip
    assert args.func(args) == 0
    table = capsys.readouterr().out
    for name in ("full", "no-gamma", "no-conv", "local-only"):
        assert f"| {name} |" in table
