"""Every saved linspec model carries a card: where it came from (a hub id, or the local file named plainly), the
command that rebuilds it, its quality curve beside the window-only ablation and the original, its decode cache
by context, and how to load it — with linspec, with plain transformers and with the evaluation harness."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_base

import linspec
from linspec.cli import main
from linspec.conversion.card import describe_source
from linspec.conversion.checkpoint import convert_checkpoint
from linspec.evaluation.perplexity import perplexity_of_sequences
from linspec.models.cache_size import measured_cache_growth, softmax_cache_growth
from linspec.models.card import ModelCard, Quality
from linspec.sources.demo_models import DEMO_MODELS
from linspec.train.distributed import Env
from linspec.train.evaluation import curve_sequences, length_curve
from linspec.train.recipe import load_recipe
from linspec.train.reproduce import train_argv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def metadata(card: str) -> dict:
    """The card's YAML front matter, parsed."""
    assert card.startswith("---\n")
    return yaml.safe_load(card[4 : card.index("\n---\n", 4)])


def command(card: str, verb: str) -> list[str]:
    """The ``linspec VERB ...`` line of the card's Reproduce section, split as a shell would."""
    lines = [line for line in card.splitlines() if line.startswith(f"linspec {verb} ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[1:]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def test_a_conversion_card_rebuilds_the_same_directory_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the card names the paths as they were given: relative ones, here
    tiny_base("llama").save_pretrained("base")
    Path("base/README.md").write_text("---\nlicense: mit\n---\n# base\n")
    window = {"local_window": 16, "sink_tokens": 2}
    settings = linspec.LinspecConfig.from_preset(
        "window", group_size=8, conv_taps=4, softmax_layers=(1,), softmax_heads=((2, 0),), **window
    )
    convert_checkpoint("base", "out", settings, dtype=torch.bfloat16)
    card = Path("out/README.md").read_text()

    meta = metadata(card)
    assert "base_model" not in meta and meta["license"] == "mit"  # a local path is no hub id
    assert "Converted from the local checkpoint `base`" in card
    argv = command(card, "convert")
    assert argv[:3] == ["convert", "base", "out"] and "--preset" in argv
    argv[2] = "again"
    assert main(argv) == 0
    assert json.loads(Path("again/config.json").read_text()) == json.loads(Path("out/config.json").read_text())
    first, second = tensors(Path("out")), tensors(Path("again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    assert "PATH" not in card
    assert 'linspec.load("out")' in card and 'from_pretrained("out", trust_remote_code=True)' in card
    assert "lm_eval --model hf --model_args pretrained=out,trust_remote_code=True" in card
    assert "None: a raw conversion" in card and "Not measured." in card and "--reference base" in card


def test_the_state_size_is_measured_on_the_real_cache_and_matches_the_softmax_kv_formula():
    base = tiny_base("qwen3")  # its head_dim is not hidden/heads: the formula must read it
    assert measured_cache_growth(base) == softmax_cache_growth(base.config, torch.float32)
    linear = linspec.convert(tiny_base("llama"), linspec.LinspecConfig(group_size=8, conv_taps=4)).eval()
    growth = measured_cache_growth(linear)
    assert growth.per_token == 0 and growth.fixed > 0
    hybrid = linspec.convert(tiny_base("llama"), linspec.LinspecConfig(group_size=8, softmax_layers=(0,))).eval()
    layer = softmax_cache_growth(tiny_base("llama", num_hidden_layers=1).config, torch.float32)
    assert measured_cache_growth(hybrid).per_token == layer.per_token  # one softmax layer's KV per token
    card = ModelCard(
        source=describe_source("smollm2-135m"),
        settings=hybrid.config.linspec_settings,
        location="out",
        cache=measured_cache_growth(hybrid),
        original_cache=softmax_cache_growth(hybrid.config, torch.float32),
        max_positions=4096,
    ).render()
    assert "## State size" in card and "| 1,024 |" in card and "| 4,096 |" in card and "16,384" not in card
    assert f"grows by {layer.per_token / 1024:.1f} KiB per token" in card


def test_a_card_without_the_grouped_term_describes_the_window_its_memory_and_its_cache():
    settings = linspec.LinspecConfig.from_preset("window-hedgehog", sparse_cache=8, local_window=8)
    model = linspec.convert(tiny_base("llama"), settings).eval()
    card = ModelCard(
        source=describe_source("smollm2-135m"),
        settings=settings,
        location="out",
        cache=measured_cache_growth(model),
        original_cache=softmax_cache_growth(model.config, torch.float32),
    ).render()
    assert "replaced by the pretrained softmax over the last 8 tokens" in card
    assert "hedgehog feature maps in the same softmax, and a sparse cache" in card
    assert "| grouped term | none" in card and "| conv taps |" not in card and "| global memory |" not in card
    assert "γ and the convolution start at zero" not in card and "its far memory starts untrained" in card
    grouped = linspec.LinspecConfig.from_preset("window")
    assert "| grouped term | none" not in ModelCard(describe_source("smollm2-135m"), grouped, "out").render()


def test_base_models_are_hub_ids_and_local_sources_are_named_plainly(tmp_path):
    for name, spec in DEMO_MODELS.items():  # every built-in source names the hub repository it is a copy of
        demo = describe_source(name)
        assert (demo.repo_id, demo.license) == (spec.hub_id, spec.license) and demo.repo_id in demo.text
    demo = describe_source("smollm2-135m")
    assert (demo.repo_id, demo.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    assert describe_source(str(named)).repo_id == "Qwen/Qwen2.5-0.5B"
    (named / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert describe_source(str(named)).repo_id is None  # a path in _name_or_path is no hub id
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert describe_source(str(gguf)).repo_id is None and "the local file" in describe_source(str(gguf)).text
    assert describe_source("meta-llama/Llama-2-7b-hf").repo_id == "meta-llama/Llama-2-7b-hf"
    for source in ("smollm2-135m", str(named), str(gguf), "meta-llama/Llama-2-7b-hf"):
        card = ModelCard(source=describe_source(source), settings=linspec.LinspecConfig(), location="x").render()
        assert metadata(card).get("base_model") == describe_source(source).repo_id
    unknown = ModelCard(source=describe_source(str(gguf)), settings=linspec.LinspecConfig(), location="x").render()
    assert "license" not in metadata(unknown) and "the base model’s licence applies" in unknown


def test_a_training_command_names_the_shipped_recipe_and_the_overrides_used():
    recipe = load_recipe("smollm2-135m-demo", ["seed=3", "stages.1.lora.r=16"])
    argv = train_argv(recipe)
    assert argv[:2] == ["train", "smollm2-135m-demo"] and sorted(argv[2:]) == ["seed=3", "stages.1.lora.r=16"]
    assert train_argv(load_recipe("smollm2-135m-hybrid")) == ["train", "smollm2-135m-hybrid"]


def test_the_band_curve_scores_every_token_once():
    """The curve's bands, weighted by their tokens, give exactly the perplexity of the whole sequences."""
    model = linspec.convert(tiny_base("llama"), linspec.LinspecConfig.from_preset("window", local_window=8)).eval()
    held_out = torch.randint(3, 97, (6, 16), generator=torch.Generator().manual_seed(0))
    sequences = curve_sequences(held_out, 48)
    assert torch.equal(sequences.reshape(-1), held_out.reshape(-1)[: sequences.numel()])  # the same text, regrouped
    curve = length_curve(model, sequences, [8, 16, 48], Env(0, 1, torch.device("cpu")), "fp32")
    assert curve.tokens == [7 * len(sequences), 8 * len(sequences), 32 * len(sequences)]
    pooled = math.exp(sum(math.log(p) * n for p, n in zip(curve.ppl, curve.tokens, strict=True)) / sum(curve.tokens))
    assert pooled == pytest.approx(perplexity_of_sequences(model, sequences).ppl, rel=1e-5)


def test_a_trained_card_shows_the_window_only_column_and_names_what_was_not_measured(tmp_path):
    from linspec.train.dry_run import TINY_LAYERS, shrink
    from linspec.train.run import train
    from linspec.train.tiny import make_tiny_base

    base = make_tiny_base(tmp_path / "base", num_layers=TINY_LAYERS)
    recipe = shrink(load_recipe("smollm2-135m-demo", ["eval.baselines=false"]), base, tmp_path / "run")
    train(recipe)  # the demo recipe at toy scale: two stages with a curriculum, the window preset
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["curve"]) == {"model", "local-only"}  # no original: the run skipped its baselines
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "| context (tokens) | this model | window only | original |" in card
    model, local = summary["curve"]["model"], summary["curve"]["local-only"]
    assert f"| 1–{model['bounds'][0] - 1} | {model['ppl'][0]:.2f} | {local['ppl'][0]:.2f} | — |" in card
    assert "Not measured: original (the run skipped its baselines" in card
    argv = command(card, "train")
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert asdict(load_recipe(argv[1], argv[2:])) == resolved  # the command rebuilds the recipe the run used
    assert metadata(card).get("base_model") is None and "PATH" not in card


def test_an_explicit_card_lists_its_curve_and_phases():
    card = ModelCard(
        source=describe_source("smollm2-135m"),
        settings=linspec.LinspecConfig.from_preset("window"),
        location="runs/demo/model",
        reproduce=["train", "smollm2-135m-demo"],
        training=["transfer: attention_transfer, 26 steps"],
        quality=Quality(
            data="`builtin:wiki-en-eval`",
            curve={
                "model": {"bounds": [256, 2048], "ppl": [25.0, 14.2], "tokens": [510, 3584], "sequences": 2},
                "original": {"bounds": [256, 2048], "ppl": [19.0, 11.8], "tokens": [510, 3584], "sequences": 2},
            },
            phases={"original": 19.5, "lora": 24.8},
            phase_length=256,
        ),
    ).render()
    assert metadata(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.index("| 1–255 | 25.00 | — | 19.00 |") < card.index("| 256–2047 | 14.20 | — | 11.80 |")
    assert "Not measured: window only" in card and "original 19.50, after lora 24.80" in card
    assert "linspec train smollm2-135m-demo\n" in card and "recipes/" not in card


def test_a_drafter_card_names_its_recipe_command_target_and_directory():
    from linspec.train.cards import drafter_card

    recipe = asdict(load_recipe("medusa-smollm2-135m", ["stages.0.steps=10"]))
    training = {"recipe": json.loads(json.dumps(recipe)), "eval_accuracy_by_depth": [0.5, 0.25]}  # as recorded
    card = drafter_card("medusa", {"depth": 2}, {"vocab_size": 97}, training, "runs/medusa/drafter")
    assert "linspec train medusa-smollm2-135m stages.0.steps=10\n" in card
    assert "linspec generate smollm2-135m --draft medusa --drafter runs/medusa/drafter" in card
    assert "| eval_accuracy_by_depth | [0.5, 0.25] |" in card and "| recipe |" not in card and "PATH" not in card
