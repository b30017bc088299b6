"""Drafter training as a stage of ``linspec train``: the recipe form, the run directory it shares with the other
stages, and what the drafter trainer of before wrote (tests/golden/legacy-drafter) read by today's code.

The fixture's drafter was trained by that trainer, uninterrupted; its interrupted run stopped after step 3 of 6.
Batches are a function of the seed and the step and the schedule is the same, so today's stage must give that
drafter, both from the old recipe and by resuming the old run, within rounding: the fixture's CPU went unrecorded
and other CPU models round differently.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from linspec.cli import main
from linspec.errors import LinspecError
from linspec.train.catalog import shipped_recipes
from linspec.train.recipe import load_recipe

LEGACY = Path(__file__).parent / "golden" / "legacy-drafter"
DRAFTER_RECIPES = [name for name in shipped_recipes() if name.split("-")[0] in ("medusa", "eagle", "redrafter")]


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    """A copy of the fixture (its paths are relative to its folder), worked on from inside it."""
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))
    return folder


def weights(drafter: Path) -> dict[str, torch.Tensor]:
    return load_file(str(drafter / "drafter.safetensors"))


def assert_same_weights(a: Path, b: Path, **tolerance: float) -> None:
    """The same tensor names and values: bit for bit without ``tolerance`` (two runs of today's code on this
    machine), else within ``rtol``/``atol``."""
    first, second = weights(a), weights(b)
    assert sorted(first) == sorted(second)
    for name in first:
        if tolerance:
            torch.testing.assert_close(first[name], second[name], **tolerance, msg=name)
        else:
            assert torch.equal(first[name], second[name]), name


def assert_fixture_weights(drafter: Path) -> None:
    """The fixture's drafter within float32 rounding of six optimiser steps: its writer's CPU went unrecorded, and
    other CPU models round differently (``tests/arithmetic.py``)."""
    assert_same_weights(drafter, LEGACY / "drafter", rtol=1e-4, atol=1e-7)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_old_format_recipe_is_read_as_one_drafter_stage_and_trains_the_same_drafter(legacy, capsys):
    recipe = load_recipe("recipe.yaml")
    (stage,) = recipe.stages
    assert recipe.conversion is None and recipe.base == "./base" and recipe.threads == 1
    assert (stage.kind, stage.name, stage.loss, stage.steps, stage.batch_size) == ("drafter", "drafter", "draft", 6, 8)
    assert (stage.drafter.kind, stage.drafter.depth, stage.drafter.draft_vocab) == ("medusa", 2, 16)
    assert (stage.schedule.name, stage.schedule.warmup_steps, recipe.eval.every) == ("cosine", 2, 2)
    assert main(["train", "recipe.yaml", "--check"]) == 0
    captured = capsys.readouterr()
    assert "old format" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert yaml.safe_load(captured.out)["stages"][0]["kind"] == "drafter"

    assert main(["train", "recipe.yaml", "output=fresh"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "wrote fresh/drafter"
    assert_fixture_weights(Path("fresh/drafter"))
    old_rows = (LEGACY / "interrupted" / "metrics.jsonl").read_text().splitlines()
    old_losses = [json.loads(line)["loss"] for line in old_rows]
    new_losses = [r["loss"] for r in records(Path("fresh")) if r["event"] == "step"]
    assert [round(x, 5) for x in new_losses[:3]] == old_losses
    assert [r["step"] for r in records(Path("fresh")) if r["event"] == "eval"] == [2, 4, 6]
    summary = json.loads(Path("fresh/summary.json").read_text())
    assert summary["ppl"] == {} and len(summary["accuracy_by_depth"]["drafter"]) == 2
    assert (Path("fresh/stages/drafter/drafter.json")).is_file() and not Path("fresh/model").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=-1", "recipe key train.steps: must be > 0"),
        ("train.lr=nan", "recipe key train.lr: must be a finite number"),
        ("drafter.kind=hydra", "recipe key drafter.kind: expected one of medusa, eagle, redrafter"),
        ("drafter.heads=3", "recipe key drafter.heads: unknown key"),
        ("data.text_length=1", "recipe key data.text_length: must be at least 2"),
        ("train.momentum=0.9", "recipe key train.momentum: unknown key"),
        ("target=./nowhere", "recipe key target: file not found"),
    ],
)
def test_errors_in_an_old_format_recipe_name_the_keys_it_was_written_with(legacy, override, message):
    with pytest.raises(LinspecError) as error:
        load_recipe("recipe.yaml", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_interrupted_old_run_resumes_to_the_drafter_of_the_uninterrupted_run(legacy, capsys):
    run = Path("interrupted")
    assert main(["train", "recipe.yaml"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "recipe.yaml", "train.steps=5", "--resume"]) == 2  # a shorter run is another recipe
    assert "differs from the one" in capsys.readouterr().err
    assert main(["train", "recipe.yaml", "--resume"]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    assert_fixture_weights(run / "drafter")
    assert not (run / "run.json").exists() and (run / "recipe.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["drafter"]  # the old ones were read
    steps = [(r["event"], r["step"]) for r in records(run)]
    assert steps == [("step", 1), ("step", 2), ("eval", 2), ("step", 3), ("step", 4), ("eval", 4), ("step", 5),
                     ("step", 6), ("eval", 6)]  # fmt: skip
    config = json.loads((run / "drafter" / "drafter.json").read_text())
    assert config["training"]["recipe"]["stages"][0]["kind"] == "drafter"


def test_a_drafter_stage_cut_by_ctrl_c_resumes_to_the_uninterrupted_drafter_bit_for_bit(legacy):
    """Today's drafter stage, interrupted between checkpoints and resumed on this machine, gives the drafter of
    its uninterrupted run exactly (the old run above pins only what rounding across CPU models allows)."""
    import os
    import signal

    from linspec.train.run import TrainingInterrupted, train

    train(load_recipe("recipe.yaml", ["output=straight"]))

    def interrupt(stage, step, loss):
        if step == 2:  # seen at the end of step 3, after the checkpoint of step 2
            os.kill(os.getpid(), signal.SIGINT)

    recipe = load_recipe("recipe.yaml", ["output=cut"])
    with pytest.raises(TrainingInterrupted, match="drafter step 3"):
        train(recipe, on_step=interrupt)
    train(recipe, resume=True)
    assert_same_weights(Path("cut/drafter"), Path("straight/drafter"))
    cut, straight = ([(r["step"], r["loss"]) for r in records(Path(run)) if r["event"] == "step"]
                     for run in ("cut", "straight"))  # fmt: skip
    assert cut == straight


def test_an_old_trained_drafter_loads_and_keeps_greedy_output_exact(legacy, capsys):
    args = ["generate", "base", "--prompt", "Tell me about the number 3.", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--draft", "medusa", "--drafter", "drafter", "--tree-width", "2"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["texts"] == plain["texts"] and drafted["stats"]["drafted"] > 0


def test_a_drafter_stage_after_model_stages_drafts_for_the_trained_model(tmp_path, monkeypatch):
    """One recipe: convert, train the model, then a drafter for it; the drafter loads against OUTPUT/model."""
    from linspec import load
    from linspec.drafting.store import load_drafter
    from linspec.train.run import train
    from linspec.train.tiny import make_tiny_base

    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))
    base = make_tiny_base(tmp_path / "base")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(6)))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"base: {base}\noutput: {tmp_path / 'run'}\n"
        "conversion: {preset: paper, group_size: 8, conv_taps: 4}\n"
        "data: {train: ['builtin:sample'], eval: null, eval_fraction: 0.25, seq_len: 32, max_eval_sequences: 4}\n"
        "eval: {baselines: false}\ncheckpoint: {every: 1}\n"
        "stages:\n"
        "  - {kind: attention_transfer, steps: 2, batch_size: 2}\n"
        "  - {kind: drafter, steps: 3, batch_size: 8, drafter: {kind: eagle, depth: 2, draft_vocab: 32,\n"
        f"     intermediate_size: 16, data: {{prompts: {prompts}, num_prompts: 4, eval_prompts: 2,\n"
        "     max_new_tokens: 4}}}\n"
    )
    recipe = load_recipe(recipe_file)
    assert [s.loss for s in recipe.stages] == ["mse", "draft"] and recipe.stages[1].micro_batch_size == 8
    assert train(recipe) == tmp_path / "run" / "model"
    model, _ = load(tmp_path / "run" / "model", device="cpu")
    drafter = load_drafter(tmp_path / "run" / "drafter", model)  # refused for any other target
    assert drafter.kind == "eagle" and drafter.max_depth == 2
    kinds = {r["stage"]: r.get("loss_name") for r in records(tmp_path / "run") if r["event"] == "step"}
    assert kinds == {"attention_transfer": "mse", "drafter": "draft"}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[{kind: drafter, drafter: {kind: medusa}}, {kind: full}]", "stages[0].kind: a drafter stage must be last"),
        ("[{kind: drafter}]", "stages[0].drafter: a drafter stage needs a drafter section"),
        ("[{kind: drafter, drafter: {}, lora: {r: 4}}]", "stages[0].lora: a drafter stage trains the drafter"),
        ("[{kind: drafter, drafter: {}, trainable: [all]}]", "stages[0].trainable: a drafter stage trains"),
        ("[{kind: drafter, drafter: {}, curriculum: [{seq_len: 8, steps: 100}]}]", "stages[0].curriculum"),
        ("[{kind: drafter, drafter: {}, loss: distill}]", "stages[0].loss: drafter trains with draft"),
        ("[{kind: full, drafter: {kind: medusa}}]", "stages[0].drafter: only a stage of kind drafter"),
        ("[{kind: full, loss: draft}]", "stages[0].loss: draft is for another stage kind"),
    ],
)
def test_drafter_stages_are_checked_before_any_work(tmp_path, stages, message):
    path = tmp_path / "r.yaml"
    conversion = "{}" if "kind: full" in stages else "null"  # null: the base as it is, for a drafter alone
    path.write_text(f"base: smollm2-135m\nconversion: {conversion}\nstages: {stages}\n")
    with pytest.raises(LinspecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(path)


def test_conversion_null_is_for_a_recipe_that_only_trains_a_drafter(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: smollm2-135m\nconversion: null\nstages: [{kind: lora, lora: {r: 4}}]\n")
    with pytest.raises(LinspecError, match="recipe key conversion: null keeps the base as it is"):
        load_recipe(path)
    path.write_text("base: smollm2-135m\nstages: [{kind: drafter, drafter: {kind: medusa}}]\n")
    with pytest.raises(LinspecError, match="set conversion: null"):
        load_recipe(path)


@pytest.mark.parametrize("name", DRAFTER_RECIPES)
def test_every_shipped_drafter_recipe_is_one_drafter_stage_named_after_its_kind(name):
    recipe = load_recipe(name)
    (stage,) = recipe.stages
    assert recipe.conversion is None and stage.kind == "drafter" and stage.drafter.kind == name.split("-")[0]
    text = shipped_recipes()[name].read_text()
    assert text.splitlines()[0] == f"# linspec train {name}"
    assert f"--drafter {recipe.output}/drafter" in text
    raw = yaml.safe_load(text)
    assert "drafter" not in raw  # the new form: the drafter settings sit in the stage
    assert dataclasses.asdict(load_recipe(name, ["base=smollm2-135m"])) == dataclasses.asdict(recipe)


def test_a_drafter_recipe_dry_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))
    assert main(["train", "redrafter-smollm2-135m", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("dry run passed: 1 stage(s) on a tiny model; drafter accuracy by depth: [")
    assert len(json.loads(out.rpartition("depth: ")[2])) == 5
