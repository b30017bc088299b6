"""A training run that fails before it trains leaves its output as it found it: a run it was replacing
(``--force``) comes back whole, a directory it made is gone, and the same command runs again once the recipe is
fixed. A run that fails after training a step is kept, to be resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hostile_inputs import assert_refused, run_main

from linspec.train.recipe import load_recipe
from linspec.train.run import train
from linspec.train.rundir import DISCARDED

pytestmark = pytest.mark.usefixtures("private_cache")


def _old_run(run: Path) -> dict[str, bytes]:
    """A finished run's files (what ``--force`` would replace), by path relative to ``run``."""
    files = {
        "recipe.yaml": b"base: earlier\n",
        "metrics.jsonl": b'{"event": "step", "stage": "lora", "step": 1, "loss": 2.0}\n',
        "summary.json": b"{}\n",
        "model/config.json": b'{"model_type": "llama"}',
        "stages/lora/config.json": b"{}",
        "checkpoints/lora/step-0000001/state.safetensors": b"weights",
    }
    for name, data in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    return files


def _files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".linspec.lock"
    }


def _one_document(tmp_path: Path) -> str:
    (tmp_path / "one.txt").write_text("a single short document")
    return f"data.train=[{tmp_path / 'one.txt'}]"


def test_a_forced_run_that_fails_before_training_puts_the_old_run_back(world, tmp_path, capsys):
    run = tmp_path / "run"
    before = _old_run(run)
    argv = ["train", str(world.root / "recipe.yaml"), f"output={run}", _one_document(tmp_path), "--force"]
    code, _, err = run_main(argv, capsys)
    assert_refused(code, err, "too few to hold out")
    assert _files(run) == before
    assert not (run / DISCARDED).exists()


def test_a_fresh_run_that_fails_before_training_removes_the_directory_it_made(world, tmp_path, capsys):
    run = tmp_path / "runs" / "new"
    argv = ["train", str(world.root / "recipe.yaml"), f"output={run}", _one_document(tmp_path)]
    code, _, err = run_main(argv, capsys)
    assert_refused(code, err, "too few to hold out")
    assert not run.exists()
    code, _, err = run_main([*argv[:3], "--check"], capsys)  # fixed: nothing is in the way of the same output
    assert code == 0, err


def test_a_forced_run_that_fails_after_a_step_is_kept_and_the_old_run_is_gone(world, tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    recipe = load_recipe(world.root / "recipe.yaml", [f"output={run}"])

    def crash(stage, step, loss):
        raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        train(recipe, force=True, on_step=crash)
    assert not (run / DISCARDED).exists()
    assert not (run / "model").exists() and not (run / "summary.json").exists()  # the old run's
    assert (run / "checkpoints" / "attention_transfer").is_dir()  # the new run's, to resume
    assert '"event": "step"' in (run / "metrics.jsonl").read_text()
