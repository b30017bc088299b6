"""``softmax_heads: auto:N`` and ``linspec eval heads``: the attention each kv head puts outside the local span,
measured against the softmax model's own attention probabilities."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_base
from transformers import AutoModelForCausalLM

import linspec
from linspec.cli import main
from linspec.conversion.choice import Auto, parse_softmax_heads
from linspec.conversion.softmax_heads import choose_softmax_heads, far_attention_mass
from linspec.errors import LinspecError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force_mass(base, sequences: torch.Tensor, span: int, sinks: int) -> torch.Tensor:
    """The same measure from the probabilities the eager attention returns (``output_attentions``)."""
    config = base.config
    repeats = config.num_attention_heads // config.num_key_value_heads
    length = sequences.shape[1]
    t = torch.arange(length)
    outside = (t[:, None] - t[None, :] >= span) & (t[None, :] >= sinks)
    total = torch.zeros(config.num_hidden_layers, config.num_attention_heads, dtype=torch.float64)
    for row in sequences:
        with torch.no_grad():
            attentions = base(row[None], output_attentions=True).attentions
        for layer, probabilities in enumerate(attentions):  # (1, H, T, T)
            total[layer] += (probabilities[0, :, span:] * outside[span:]).sum(-1).mean(-1).double()
    per_kv = (total / len(sequences)).view(config.num_hidden_layers, -1, repeats).sum(-1)
    return per_kv.float()


@pytest.mark.parametrize(("preset", "overrides"), [("window", {"local_window": 16}), ("stable", {"group_size": 8})])
def test_outside_mass_equals_the_eager_attention_probabilities(preset, overrides):
    base = tiny_base("qwen3", seed=3)  # q/k norms: project() must apply them
    base.config._attn_implementation = "eager"
    settings = linspec.LinspecConfig.from_preset(preset, **overrides)
    sequences = torch.randint(3, 97, (2, 300 + 40), generator=torch.Generator().manual_seed(0))
    span, sinks = (16, 4) if settings.softmax_window else (8, 0)
    measured = far_attention_mass(base, settings, sequences, progress=False)
    torch.testing.assert_close(measured, brute_force_mass(base, sequences, span, sinks), rtol=1e-4, atol=1e-5)
    assert measured.shape == (3, 2) and float(measured.min()) > 0.0


def test_choose_softmax_heads_takes_the_largest_outside_the_softmax_layers():
    base = tiny_base("llama", seed=1)
    sequences = torch.randint(3, 97, (1, 64), generator=torch.Generator().manual_seed(1))
    settings = linspec.LinspecConfig.from_preset("window", local_window=16, softmax_layers=(1,))
    mass = far_attention_mass(base, settings, sequences, progress=False)
    chosen = choose_softmax_heads(base, settings, sequences, 3, progress=False)
    assert len(chosen) == 3 and all(layer != 1 for layer, _ in chosen)
    left = [(layer, head) for layer in (0, 2) for head in range(2) if (layer, head) not in chosen]
    assert min(float(mass[pair]) for pair in chosen) >= max(float(mass[pair]) for pair in left)
    with pytest.raises(LinspecError, match="have 4 kv heads"):
        choose_softmax_heads(base, settings, sequences, 5, progress=False)
    with pytest.raises(LinspecError, match="never reach past"):
        far_attention_mass(base, settings, sequences[:, :16], progress=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4:1, 7:0", ((4, 1), (7, 0))), ("auto:12", Auto(12)), ([[2, 1]], ((2, 1),))],
)
def test_parse_softmax_heads(text, expected):
    assert parse_softmax_heads(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("4", "layer:kv-head pairs"), ("a:b", "layer:kv-head pairs"), ("auto:0", "N >= 1"), (",", "pairs"),
     ("1:99999", "past any model"), ("1:-1", "layer:kv-head pairs")],
)  # fmt: skip
def test_parse_softmax_heads_refuses_bad_text_in_one_line(text, message):
    with pytest.raises(LinspecError, match=message) as error:
        parse_softmax_heads(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"softmax_heads": ((0, 1), (1, 0)), "softmax_layers": (1,)}, "every head of a softmax layer"),
     ({"softmax_heads": ((0,),)}, "pairs"), ({"softmax_heads": "0:1"}, "pairs"),
     ({"softmax_heads": ((0, -1),)}, "non-neg")],
)  # fmt: skip
def test_bad_softmax_heads_settings_are_refused(settings, message):
    with pytest.raises(LinspecError, match=message):
        linspec.LinspecConfig(**settings)


def test_softmax_heads_out_of_the_model_are_refused():
    with pytest.raises(LinspecError, match="2 kv heads per layer"):
        linspec.convert(tiny_base("llama"), linspec.LinspecConfig(softmax_heads=((0, 2),)))
    with pytest.raises(LinspecError, match="the model has 3 layers"):
        linspec.convert(tiny_base("llama"), linspec.LinspecConfig(softmax_heads=((3, 0),)))


def test_convert_and_eval_heads_choose_the_same_heads(tiny_bpe_dir, text_file, tmp_path, capsys):
    window = ["--preset", "window", "--local-window", "64"]
    assert main(["eval", "heads", str(tiny_bpe_dir), "--data", str(text_file), *window, "--top", "2"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()[-1]
    assert listed.startswith("--softmax-heads ")
    out = tmp_path / "out"
    code = main(
        ["convert", str(tiny_bpe_dir), str(out), *window, "--softmax-heads", "auto:2", "--data", str(text_file)]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    heads = json.loads((out / "config.json").read_text())["linspec"]["softmax_heads"]
    assert ",".join(f"{a}:{b}" for a, b in heads) == listed.split()[1]
    assert "softmax heads: " + listed.split()[1] in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.new_cache().head_kv) == len({layer for layer, _ in heads})
    assert main(["convert", str(tiny_bpe_dir), str(tmp_path / "o2"), "--softmax-heads", "auto:2"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", "heads", str(out), "--data", str(text_file)]) == 2
    assert "rank the heads of its softmax parent" in capsys.readouterr().err
