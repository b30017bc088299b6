"""``train(recipe)``: base checkpoint -> data -> conversion -> stages -> a linspec model directory, and a drafter
for it when the last stage is a drafter stage (``conversion: null``: a drafter for the base as it is). Read top to
bottom; each stage kind is a module of ``linspec/train/stages/`` and they share one loop (``loop.py``).

The run directory's layout is in ``rundir.py``; distributed runs (torchrun, DDP/FSDP2) in ``distributed.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from linspec.data.documents import TrainingSet, pack, split_documents
from linspec.errors import LinspecError
from linspec.train.cards import training_card
from linspec.train.distributed import DTYPES, Env, is_sharded, setup_env, unshard
from linspec.train.evaluation import CURVE_KEYS, record_curve, record_final_curves
from linspec.train.loop import TrainingDiverged, TrainingInterrupted, TrainingRun, lr_factor
from linspec.train.recipe import Recipe, Stage, build_recipe, validate
from linspec.train.rundir import RECIPE_FILE, adopt_legacy_drafter_run, prepare_run_dir, settle_run_dir
from linspec.train.stages import STAGE_KINDS
from linspec.train.stages import drafter as drafter_stage
from linspec.train.state import MetricsLog
from linspec.utils.io import atomic_directory, atomic_write_text
from linspec.utils.paths import child_path

__all__ = ["TrainingDiverged", "TrainingInterrupted", "lr_factor", "train"]


def train(recipe: Recipe, *, resume: bool = False, force: bool = False, on_step=None) -> Path:
    """Run every stage of ``recipe``; returns ``OUTPUT/model`` (``OUTPUT/drafter`` when the recipe only trains a
    drafter). ``on_step(stage, step, loss)`` is for tests."""
    started = time.perf_counter()
    if resume and force:
        raise LinspecError("--resume continues a run and --force discards it; pass one of them")
    recipe = checked(recipe)
    env = setup_env(recipe)
    run_dir = Path(recipe.output)
    if resume:
        adopt_legacy_drafter_run(run_dir)
    made = prepare_run_dir(run_dir, resume, force, env, recipe)
    try:
        result = _run(recipe, env, run_dir, resume, on_step, started)
    except BaseException:
        if env.main and not resume:
            settle_run_dir(run_dir, made, succeeded=False)
        raise
    if env.main:
        settle_run_dir(run_dir, made, succeeded=True)
    return result


def checked(recipe: Recipe) -> Recipe:
    """``recipe`` with every check ``load_recipe`` makes: a ``Recipe`` built or changed in Python (it is a plain
    dataclass) would otherwise run unchecked — negative steps train nothing and still write a model."""
    if not isinstance(recipe, Recipe):
        raise LinspecError(f"train(recipe): a Recipe (linspec.train.load_recipe), got {type(recipe).__name__}")
    return validate(build_recipe(dataclasses.asdict(recipe)))


def _run(recipe: Recipe, env: Env, run_dir: Path, resume: bool, on_step, started: float) -> Path:
    """``train``'s work in a prepared run directory."""
    if env.main and not (run_dir / RECIPE_FILE).exists():
        atomic_write_text(run_dir / RECIPE_FILE, yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=env.main)
    log.repair()
    weights_dtype = DTYPES[recipe.precision] if recipe.distributed != "fsdp" else torch.float32

    from linspec.sources.loading import load_source

    base, tokenizer = load_source(recipe.base, dtype=weights_dtype, progress=env.main)
    if tokenizer is None:
        raise LinspecError(f"recipe key base: {recipe.base} has no tokenizer")
    model_stages = [stage for stage in recipe.stages if stage.kind != "drafter"]
    ctx = TrainingRun(recipe, env, log, None, None, None, resume, on_step, tokenizer)
    model = base if recipe.conversion is None else convert_base(ctx, base, tokenizer, weights_dtype)

    for index, stage in enumerate(recipe.stages):
        stage_dir = child_path(run_dir / "stages", stage.name, f"recipe key stages[{index}].name")
        if resume and finished(stage_dir, stage, log):
            if stage.kind != "drafter":
                model = load_stage(stage_dir, weights_dtype)
            ctx.say(f"stage {stage.name}: already finished, loaded {stage_dir}")
            continue
        if stage.kind == "drafter":  # a drafter for the model so far; the model itself is left as it is
            model = drafter_stage.run(ctx, index, stage, model, stage_dir)
            log.plot(run_dir / "loss.png")
            continue
        model = STAGE_KINDS[stage.kind](ctx, index, stage, model)
        keep_adapter = stage is model_stages[-1] and not recipe.merge_lora and stage.lora is not None
        model = save_stage(model, tokenizer, stage_dir, weights_dtype, env, keep_adapter)
        log.plot(run_dir / "loss.png")

    if env.main:
        if model_stages:
            record_final_curves(ctx, model)
        summary = write_summary(run_dir, log, time.perf_counter() - started)
        if model_stages:
            last_dir = child_path(run_dir / "stages", model_stages[-1].name, "stage name")
            with atomic_directory(run_dir / "model", force=True) as tmp:
                shutil.copytree(last_dir, tmp, dirs_exist_ok=True)
                training_card(recipe, model, summary).write(tmp)
    env.barrier()
    return run_dir / ("model" if model_stages else "drafter")


def convert_base(ctx: TrainingRun, base, tokenizer, weights_dtype: torch.dtype):
    """The data, the teacher and the baselines the model stages need, then the converted model."""
    from linspec.conversion.convert import convert

    recipe, env, log = ctx.recipe, ctx.env, ctx.log
    if env.main:  # build the datasets cache (and the chat answers) once, then every process reads them
        training, eval_seqs = build_data(recipe, base, tokenizer, env)
    env.barrier()
    if not env.main:
        training, eval_seqs = build_data(recipe, base, tokenizer, env)
    ctx.training, ctx.eval_seqs = training, eval_seqs[: recipe.eval.max_sequences or len(eval_seqs)]
    text, chat = training.prepare(recipe.data.seq_len)
    if any(stage.loss == "distill" for stage in recipe.stages):
        from linspec.sources.loading import load_source

        teacher, _ = load_source(recipe.base, dtype=weights_dtype, progress=False)
        ctx.teacher = teacher.to(env.device).eval().requires_grad_(False)
    chat_part = f" + {len(chat)} chat" if chat is not None else ""
    recall = recipe.data.recall
    recall_part = f" ({recall.ratio:.0%} of the stream made recall sequences)" if recall is not None else ""
    ctx.say(
        f"data: {len(text)} training{chat_part} and {len(ctx.eval_seqs)} held-out sequences of {recipe.data.seq_len}"
        f"{recall_part}",
    )

    done = {r["stage"] for r in log.records() if r.get("event") == "eval"}
    if recipe.eval.baselines and "original" not in done:
        ctx.evaluate(base.to(env.device), "original")
    if recipe.eval.baselines and "original" not in {r["stage"] for r in log.records() if r.get("event") == "curve"}:
        record_curve(ctx, base.to(env.device), "original")
    settings = recipe.conversion.settings()
    auto = recipe.conversion.auto_layers()
    if auto is not None:  # deterministic: every process measures the same layers on the same sequences
        from linspec.conversion.softmax_layers import resolve_softmax_layers

        settings = resolve_softmax_layers(base.to(env.device), settings, auto, ctx.eval_seqs[:8], progress=env.main)
        ctx.say(f"conversion.softmax_layers {auto}: keeping layers {list(settings.softmax_layers)} softmax")
    model = convert(base, settings)
    if recipe.eval.baselines and "converted" not in done:
        ctx.evaluate(model.to(env.device), "converted")
    return model


def finished(stage_dir: Path, stage: Stage, log: MetricsLog) -> bool:
    """Whether a resumed run has this stage done: its result is written and its steps are all logged (a last
    stage whose ``steps`` grew on ``--resume`` trains on from its newest checkpoint)."""
    marker = stage_dir / ("drafter.json" if stage.kind == "drafter" else "config.json")
    steps = [r["step"] for r in log.records() if r.get("event") == "step" and r.get("stage") == stage.name]
    return marker.is_file() and max(steps, default=0) >= stage.steps


def build_data(recipe: Recipe, base, tokenizer, env: Env) -> tuple[TrainingSet, torch.Tensor]:
    """The training set, packed at every length the stages use, and the held-out sequences (``data.seq_len``).
    Chat data is answered by ``base``, the original model, before it is converted."""
    import datasets

    documents, eval_documents = split_documents(recipe.data)
    chat_documents = None
    if recipe.data.chat is not None:
        from linspec.data.chat import conversations

        texts = conversations(recipe.data.chat, recipe.base, base.to(env.device), tokenizer, progress=env.main)
        chat_documents = datasets.Dataset.from_dict({"text": texts})
    training = TrainingSet(documents, tokenizer, recipe.data, chat_documents)
    for stage in recipe.stages:
        for seq_len in stage.seq_lens(recipe.data.seq_len):
            training.prepare(seq_len)
    return training, pack(eval_documents, tokenizer, recipe.data.seq_len, recipe.data.max_eval_sequences)


def load_stage(stage_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stage_dir, dtype=dtype)


def save_stage(model, tokenizer, stage_dir: Path, dtype: torch.dtype, env: Env, keep_adapter: bool):
    """Write the stage's model (LoRA merged, or kept as ``adapter/``); return the plain linspec model.

    Every process gets the same plain model back, so the next stage can wrap (or shard) it again; only the main
    process writes. The adapter is saved before ``unload()``, which takes the LoRA layers out of it.
    """
    if is_sharded(model):
        model = unshard(model)
    writing = atomic_directory(stage_dir, force=True) if env.main else contextlib.nullcontext()
    with writing as tmp:
        if hasattr(model, "peft_config"):
            if keep_adapter:
                if tmp is not None:
                    model.save_pretrained(tmp / "adapter")
                model = model.unload()  # base weights without the adapter, saved beside it
            else:
                model = model.merge_and_unload()
        model = model.to(dtype)
        if tmp is not None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    env.barrier()
    return model


def write_summary(run_dir: Path, log: MetricsLog, run_seconds: float) -> dict:
    """``summary.json``: held-out perplexity of every phase (original, converted, each stage), a drafter stage's
    held-out accuracy by draft depth, and training time.

    A stage's time adds up its steps across sessions: ``elapsed_s`` restarts at each resume.
    """
    ppl: dict = {}
    accuracy: dict = {}
    curve: dict = {}
    seconds: dict = {}
    previous: dict = {}
    for record in log.records():
        if record.get("event") == "eval" and "accuracy_by_depth" in record:  # a drafter stage's evaluation
            accuracy[record["stage"]] = record["accuracy_by_depth"]
        elif record.get("event") == "eval":
            ppl[record["stage"]] = record["ppl"]  # a stage's final evaluation overwrites earlier ones
        elif record.get("event") == "curve":
            curve[record["stage"]] = {key: record[key] for key in CURVE_KEYS}
        elif record.get("event") == "step" and "elapsed_s" in record:  # (steps of an old drafter run have none)
            stage, elapsed = record["stage"], record["elapsed_s"]
            last = previous.get(stage, 0.0)
            seconds[stage] = seconds.get(stage, 0.0) + (elapsed - last if elapsed >= last else elapsed)
            previous[stage] = elapsed
    summary = {"ppl": ppl, "curve": curve, "train_seconds": seconds, "run_seconds": run_seconds}
    if accuracy:
        summary["accuracy_by_depth"] = accuracy
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
