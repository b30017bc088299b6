"""The run directory: what may be in it before a run, and the check that a resumed run keeps its recipe.

Layout of ``recipe.output``::

    recipe.yaml          the resolved recipe of the run
    metrics.jsonl        one line per step ({"event": "step", ...}) and per evaluation ({"event": "eval", ...})
    loss.png             loss curve per stage
    checkpoints/<stage>/step-<n>/   resumable state (atomic; the newest ``checkpoint.keep`` are kept)
    stages/<stage>/      the model after each finished stage (a linspec model dir, LoRA merged), or its drafter
    model/               the final model (LoRA merged unless merge_lora: false, then model/adapter holds it)
    drafter/             the drafter of a drafter stage (drafter.json, drafter.safetensors, README.md)
    summary.json         held-out perplexity of every phase and the training time
    .discarded-run/      with ``--force``, the run being replaced, until the new run ends

A run that fails before its first training step leaves the directory as it found it: what it wrote is removed, a
run it was replacing (``--force``) is put back, and a directory it made is removed, so fixing the recipe and
running the same command again just works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import yaml

from linspec.errors import LinspecError
from linspec.train.distributed import Env
from linspec.train.legacy_drafter import RUN_FILE as LEGACY_RUN_FILE
from linspec.train.legacy_drafter import legacy_run, stage_records, translate_recipe
from linspec.train.recipe import Recipe, build_recipe, validate
from linspec.train.state import MetricsLog
from linspec.utils.io import RUN_LOCK, atomic_write_text, claim_run_dir, refuse_links, release_run_dir, remove_entries
from linspec.utils.paths import refuse_output_over_source

RECIPE_FILE = "recipe.yaml"
RUN_FILES = (
    "checkpoints", "stages", "model", "drafter", "metrics.jsonl", "loss.png", "summary.json", RECIPE_FILE,
    LEGACY_RUN_FILE,
)  # fmt: skip
# Keys that may change when a run resumes: where it lives, how it runs and how often it saves, or how its
# result is written; not what it computes. The last stage's ``steps`` may also grow: the run is extended.
RESUMABLE_CHANGES = ("output", "threads", "device", "checkpoint", "merge_lora")
DISCARDED = ".discarded-run"  # a forced run's predecessor, kept until the new run ends (``settle_run_dir``)
SAVED = ("checkpoints", "stages", "model", "drafter")  # what a run saves that makes it worth keeping


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, env: Env, recipe: Recipe) -> bool:
    """Check the output before any work: a fresh or empty directory, a run to resume with the same recipe, or
    (with ``force``) a run to replace, which is set aside (``DISCARDED``) rather than deleted. A directory that
    holds other files is never written into or emptied. Returns whether the directory is new (``settle_run_dir``
    removes it again after a run that failed before training)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LinspecError(f"recipe key output: {run_dir} exists and is not a directory")
    refuse_output_over_source(run_dir, recipe.base, "recipe key output")
    refuse_links(run_dir, (*RUN_FILES, DISCARDED))  # a planted link would have the run write, or delete, outside it
    made = not run_dir.exists()
    has_run = any((run_dir / name).exists() for name in (RECIPE_FILE, "metrics.jsonl", LEGACY_RUN_FILE))
    foreign = [] if has_run or not run_dir.is_dir() else _foreign_entries(run_dir)
    if foreign:
        raise LinspecError(
            f"recipe key output: {run_dir} holds files that are not a linspec run ({foreign[0]}); choose an empty "
            "or new directory"
        )
    if has_run and not (resume or force):
        raise LinspecError(f"{run_dir} already holds a run; pass --resume to continue it or --force to start over")
    if resume and has_run:
        check_same_recipe(run_dir / RECIPE_FILE, recipe)
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        claim_run_dir(run_dir)  # before anything is removed: a run in progress there keeps its files
    if force and not resume and env.main:
        _set_aside(run_dir)
    env.barrier()
    run_dir.mkdir(parents=True, exist_ok=True)
    return made


def _foreign_entries(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` (which holds no run: no recipe, metrics or legacy run file) that a run would write
    over or beside: anything but the lock, a forced run's leftovers and empty folders of a run's names. A
    ``model/`` holding a model there is the user's, not a run's, and a run would replace it."""
    ignored = (RUN_LOCK, DISCARDED)
    return sorted(
        entry.name
        for entry in run_dir.iterdir()
        if entry.name not in ignored
        and not (entry.name in RUN_FILES and entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir()))
    )


def _set_aside(run_dir: Path) -> None:
    """Move the run in ``run_dir`` into ``run_dir/DISCARDED`` (renames; the leftover of an earlier forced run
    that never finished settling is deleted first)."""
    aside = run_dir / DISCARDED
    if aside.exists():
        shutil.rmtree(aside)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present:
        aside.mkdir()
        for name in present:
            os.replace(run_dir / name, aside / name)


def settle_run_dir(run_dir: Path, made: bool, succeeded: bool) -> None:
    """After a run (main process; not after a resumed one): a run that succeeded or trained at least one step
    stays and the run it replaced is deleted; one that failed before that is undone — its files removed, the
    replaced run moved back, and the directory removed when it ``made`` it."""
    aside = run_dir / DISCARDED
    try:
        stepped = any(r.get("event") == "step" for r in MetricsLog(run_dir / "metrics.jsonl").records())
    except (LinspecError, OSError):  # a log it cannot read is left for the user to look at
        stepped = True
    trained = stepped or any((run_dir / name).exists() for name in SAVED)
    if succeeded or trained:
        if aside.is_dir():
            shutil.rmtree(aside)
        return
    remove_entries(run_dir, RUN_FILES)
    if aside.is_dir():
        for entry in aside.iterdir():
            os.replace(entry, run_dir / entry.name)
        aside.rmdir()
    elif made:
        release_run_dir(run_dir)
        (run_dir / RUN_LOCK).unlink(missing_ok=True)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()


def check_same_recipe(path: Path, recipe: Recipe) -> None:
    """Refuse to resume a run under a recipe that differs from the one it started with (but for
    ``RESUMABLE_CHANGES``): the checkpoints, metrics and finished stages belong to that recipe."""
    if not path.is_file():
        raise LinspecError(f"{path.parent} holds no {RECIPE_FILE}, so it cannot be resumed; start over with --force")
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise LinspecError(f"{path} is damaged ({type(error).__name__}); start over with --force") from None
    stored = _with_defaults(stored)
    current = _plain(recipe)
    changed = [key for key in _differences(stored, current) if key.split(".")[0] not in RESUMABLE_CHANGES]
    extended = f"stages.{len(recipe.stages) - 1}.steps"
    if extended in changed and _stage_steps(stored, len(recipe.stages) - 1) <= recipe.stages[-1].steps:
        changed.remove(extended)
    if "base" in changed:
        stored_base = stored.get("base") if isinstance(stored, dict) else None
        raise LinspecError(
            f"recipe key base: {recipe.base} is not the target of the run in {path.parent}, which started from "
            f"{stored_base}; resume with the same base, or start over with --force"
        )
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise LinspecError(
            f"the recipe differs from the one {path.parent} was started with ({shown}); resume with the same "
            "recipe, or start over with --force"
        )


def _plain(recipe: Recipe):
    """A recipe as the plain YAML structure ``recipe.yaml`` holds."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))


def _with_defaults(stored):
    """A stored recipe with the keys added since it was written set to their defaults: a run started before a
    key existed computed what that key's default computes, so resuming it under the default is no change (and
    under any other value is). A stored recipe that no longer builds is compared as it is."""
    if not isinstance(stored, dict):
        return stored
    try:
        return _plain(build_recipe(stored))
    except LinspecError:
        return stored


def _stage_steps(stored, index: int) -> int:
    """``stages[index].steps`` of a stored recipe, or a number no stage reaches when it has none."""
    try:
        steps = stored["stages"][index]["steps"]
    except (KeyError, IndexError, TypeError):
        return 1 << 62
    return steps if isinstance(steps, int) else 1 << 62


def adopt_legacy_drafter_run(run_dir: Path) -> None:
    """A drafter run directory written before drafter training was a stage (``run.json``), rewritten in place for
    ``--resume``: its recipe, translated, becomes ``recipe.yaml`` (which the resumed recipe must then match like any
    other) and its metrics rows become the drafter stage's records. Its checkpoints are read by the drafter stage
    (``linspec.train.stages.drafter``). Each step is atomic and the last removes ``run.json``, so a crash between
    them leaves a run this reads again."""
    old = legacy_run(run_dir)
    if old is None or (run_dir / RECIPE_FILE).exists():
        return
    try:
        recipe = validate(build_recipe(translate_recipe(old)))
    except LinspecError as error:
        raise LinspecError(f"{run_dir / LEGACY_RUN_FILE}: its recipe does not load ({error})") from None
    log = MetricsLog(run_dir / "metrics.jsonl")
    log.repair()
    rows = log.records()
    atomic_write_text(log.path, "".join(json.dumps(r) + "\n" for r in stage_records(rows)))
    atomic_write_text(run_dir / RECIPE_FILE, yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    (run_dir / LEGACY_RUN_FILE).unlink()


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain YAML structures."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".") or "(whole recipe)"]
