"""Recipes ship with the package: listed, copied out, and run by name without a source checkout."""

from __future__ import annotations

import pytest

from linspec.cli import main
from linspec.errors import LinspecError
from linspec.train.catalog import copy_recipe, resolve_recipe, shipped_recipes


def test_every_shipped_recipe_is_listed_and_resolves_by_name(capsys):
    recipes = shipped_recipes()
    assert {"smollm2-135m-demo", "llama2-7b-paper"} <= set(recipes)
    assert main(["recipes", "ls"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(recipes)
    assert all(line.rstrip().endswith(".") for line in listed)  # whole sentences, not cut mid-way
    for name, path in recipes.items():
        assert resolve_recipe(name) == path == resolve_recipe(f"{name}.yaml")


def test_train_check_accepts_a_shipped_name(capsys):
    assert main(["train", "smollm2-135m-demo", "--check"]) == 0
    assert "base: smollm2-135m" in capsys.readouterr().out


def test_copy_refuses_to_overwrite_without_force_and_unknown_names(tmp_path):
    target = copy_recipe("smollm2-135m-demo", tmp_path)
    assert target == tmp_path / "smollm2-135m-demo.yaml" and target.read_text().startswith("# linspec train")
    target.write_text("mine")
    with pytest.raises(LinspecError, match="exists; pass --force"):
        copy_recipe("smollm2-135m-demo", target)
    assert target.read_text() == "mine"
    copy_recipe("smollm2-135m-demo", target, force=True)
    assert target.read_text().startswith("# linspec train")
    with pytest.raises(LinspecError, match="no shipped recipe 'nope'"):
        copy_recipe("nope", tmp_path)
    with pytest.raises(LinspecError, match="recipe not found"):
        resolve_recipe("../recipes/nope")
    with pytest.raises(LinspecError, match="is not a directory"):
        copy_recipe("smollm2-135m-demo", tmp_path / "missing" / "x.yaml")
