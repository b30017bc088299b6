"""The optimiser loop every stage kind shares: batches by step, gradient accumulation, clipping, the NaN stop,
Ctrl-C, checkpoints and exact resume, metrics, the progress bar and mid-stage evaluation.

A stage kind (``linspec/train/stages/``) prepares its model and hands the loop an ``Objective``: the loss of a
micro batch and the few things that differ between kinds (a drafter's batch is positions of its own data, and it
is evaluated by its accuracy, not by perplexity). Everything about *how* steps run lives here once.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from linspec.data.documents import TrainingSet
from linspec.errors import LinspecError
from linspec.train.distributed import DTYPES, Env
from linspec.train.evaluation import evaluate
from linspec.train.recipe import Phase, Recipe, Stage
from linspec.train.state import MetricsLog, checkpoint_dirs, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class TrainingDiverged(LinspecError):
    """The loss or the gradient norm became NaN/inf; the step was not applied."""


class TrainingInterrupted(LinspecError):
    """Ctrl-C: the run saved a checkpoint at a step boundary and stopped."""


@dataclass
class TrainingRun:
    """What every stage of a run shares: the recipe, the processes, the log, the data, the teacher."""

    recipe: Recipe
    env: Env
    log: MetricsLog
    training: TrainingSet
    eval_seqs: torch.Tensor  # (M, data.seq_len) held-out sequences
    teacher: torch.nn.Module | None  # the original model, for distillation
    resume: bool
    on_step: Callable[[str, int, float], None] | None = None  # tests: (stage, step, loss) after every step
    tokenizer: Any = None  # the base's tokenizer (a drafter stage builds its prompts with it)

    def say(self, message: str) -> None:
        if self.env.main:
            print(f"linspec train: {message}", flush=True)

    def evaluate(self, forward, stage: str, step: int = 0) -> float:
        """Held-out perplexity, logged as an ``eval`` record and printed."""
        recipe = self.recipe
        ppl, tokens, seconds = evaluate(forward, self.eval_seqs, self.env, recipe.precision, recipe.stages[0])
        self.log.write(event="eval", stage=stage, step=step, ppl=ppl, tokens=tokens, seconds=seconds)
        self.say(f"held-out perplexity ({stage}, step {step}): {ppl:.2f}")
        return ppl


class Objective:
    """What a stage kind trains against. ``loss`` is required; the rest default to training on the run's text
    sequences and measuring held-out perplexity."""

    def loss(self, forward, batch: torch.Tensor) -> torch.Tensor:
        """The loss of one micro batch (rows of ``batch``), already averaged over it."""
        raise NotImplementedError

    def batch(self, ctx: TrainingRun, stage: Stage, step: int, phase: Phase) -> torch.Tensor:
        """The whole batch of optimiser step ``step`` (0-based; every process gets the same and takes its rows):
        a function of the step alone, so a resumed run trains on what an uninterrupted one would."""
        return ctx.training.batch(step, stage.batch_size, phase.seq_len)  # (batch_size, seq_len)

    def tokens(self, batch: torch.Tensor) -> int:
        """Tokens a batch trains on (``tokens_per_s`` in the metrics)."""
        return batch.numel()

    def evaluate(self, ctx: TrainingRun, forward, stage: str, step: int) -> None:
        """Measure the model mid-stage and at the end of the stage (held-out perplexity)."""
        with self.evaluating():
            ctx.evaluate(forward, stage, step)

    def enter_phase(self, phase: Phase | None) -> None:
        """Called before every step with its curriculum phase, and with None when the stage ends."""

    def step_metrics(self) -> dict:
        """Extra fields for the step's line in ``metrics.jsonl``."""
        return {}

    def evaluating(self) -> contextlib.AbstractContextManager:
        """The context mid-stage evaluation runs in (attention transfer turns its hooks off)."""
        return contextlib.nullcontext()


def parameter_groups(model: torch.nn.Module, stage: Stage) -> list[dict]:
    """The model's trainable parameters as AdamW groups: one, or with ``optimizer.memory_bias_lr`` the far
    memory's biases ``b_h`` and distance exponents ``α_h`` in a group of their own (both set the column's logit, in
    nats, and have to move nats where a map's entries move little)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    bias_lr = stage.optimizer.memory_bias_lr
    if bias_lr is None:
        return [{"params": [p for _, p in named]}]
    logit_terms = ("memory_bias", "memory_distance_exponent")
    biases = [p for name, p in named if name.endswith(logit_terms)]
    rest = [p for name, p in named if not name.endswith(logit_terms)]
    return [group for group in ({"params": rest}, {"params": biases, "lr": bias_lr}) if group["params"]]


def make_optimizer(stage: Stage, parameters: list[torch.nn.Parameter] | list[dict]):
    """``(AdamW, its LambdaLR schedule)`` over ``parameters`` (or parameter groups, each with an lr of its own
    or the stage's) with the stage's settings; the schedule scales every group's peak lr alike."""
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(
        parameters, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))


def lr_factor(step: int, stage: Stage) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up, then the schedule."""
    schedule = stage.schedule
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.name == "constant":
        return 1.0
    progress = (step - schedule.warmup_steps) / max(1, stage.steps - schedule.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.name == "cosine" else 1 - progress
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape


class StopFlag:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: keep the default behaviour
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Checkpoints:
    """Saving and restoring a stage's resumable state: its trainable tensors, the optimiser, the scheduler and
    every process's RNG. Whole tensors (gathered under FSDP), so a checkpoint resumes under any wrapping."""

    def __init__(self, ctx: TrainingRun, stage: Stage, model, optimizer, scheduler) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self.ctx, self.stage, self.model, self.optimizer, self.scheduler = ctx, stage, model, optimizer, scheduler
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.load = StateDictOptions(full_state_dict=True, strict=False)

    def save(self, step: int) -> Path | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        env = self.ctx.env
        weights = get_model_state_dict(self.model, options=self.full)
        states = [None] * env.world
        if env.world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        state = {
            "step": step,
            "trainable": {n: weights[n] for n in self.names if n in weights},
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=self.full),
            "scheduler": self.scheduler.state_dict(),
            "rng": states,
        }
        path = None
        if env.main:
            run_dir = Path(self.ctx.recipe.output)
            path = save_checkpoint(run_dir, self.stage.name, step, state, self.ctx.recipe.checkpoint.keep)
            self.ctx.log.plot(run_dir / "loss.png")
        env.barrier()
        return path

    def restore(self) -> tuple[int, Path | None]:
        """``(first step to run, the checkpoint it came from)``; ``(0, None)`` for a fresh stage."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        ctx = self.ctx
        existing = checkpoint_dirs(Path(ctx.recipe.output), self.stage.name) if ctx.resume else []
        if not existing:
            if ctx.env.main:
                ctx.log.truncate(lambda r: r.get("stage") != self.stage.name)
            return 0, None
        path, state = self.newest_usable(existing)
        set_model_state_dict(self.model, state["trainable"], options=self.load)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=self.load)
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        set_rng_state(rng[ctx.env.rank] if len(rng) == ctx.env.world else rng[0])
        start = state["step"]
        ctx.log.truncate(lambda r: r.get("stage") != self.stage.name or r.get("step", 0) <= start)
        ctx.say(f"stage {self.stage.name}: resuming at step {start} from {path}")
        return start, path

    def newest_usable(self, existing: list[Path]) -> tuple[Path, dict]:
        """The newest checkpoint that loads and holds exactly this stage's trainable tensors, skipping (and
        naming) damaged newer ones; none usable is one error naming the newest problem."""
        problems = []
        for path in reversed(existing):
            try:
                state = load_checkpoint(path)
                if not isinstance(state["trainable"], dict) or set(state["trainable"]) != set(self.names):
                    raise LinspecError(f"checkpoint {path} holds other trainable tensors than this stage trains")
            except LinspecError as error:
                problems.append(str(error))
                self.ctx.say(f"skipping {path}: {error}")
                continue
            return path, state
        raise LinspecError(f"no usable checkpoint to resume from: {problems[0]}")


def optimise(ctx: TrainingRun, index: int, stage: Stage, model, forward, objective: Objective) -> None:
    """Run ``stage.steps`` optimiser steps of ``objective`` on ``model`` (called through ``forward``: the model
    or its DDP/FSDP wrapper), resuming from the newest checkpoint under ``--resume``; evaluate at the end."""
    from tqdm.auto import tqdm

    recipe, env, log = ctx.recipe, ctx.env, ctx.log
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = stage.optimizer
    optimizer, scheduler = make_optimizer(stage, parameter_groups(model, stage))
    per_process = stage.batch_size // env.world
    if per_process * env.world != stage.batch_size or per_process % stage.micro_batch_size:
        raise LinspecError(
            f"recipe key stages[{index}].batch_size: {stage.batch_size} sequences cannot be split into "
            f"{env.world} process(es) × micro batches of {stage.micro_batch_size}"
        )
    accumulation = per_process // stage.micro_batch_size
    checkpoints = Checkpoints(ctx, stage, model, optimizer, scheduler)
    start, last_good = checkpoints.restore()

    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, unit="step", disable=not env.main, dynamic_ncols=True)
    autocast = torch.autocast(env.device.type, dtype=DTYPES[recipe.precision], enabled=recipe.precision != "fp32")
    session_start, session_tokens = time.perf_counter(), 0
    with StopFlag() as stop:
        for step in range(start, stage.steps):
            phase = stage.phase_at(step, recipe.data.seq_len)
            objective.enter_phase(phase)
            batch = objective.batch(ctx, stage, step, phase)
            local = batch[env.rank * per_process : (env.rank + 1) * per_process].to(env.device)
            total = 0.0
            for i, micro in enumerate(local.split(stage.micro_batch_size)):
                sync = i == accumulation - 1 or not hasattr(forward, "no_sync")  # FSDP2 reduces every time
                with autocast, contextlib.nullcontext() if sync else forward.no_sync():
                    loss = objective.loss(forward, micro) / accumulation
                loss.backward()
                total += float(loss.detach())
            for parameter in getattr(forward, "linspec_replicated", []):  # FSDP: parameters it does not shard
                dist.all_reduce(parameter.grad)
                parameter.grad /= env.world
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, opt.grad_clip or float("inf"))
            loss_value = env.mean(total)
            bad_gradient = env.any(not bool(torch.isfinite(grad_norm)))
            if not math.isfinite(loss_value) or bad_gradient:
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {float(grad_norm)}"
                bar.close()
                raise TrainingDiverged(
                    f"stage {stage.name}: {what} at step {step + 1}; stopped before applying it. Last good "
                    f"checkpoint: {last_good or 'none'}. Lower stages[{index}].optimizer.lr and run again with --force "
                    "(--resume keeps the recipe the run started with)"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            session_tokens += objective.tokens(batch)
            elapsed = time.perf_counter() - session_start
            record = {
                "event": "step",
                "stage": stage.name,
                "step": step + 1,
                "loss": loss_value,
                "loss_name": stage.loss,
                "seq_len": phase.seq_len,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": session_tokens / elapsed,
                "elapsed_s": elapsed,
                **objective.step_metrics(),
            }
            log.write(**record)
            shown = {"loss": f"{loss_value:.4g}", "tok_s": f"{record['tokens_per_s']:.0f}", "len": record["seq_len"]}
            bar.set_postfix({k: v for k, v in shown.items() if v is not None})
            bar.update(1)
            finished = step + 1 == stage.steps
            if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and not finished:
                objective.evaluate(ctx, forward, stage.name, step + 1)
                model.train()
            if env.any(stop.requested):
                path = checkpoints.save(step + 1)
                bar.close()
                raise TrainingInterrupted(f"interrupted at stage {stage.name} step {step + 1}; checkpoint: {path}")
            if recipe.checkpoint.every and (step + 1) % recipe.checkpoint.every == 0:  # the last step too:
                last_good = checkpoints.save(step + 1)  # a stage extended on --resume continues from it
            if ctx.on_step is not None:
                ctx.on_step(stage.name, step + 1, loss_value)
        bar.close()
    objective.enter_phase(None)
    objective.evaluate(ctx, forward, stage.name, stage.steps)
