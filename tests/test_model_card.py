"""Every saved linspec model carries a card saying what it is, how to load it, and what cannot load it."""

from __future__ import annotations

from tiny_models import tiny_base

import linspec
from linspec.checkpoint import convert_checkpoint
from linspec.model_card import ModelCard, source_license


def test_a_converted_directory_has_a_card_with_base_settings_licence_and_loading(tmp_path):
    source = tmp_path / "base"
    tiny_base("llama").save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    out = convert_checkpoint(str(source), tmp_path / "out", linspec.LinspecConfig(group_size=8, softmax_layers=(1,)))
    card = (out / "README.md").read_text()
    assert f"base_model: {source}" in card and "license: mit" in card
    assert "| group size | 8 |" in card and "| softmax layers kept | 1 |" in card
    assert "import linspec" in card and "cannot load" in card
    assert "None: a raw conversion" in card and "Not measured" in card


def test_a_trained_card_lists_the_recipe_and_the_measured_curve():
    card = ModelCard(
        base_model="smollm2-135m",
        settings=linspec.LinspecConfig(),
        license=source_license("smollm2-135m"),
        recipe="recipes/smollm2-135m-demo.yaml",
        training=["transfer: 32 steps", "distill: 360 steps"],
        quality={2048: (14.2, 11.8), 256: (25.0, 19.0)},
        quality_data="builtin:wiki-en-eval",
    ).render()
    assert "license: apache-2.0" in card and "recipes/smollm2-135m-demo.yaml" in card
    assert card.index("| 256 | 25.00 | 19.00 |") < card.index("| 2048 | 14.20 | 11.80 |")
    assert "- distill: 360 steps" in card and "Not measured" not in card


def test_an_unknown_licence_is_said_to_be_the_base_models(tmp_path):
    assert source_license(str(tmp_path)) is None
    card = ModelCard(base_model="x", settings=linspec.LinspecConfig()).render()
    assert "license: other" in card and "the base model’s licence applies" in card
