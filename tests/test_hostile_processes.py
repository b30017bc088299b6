"""Interrupted runs and concurrent writers: what a killed process leaves, what a second writer gets, and how a run
resumes from a torn log, a damaged newest checkpoint, a changed recipe or a checkpoint that is a pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hostile_world import evil_pickle

from linspec.cli import main
from linspec.errors import LinspecError
from linspec.train.recipe import load_recipe
from linspec.train.run import TrainingInterrupted, train
from linspec.train.tiny import make_tiny_base
from linspec.utils.io import atomic_directory

HOLD_OUTPUT = textwrap.dedent(
    """
    import sys, time
    from linspec.utils.io import atomic_directory
    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "config.json").write_text("{}")
        print("ready", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(autouse=True)
def linspec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def writer(tmp_path):
    """A process inside ``atomic_directory(tmp_path / 'out')``, holding it until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_OUTPUT, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_second_writer_is_refused_while_the_first_is_writing(writer, tiny, tmp_path, capsys):
    code = main(["convert", str(tiny), str(tmp_path / "out"), "--group-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "being written by another process" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LinspecError, match="another process"), atomic_directory(tmp_path / "out", force=True):
        pass


def test_sigkill_leaves_no_output_and_the_next_writer_cleans_up(writer, tmp_path):
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = hidden(tmp_path)
    assert not (tmp_path / "out").exists() and any(name.endswith(".partial") for name in leftovers)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "out" / "config.json").is_file()
    assert hidden(tmp_path) == []  # the dead writer's partial directory and lock file are gone


def test_a_live_writers_temporaries_are_never_removed(writer, tmp_path):
    from linspec.utils.io import remove_stale_temporaries

    before = hidden(tmp_path)
    assert remove_stale_temporaries(tmp_path / "out") == [] and hidden(tmp_path) == before


def test_killed_between_the_two_renames_the_previous_output_comes_back(tmp_path):
    from linspec.utils.io import _HOST

    aside = tmp_path / f".out.{_HOST}-{2**22 + 12345}.abc123.old" / "previous"
    aside.mkdir(parents=True)
    (aside / "config.json").write_text('{"old": true}')
    with pytest.raises(LinspecError, match="already exists"), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"old": True}
    assert hidden(tmp_path) == []


def test_an_output_that_appears_while_writing_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LinspecError, match="already exists"), atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("mine")
        out.mkdir()
        (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs" and hidden(tmp_path) == []


def recipe_path(tmp_path: Path, tiny: Path, steps: int = 4) -> Path:
    data = {
        "base": str(tiny),
        "output": str(tmp_path / "run"),
        "conversion": {"group_size": 8, "conv_taps": 4},
        "data": {"train": ["builtin:sample"], "eval": None, "eval_fraction": 0.25, "seq_len": 32},
        "eval": {"baselines": False},
        "checkpoint": {"every": 1, "keep": 3},
        "stages": [{"kind": "attention_transfer", "steps": steps, "batch_size": 2, "optimizer": {"lr": 0.05}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def interrupted_run(tmp_path: Path, tiny: Path, at_step: int = 3) -> Path:
    """A run stopped by Ctrl-C after ``at_step`` (checkpoints at every step up to it)."""

    def interrupt(stage, step, loss):
        if step == at_step - 1:  # seen at the end of step ``at_step``, where the run saves and stops
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(load_recipe(recipe_path(tmp_path, tiny)), on_step=interrupt)
    return tmp_path / "run"


def steps_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"event": "step"' in line]


def test_resume_after_a_torn_metrics_line(tmp_path, tiny):
    run = interrupted_run(tmp_path, tiny)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"event": "step", "sta')
    train(load_recipe(recipe_path(tmp_path, tiny)), resume=True)
    assert steps_logged(run) == [1, 2, 3, 4]


def test_resume_skips_a_truncated_newest_checkpoint_for_an_older_good_one(tmp_path, tiny, capsys):
    run = interrupted_run(tmp_path, tiny)
    newest = run / "checkpoints" / "attention_transfer" / "step-0000003" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    train(load_recipe(recipe_path(tmp_path, tiny)), resume=True)
    out = capsys.readouterr().out
    assert "skipping" in out and "step-0000003" in out and "resuming at step 2" in out
    assert steps_logged(run) == [1, 2, 3, 4]


def test_resume_refuses_a_changed_recipe_and_keeps_the_stored_one(tmp_path, tiny):
    run = interrupted_run(tmp_path, tiny)
    stored = (run / "recipe.yaml").read_text()
    with pytest.raises(LinspecError, match=r"differs from the one .* \(stages.0.optimizer.lr\)"):
        train(load_recipe(recipe_path(tmp_path, tiny), ["stages.0.optimizer.lr=0.5"]), resume=True)
    assert (run / "recipe.yaml").read_text() == stored
    train(load_recipe(recipe_path(tmp_path, tiny), ["threads=1"]), resume=True)  # how it runs may change


def test_resume_never_unpickles_an_old_or_crafted_checkpoint(tmp_path, tiny):
    run = interrupted_run(tmp_path, tiny)
    canary = tmp_path / "pwned"
    for step_dir in (run / "checkpoints" / "attention_transfer").iterdir():
        for name in ("state.json", "state.safetensors"):
            (step_dir / name).unlink()
        (step_dir / "state.pt").write_bytes(evil_pickle(canary))
    with pytest.raises(LinspecError, match=r"no usable checkpoint.*never loads"):
        train(load_recipe(recipe_path(tmp_path, tiny)), resume=True)
    assert not canary.exists()


def test_resume_refuses_a_checkpoint_of_other_trainable_tensors(tmp_path, tiny):
    run = interrupted_run(tmp_path, tiny, at_step=2)
    for step_dir in (run / "checkpoints" / "attention_transfer").iterdir():  # a well-formed foreign checkpoint
        skeleton = json.loads((step_dir / "state.json").read_text())
        skeleton["trainable"] = {f"other.{name}": ref for name, ref in skeleton["trainable"].items()}
        (step_dir / "state.json").write_text(json.dumps(skeleton))
    with pytest.raises(LinspecError, match="other trainable tensors"):
        train(load_recipe(recipe_path(tmp_path, tiny)), resume=True)


def test_ctrl_c_in_a_real_process_exits_130_and_resumes(tmp_path, tiny):
    path = recipe_path(tmp_path, tiny, steps=400)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "linspec", "train", str(path), "checkpoint.every=0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    for line in process.stdout:  # "linspec train: data: ..." comes before the first step
        if line.startswith("linspec train: data"):
            break
    while not metrics.exists() or '"step"' not in metrics.read_text():
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "continue with:" in err and not (tmp_path / "run" / "model").exists()
    checkpoints = list((tmp_path / "run" / "checkpoints" / "attention_transfer").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "meta.json").is_file()
    assert hidden(tmp_path / "run" / "checkpoints" / "attention_transfer") == []


CLAIM_RUN = textwrap.dedent(
    """
    import sys, time
    from linspec.utils.io import claim_run_dir
    claim_run_dir(sys.argv[1])
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_an_output_written_by_another_process_after_the_check_is_not_replaced(tiny, tmp_path):
    """Two ``convert --force`` into one directory: the one that checked first but writes last is refused."""
    from linspec.utils.io import check_output_dir

    out = tmp_path / "out"
    check_output_dir(out, force=True)  # this run checks, then spends minutes loading and converting
    other = subprocess.run(
        [sys.executable, "-m", "linspec", "convert", str(tiny), str(out), "--group-size", "8", "--force"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert other.returncode == 0, other.stderr
    theirs = (out / "config.json").read_bytes()
    with pytest.raises(LinspecError, match="written by another process"), atomic_directory(out, force=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_bytes() == theirs and hidden(tmp_path) == []


def test_a_run_directory_in_use_is_neither_emptied_nor_written(tiny, tmp_path, capsys):
    path = recipe_path(tmp_path, tiny)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("the other run's recipe\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "keep.txt").write_text("theirs")
    holder = subprocess.Popen([sys.executable, "-c", CLAIM_RUN, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        code = main(["train", str(path), "--force"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "in use by another linspec run" in err[-1], err
        assert (run / "checkpoints" / "keep.txt").read_text() == "theirs"
        assert (run / "recipe.yaml").read_text() == "the other run's recipe\n"
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(path), "--force"]) == 0  # the holder is gone: the lock went with it
    assert (run / "model" / "config.json").is_file() and not (run / "checkpoints" / "keep.txt").exists()


def test_recipes_cp_never_writes_through_a_planted_temporary(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / ".mine.yaml.partial").symlink_to(precious)  # the name the old copy wrote through
    assert main(["recipes", "cp", "smollm2-135m-demo", str(tmp_path / "mine.yaml")]) == 0
    assert precious.read_text() == "keep me" and "base:" in (tmp_path / "mine.yaml").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".partial")) and not p.is_symlink()]
