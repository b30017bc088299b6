"""What linspec wrote before drafter training was a stage of ``linspec train``, read in today's terms.

A drafter recipe of that format has a top-level ``drafter:`` (with ``target:``, ``data:``, ``train:``,
``checkpoint:``); it is translated into a recipe whose only stage is a drafter stage and whose base is used as it is.
Its run directory (``run.json``, ``checkpoints/step-N/`` with ``state.json`` + ``state.safetensors``, metrics rows
without an ``event``) is resumed: the rows are rewritten as stage records, and the newest checkpoint is read into
the drafter and its optimiser, which the drafter stage then saves as a checkpoint of today's format.

Nothing here imports the rest of the training package: the translation works on the plain YAML mapping, so the
recipe loader can use it without an import cycle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from linspec.errors import LinspecError
from linspec.utils.validation import check_count

RUN_FILE = "run.json"  # marked an old drafter run directory; it recorded the target and the recipe
STAGE = "drafter"  # the name of the drafter stage a translated recipe has
CHECKPOINT_FORMAT = {"format": "linspec-drafter-checkpoint", "version": 1}
_STEP_DIR = re.compile(r"step-(\d{1,12})")
_TOP = ("target", "output", "drafter", "data", "train", "checkpoint", "threads", "seed")
# Old key -> today's key. Sections move whole; the optimiser keys split over the stage's sections.
_TRAIN = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "grad_clip": "optimizer.grad_clip",
    "warmup_steps": "schedule.warmup_steps",
    "min_lr_ratio": "schedule.min_lr_ratio",
}
# Defaults of the old format where today's recipe has others.
_DEFAULTS = {"target": "smollm2-135m", "output": "runs/drafter", "threads": 1}
_TRAIN_DEFAULTS = {"steps": 400, "batch_size": 64, "warmup_steps": 20, "eval_every": 100}
_CHECKPOINT_DEFAULTS = {"every": 100, "keep": 2}
# Today's key (as errors name it) -> the old key, longest first, so errors name the key the user wrote.
_OLD_NAMES = sorted(
    {
        "base": "target",
        "stages[0].drafter.data": "data",
        "stages[0].drafter": "drafter",
        "eval.every": "train.eval_every",
        **{f"stages[0].{new}": f"train.{old}" for old, new in _TRAIN.items()},
    }.items(),
    key=lambda item: -len(item[0]),
)


def is_legacy_recipe(data: Any) -> bool:
    """Whether a recipe mapping is in the old drafter format (today's drafter settings sit inside a stage)."""
    return isinstance(data, dict) and "drafter" in data


def translate_recipe(data: dict) -> dict:
    """The old drafter recipe ``data`` as today's recipe mapping; types and ranges are left to the recipe check,
    whose errors ``old_key_names`` renames back."""
    for name in data:
        if name not in _TOP:
            raise LinspecError(f"recipe key {name!s:.80}: unknown key; known keys here: {', '.join(sorted(_TOP))}")
    sections = {}
    for name in ("drafter", "data", "train", "checkpoint"):
        section = data.get(name)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise LinspecError(f"recipe key {name}: expected a mapping, got {section!r:.60}")
        sections[name] = dict(section)
    if "data" in sections["drafter"]:
        raise LinspecError("recipe key drafter.data: unknown key; the self-distillation data is the data: section")
    train = {**_TRAIN_DEFAULTS, **sections["train"]}
    known = (*_TRAIN, "eval_every")
    for name in train:
        if name not in known:
            raise LinspecError(
                f"recipe key train.{name!s:.60}: unknown key; known keys here: {', '.join(sorted(known))}"
            )
    stage: dict[str, Any] = {"name": STAGE, "kind": "drafter", "schedule": {"name": "cosine"}}
    for old, new in _TRAIN.items():
        if old in train:
            section, _, key = new.rpartition(".")
            (stage.setdefault(section, {}) if section else stage)[key] = train[old]
    stage["drafter"] = {**sections["drafter"], "data": sections["data"]}
    top = {name: data.get(name, _DEFAULTS.get(name)) for name in ("target", "output", "threads", "seed")}
    translated = {
        "base": top["target"],
        "output": top["output"],
        "conversion": None,
        "stages": [stage],
        "eval": {"every": train["eval_every"], "baselines": False},
        "checkpoint": {**_CHECKPOINT_DEFAULTS, **sections["checkpoint"]},
        "threads": top["threads"],
    }
    if "seed" in data:
        translated["seed"] = data["seed"]
    return translated


def old_key_names(error: LinspecError) -> LinspecError:
    """``error`` with the keys of a translated recipe named as the old format named them."""

    def rename(match: re.Match) -> str:
        key = match.group(1)
        for new, old in _OLD_NAMES:
            if key == new or key.startswith((new + ".", new + "[")):
                return f"recipe key {old}{key[len(new) :]}"
        return match.group(0)

    return LinspecError(re.sub(r"recipe key ([\w.\[\]]+)", rename, str(error)))


def legacy_run(run_dir: Path) -> dict | None:
    """The recipe mapping an old drafter run in ``run_dir`` was started with (old format), or None when
    ``run_dir`` holds no such run; a damaged ``run.json`` is one error."""
    marker = Path(run_dir) / RUN_FILE
    if not marker.is_file():
        return None
    try:
        recipe = json.loads(marker.read_text(encoding="utf-8"))["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LinspecError(f"{marker} is damaged ({type(error).__name__}); start over with --force") from None
    if not isinstance(recipe, dict):
        raise LinspecError(f"{marker} is damaged (its recipe is not a mapping); start over with --force")
    return recipe


def stage_records(rows: list[dict]) -> list[dict]:
    """Old metrics rows (``{"step", "loss", "lr"}``, ``{"step", "eval_accuracy_by_depth"}``) as today's step and
    evaluation records of the drafter stage; rows that already are records are kept as they are."""
    records = []
    for row in rows:
        if "event" in row:
            records.append(row)
            continue
        if "loss" in row:
            records.append({"event": "step", "stage": STAGE, "step": row["step"], "loss": row["loss"],
                            "loss_name": "draft", "lr": row.get("lr")})  # fmt: skip
        if "eval_accuracy_by_depth" in row:
            records.append({"event": "eval", "stage": STAGE, "step": row["step"],
                            "accuracy_by_depth": row["eval_accuracy_by_depth"]})  # fmt: skip
    return records


def legacy_checkpoints(run_dir: Path) -> list[Path]:
    """The old checkpoints of ``run_dir`` (``checkpoints/step-N/`` with ``state.json``), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and not p.is_symlink()]
    return sorted((p for p in found if (p / "state.json").is_file()), key=lambda p: int(p.name.split("-")[1]))


def load_legacy_checkpoint(path: Path, module, optimizer, max_step: int) -> int:
    """Restore ``module`` and its AdamW ``optimizer`` from an old checkpoint; return its step. A damaged or edited
    checkpoint (wrong format, tensors of another shape, missing entries, a step outside the stage) is one
    ``LinspecError``; nothing is unpickled."""
    import torch
    from safetensors.torch import load_file

    from linspec.sources.loading import check_safetensors

    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LinspecError(f"checkpoint {path}: state.json is not valid JSON ({type(error).__name__})") from None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in CHECKPOINT_FORMAT.items()):
        raise LinspecError(f"checkpoint {path} is not a drafter checkpoint")
    check_safetensors(path / "state.safetensors")
    try:
        step = check_count(meta["step"], "step", 0, max_step)
        tensors = load_file(str(path / "state.safetensors"))
        module.load_state_dict({k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")})
        for index, param in enumerate(module.trainable_parameters()):
            if f"optimizer.{index}.exp_avg" not in tensors:
                continue
            moments = [tensors[f"optimizer.{index}.{name}"] for name in ("exp_avg", "exp_avg_sq")]
            if any(m.shape != param.shape for m in moments):
                raise ValueError(f"optimizer state {index} has another shape than its weight")
            steps = check_count(meta["adam_steps"][index], "adam_steps", 0, max_step)
            optimizer.state[param] = {"step": torch.tensor(float(steps)), "exp_avg": moments[0],
                                      "exp_avg_sq": moments[1]}  # fmt: skip
        return step
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, LinspecError) as error:
        problem = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise LinspecError(f"checkpoint {path} is damaged ({problem}); start over with --force") from None
