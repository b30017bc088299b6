"""Recipes: every shipped YAML validates; bad keys, types and files fail before any work, naming the key."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from linspec.errors import LinspecError
from linspec.train.catalog import shipped_recipes
from linspec.train.recipe import Recipe, apply_override, describe_keys, load_recipe

RECIPES = list(shipped_recipes().values())  # the drafter recipes also: test_drafter_training.py


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"smollm2-135m-demo.yaml", "llama2-7b-paper.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert path.read_text().splitlines()[0] == f"# linspec train {path.stem}"  # a name: no checkout path
    assert recipe.stages and all(stage.name for stage in recipe.stages)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {f.name for f in dataclasses.fields(Recipe)}


def test_paper_recipe_matches_the_paper_settings():
    recipe = load_recipe("llama2-7b-paper")
    (stage,) = [s for s in recipe.stages if s.kind == "lora"]
    assert (stage.lora.r, stage.lora.alpha) == (8, 16.0)
    assert set(stage.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(stage.trainable) >= {"gamma", "conv", "embeddings", "norms"}
    assert (stage.steps, stage.batch_size, recipe.data.seq_len) == (1000, 64, 4096)
    assert stage.optimizer.lr == 2e-5 and stage.schedule.name == "constant" and stage.schedule.warmup_steps == 20
    assert recipe.precision == "bf16"
    settings = recipe.conversion.settings()
    assert (settings.group_size, settings.conv_taps, settings.feature_map) == (64, 32, "l2norm")


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASIC = """
base: smollm2-135m
data: {train: ["builtin:sample"], eval: null}
stages: [{kind: attention_transfer, steps: 3}]
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASIC + "learning_rate: 1\n", "recipe key learning_rate: unknown key"),
        (BASIC.replace("steps: 3", "steps: 3, lora: {rank: 4}"), "recipe key stages[0].lora.rank: unknown key"),
        (BASIC.replace("steps: 3", "steps: three"), "recipe key stages[0].steps: expected int, got 'three'"),
        (BASIC.replace("steps: 3", "steps: 0"), "recipe key stages[0].steps: must be > 0"),
        (BASIC + "precision: fp8\n", "recipe key precision: expected one of"),
        (BASIC.replace("builtin:sample", "./missing.txt"), "recipe key data.train[0]: file not found: ./missing.txt"),
        (BASIC.replace("builtin:sample", "builtin:nope"), "recipe key data.train[0]: unknown builtin"),
        (BASIC.replace("smollm2-135m", "./no/such/model"), "recipe key base: file not found"),
        (BASIC.replace("steps: 3", "steps: 3, batch_size: 3, micro_batch_size: 2"), "multiple of micro_batch_size"),
        (BASIC.replace("kind: attention_transfer", "kind: lora, lora: {r: 0}"), "recipe key stages[0].lora.r"),
        (BASIC.replace("steps: 3", "steps: 3, trainable: [gama]"), "recipe key stages[0].trainable[0]"),
        (BASIC + "conversion: {group_size: -1}\n", "recipe key conversion: group_size must be an integer in 1.."),
        (BASIC.replace("stages: [{kind: attention_transfer, steps: 3}]", "stages: []"), "recipe key stages"),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(LinspecError) as error:
        load_recipe(write(tmp_path, text))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_overrides_set_nested_keys_and_list_items_and_are_validated(tmp_path):
    path = write(tmp_path, BASIC)
    recipe = load_recipe(path, ["stages.0.steps=7", "stages.0.optimizer.lr=2e-5", "data.seq_len=64", "seed=3"])
    assert (recipe.stages[0].steps, recipe.stages[0].optimizer.lr, recipe.data.seq_len, recipe.seed) == (
        7,
        2e-5,
        64,
        3,
    )
    with pytest.raises(LinspecError, match=r"recipe key stages\[0\]\.steps: expected int"):
        load_recipe(path, ["stages.0.steps=many"])
    with pytest.raises(LinspecError, match="not an index"):
        load_recipe(path, ["stages.4.steps=1"])
    with pytest.raises(LinspecError, match="expected key=value"):
        apply_override({}, "seed")
    with pytest.raises(LinspecError, match="recipe not found"):
        load_recipe(tmp_path / "none.yaml")


def test_every_key_is_documented_and_help_lists_them_with_an_example(capsys):
    from linspec.cli import train as train_cli

    rows = describe_keys()
    undocumented = [key for key, kind, comment in rows if not comment]
    assert not undocumented, undocumented
    import argparse

    parser = argparse.ArgumentParser(prog="linspec")
    train_cli.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("stages.N.lora.r", "stages.N.optimizer.lr", "data.seq_len", "checkpoint.every", "merge_lora"):
        assert key in text
    assert text.strip().splitlines()[-1].startswith("example: linspec train smollm2-135m-demo ")
    assert "recipes/" not in text  # shipped recipes go by name; the folder exists only in a checkout
    leaves = [(key, comment) for key, kind, comment in rows if kind != "section"]
    assert all("default" in comment or "required" in comment for _, comment in leaves), leaves
    sections = [comment for _, kind, comment in rows if kind == "section"]
    assert all(comment.endswith((".", ")")) for comment in sections), sections  # whole sentences


def test_a_lora_stage_without_a_lora_section_takes_the_listed_defaults(tmp_path):
    from linspec.train.recipe import Lora

    path = tmp_path / "r.yaml"
    path.write_text("base: smollm2-135m\noutput: out\nstages: [{kind: lora, steps: 1}, {kind: full, steps: 1}]\n")
    lora_stage, full_stage = load_recipe(path).stages
    assert lora_stage.lora == Lora() and lora_stage.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert full_stage.lora is None  # only a lora stage gets one


def test_check_prints_the_presets_values_not_nulls(capsys, tmp_path):
    from linspec.cli import main

    assert main(["train", "smollm2-135m-demo", "conversion.preset=stable", "--check"]) == 0
    conversion = yaml.safe_load(capsys.readouterr().out)["conversion"]
    assert conversion["group_size"] == 64 and conversion["feature_map"] == "l2norm"
    assert None not in conversion.values()


def test_paper_recipe_dry_run_runs_every_stage_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))
    from linspec.train.dry_run import dry_run

    recipe = load_recipe("llama2-7b-paper")
    summary = dry_run(recipe, keep=str(tmp_path / "run"))
    assert set(summary["ppl"]) == {"original", "converted", *(s.name for s in recipe.stages)}
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["event"] == "step"]) == 2 * len(recipe.stages)


def test_auto_softmax_layers_are_measured_at_the_start_and_the_trained_model_has_a_card(tmp_path):
    from linspec.train.dry_run import dry_run

    recipe = load_recipe("smollm2-135m-demo", ["conversion.softmax_layers=auto:2"])
    assert recipe.conversion.auto_layers().count == 2 and recipe.conversion.settings().softmax_layers == ()
    summary = dry_run(recipe, keep=tmp_path / "run")  # the tiny model has 2 layers: auto:1 there
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert len(config["linspec"]["softmax_layers"]) == 1
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "| softmax layers kept |" in card and "import linspec" in card and "- transfer: attention_transfer" in card
    assert f"{summary['ppl']['lora']:.2f}" in card and "Not measured" not in card
    with pytest.raises(LinspecError, match="auto:N"):
        load_recipe("smollm2-135m-demo", ["conversion.softmax_layers=auto:x"])
