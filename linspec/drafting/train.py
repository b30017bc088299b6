"""``linspec train <drafter recipe>``: build the self-distillation data, train the drafter with the target
frozen, write OUTPUT/drafter.

Its own small loop — a drafter has a few million weights and one loss, so the model-training pipeline
(stages, LoRA, distributed) is not needed: AdamW, warm-up then cosine, a progress bar, held-out top-1 accuracy
per draft depth, atomic checkpoints (safetensors + JSON, never pickle) and exact resume (each step's batch is a
function of the seed and the step, so a resumed run draws the same batches).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from linspec.drafting.data import examples, positions, self_distillation_data
from linspec.drafting.fingerprint import mismatch, target_fingerprint
from linspec.drafting.recipe import DrafterRecipe
from linspec.drafting.store import build, save_drafter
from linspec.drafting.vocab import most_frequent_tokens
from linspec.errors import LinspecError
from linspec.train.recipe import MAX_STEPS
from linspec.utils.io import RUN_LOCK, atomic_directory, atomic_write_text, claim_run_dir, refuse_links, remove_entries
from linspec.utils.validation import check_count

RUN_FILE = "run.json"  # marks a drafter run directory (what --force may replace) and names its target
RUN_ENTRIES = (RUN_FILE, "checkpoints", "drafter", "metrics.jsonl")  # what a run writes: never symbolic links
CHECKPOINT_FORMAT = {"format": "linspec-drafter-checkpoint", "version": 1}


class DrafterTrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was written."""


def _prepare_output(recipe: DrafterRecipe, resume: bool, force: bool, fingerprint: dict) -> Path:
    output = Path(recipe.output)
    marker = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise LinspecError(f"recipe key output: {output} exists and is not a directory")
    refuse_links(output, RUN_ENTRIES)
    if resume:
        if not marker.is_file():
            raise LinspecError(f"{output} holds no drafter run to resume ({RUN_FILE} missing)")
        problem = mismatch(_run_target(marker), fingerprint)
        if problem:
            raise LinspecError(
                f"recipe key target: {recipe.target} is not the target of the run in {output}: {problem}"
            )
        claim_run_dir(output)
        return output
    if output.exists():
        if not force:
            raise LinspecError(f"{output} already exists; pass --resume to continue it or --force to start over")
        if any(p.name != RUN_LOCK for p in output.iterdir()) and not marker.is_file():
            raise LinspecError(f"{output} is not empty and holds no {RUN_FILE}; not replacing it even with --force")
    output.mkdir(parents=True, exist_ok=True)
    claim_run_dir(output)  # before anything is removed: a run in progress there keeps its files
    remove_entries(output, RUN_ENTRIES[1:])
    atomic_write_text(marker, json.dumps({"target": fingerprint, "recipe": asdict(recipe)}, indent=2) + "\n")
    return output


def _run_target(marker: Path) -> dict:
    """The target fingerprint a drafter run was started for, from its ``run.json``; a damaged file is one error."""
    try:
        target = json.loads(marker.read_text(encoding="utf-8"))["target"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LinspecError(f"{marker} is damaged ({type(error).__name__}); start over with --force") from None
    if not isinstance(target, dict):
        raise LinspecError(f"{marker} is damaged (its target is not a mapping); start over with --force")
    return target


def learning_rate(recipe: DrafterRecipe, step: int) -> float:
    opt = recipe.train
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, opt.steps - opt.warmup_steps)
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(output: Path, step: int, module, optimizer, keep: int) -> None:
    from safetensors.torch import save_file

    tensors = {f"module.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    counts = []
    for index, param in enumerate(module.trainable_parameters()):
        state = optimizer.state.get(param, {})
        counts.append(int(state["step"]) if "step" in state else 0)
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                tensors[f"optimizer.{index}.{name}"] = state[name].contiguous()
    folder = output / "checkpoints" / f"step-{step:07d}"
    with atomic_directory(folder, force=True, markers=("state.json",)) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**CHECKPOINT_FORMAT, "step": step, "adam_steps": counts}) + "\n")
    for old in _checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoints(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    found = [p for p in folder.glob("step-*") if not p.is_symlink() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def _load_checkpoint(path: Path, module, optimizer) -> int:
    """Restore ``module`` and ``optimizer`` from a checkpoint; return its step. A damaged or edited checkpoint
    (wrong format, tensors of another shape, missing entries, a step outside the run) is one ``LinspecError``."""
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
        tensors = load_file(str(path / "state.safetensors"))
        module.load_state_dict({k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")})
        for index, param in enumerate(module.trainable_parameters()):
            if f"optimizer.{index}.exp_avg" in tensors:
                moments = [tensors[f"optimizer.{index}.{name}"] for name in ("exp_avg", "exp_avg_sq")]
                if any(m.shape != param.shape for m in moments):
                    raise ValueError(f"optimizer state {index} has another shape than its weight")
                steps = check_count(meta["adam_steps"][index], "adam_steps", 0, MAX_STEPS)
                optimizer.state[param] = {"step": torch.tensor(float(steps)), "exp_avg": moments[0],
                                          "exp_avg_sq": moments[1]}  # fmt: skip
        return check_count(meta["step"], "step", 0, MAX_STEPS)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        problem = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise LinspecError(f"checkpoint {path} is damaged ({problem}); start over with --force") from None


@torch.no_grad()
def evaluate(module, data: dict, batch: int = 256) -> list[float]:
    """Held-out top-1 accuracy per draft depth on the target's continuations (depth 1 = first draft)."""
    tokens, hidden, labels = (data[f"eval_{name}"] for name in ("tokens", "hidden", "labels"))
    at = positions(tokens)
    hits = counted = 0
    for first in range(0, at.shape[0], batch):
        _, h, c = module.loss(*examples(tokens, hidden, labels, at[first : first + batch], module.max_depth))
        hits, counted = hits + h, counted + c
    return [round(float(h) / max(int(c), 1), 4) for h, c in zip(hits, counted, strict=True)]


def train_drafter(recipe: DrafterRecipe, resume: bool = False, force: bool = False) -> Path:
    """Run ``recipe``; returns the drafter directory (OUTPUT/drafter)."""
    from linspec.sources.loading import load_source

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    target, tokenizer = load_source(recipe.target)
    if tokenizer is None:
        raise LinspecError(f"recipe key target: {recipe.target} has no tokenizer to build prompts with")
    target.requires_grad_(False)
    fingerprint = target_fingerprint(target)
    output = _prepare_output(recipe, resume, force, fingerprint)
    from linspec.sources.demo_models import cache_root

    data = self_distillation_data(target, tokenizer, recipe.data, cache_root() / "drafting", fingerprint)
    spec = recipe.drafter
    vocab_size = target.get_output_embeddings().weight.shape[0]
    token_ids = None
    if spec.draft_vocab is not None:
        token_ids = most_frequent_tokens(data["train_labels"], vocab_size, min(spec.draft_vocab, vocab_size))
    settings = {"depth": spec.depth, "draft_vocab": None if token_ids is None else token_ids.numel()}
    if spec.kind == "eagle":
        settings["intermediate_size"] = spec.intermediate_size
    torch.manual_seed(recipe.seed)
    module = build(spec.kind, target, settings, token_ids).train()
    opt = recipe.train
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    start = 0
    if resume and _checkpoints(output):
        start = _load_checkpoint(_checkpoints(output)[-1], module, optimizer)
    train_at = positions(data["train_tokens"])
    metrics = output / "metrics.jsonl"
    bar = tqdm(total=opt.steps, initial=start, desc=f"train {spec.kind}", unit="step", dynamic_ncols=True)
    step = start
    try:
        for step in range(start, opt.steps):
            pick = torch.randint(train_at.shape[0], (opt.batch_size,),
                                 generator=torch.Generator().manual_seed(recipe.seed * 1_000_003 + step))  # fmt: skip
            batch = examples(
                data["train_tokens"], data["train_hidden"], data["train_labels"], train_at[pick], module.max_depth
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, step)
            loss, _, _ = module.loss(*batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), opt.grad_clip)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            row = {"step": step + 1, "loss": round(loss.item(), 5), "lr": learning_rate(recipe, step)}
            if opt.eval_every and (step + 1) % opt.eval_every == 0 and step + 1 < opt.steps:
                row["eval_accuracy_by_depth"] = evaluate(module.eval(), data)
                module.train()
            with metrics.open("a") as log:
                log.write(json.dumps(row) + "\n")
            if recipe.checkpoint.every and (step + 1) % recipe.checkpoint.every == 0:
                _save_checkpoint(output, step + 1, module, optimizer, recipe.checkpoint.keep)
    except KeyboardInterrupt:
        bar.close()
        _save_checkpoint(output, step, module, optimizer, recipe.checkpoint.keep)
        raise DrafterTrainingInterrupted(f"interrupted at step {step}; checkpoint written") from None
    bar.close()
    accuracy = evaluate(module.eval(), data)
    with metrics.open("a") as log:
        log.write(json.dumps({"step": opt.steps, "eval_accuracy_by_depth": accuracy}) + "\n")
    training = {"recipe": asdict(recipe), "eval_accuracy_by_depth": accuracy}
    return save_drafter(module, output / "drafter", target, tokenizer, training=training, force=True)
