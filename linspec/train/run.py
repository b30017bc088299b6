"""``train(recipe)``: base checkpoint -> conversion -> stages -> a linspec model directory. Read top to bottom.

Layout of ``recipe.output``::

    recipe.yaml          the resolved recipe of the run
    metrics.jsonl        one line per step ({"event": "step", ...}) and per evaluation ({"event": "eval", ...})
    loss.png             loss curve per stage
    checkpoints/<stage>/step-<n>/   resumable state (atomic; the newest ``checkpoint.keep`` are kept)
    stages/<stage>/      the model after each finished stage (a linspec model dir, LoRA merged)
    model/               the final model (LoRA merged unless merge_lora: false, then model/adapter holds it)

Distributed runs are started with ``torchrun`` (or ``accelerate launch``, which sets the same variables):
every process reads the same global batch and takes its slice; DDP averages gradients, FSDP shards the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from linspec.errors import LinspecError
from linspec.io import atomic_directory, atomic_write_text
from linspec.paths import child_path
from linspec.train.data import TrainingSet, pack, split_documents
from linspec.train.recipe import Phase, Recipe, Stage
from linspec.train.state import (
    MetricsLog,
    checkpoint_dirs,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from linspec.train.transfer import AttentionTransfer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Name fragments of the parameters each ``trainable`` keyword opens. ``gamma`` opens the global term's own
# parameters: γ (``global_scale``) and, for presets with a decaying memory, the per-head decays (``decay_logit``).
TRAINABLE_PATTERNS = {
    "gamma": ("global_scale", "decay_logit"),
    "conv": ("conv_weight",),
    "embeddings": ("embed_tokens",),
    "norms": ("norm.weight", "layernorm.weight"),
    "lm_head": ("lm_head",),
    "feature_map": ("feature_map",),
}


class TrainingDiverged(LinspecError):
    """The loss or the gradient norm became NaN/inf; the step was not applied."""


class TrainingInterrupted(LinspecError):
    """Ctrl-C: the run saved a checkpoint at a step boundary and stopped."""


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor)


def setup_env(recipe: Recipe) -> Env:
    use_cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise LinspecError("recipe key device: cuda requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    return Env(rank, world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


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


def train(recipe: Recipe, *, resume: bool = False, force: bool = False, on_step=None) -> Path:
    """Run every stage of ``recipe``; returns ``OUTPUT/model``. ``on_step(stage, step, loss)`` is for tests."""
    started = time.perf_counter()
    if resume and force:
        raise LinspecError("--resume continues a run and --force discards it; pass one of them")
    env = setup_env(recipe)
    run_dir = Path(recipe.output)
    prepare_run_dir(run_dir, resume, force, env, recipe)
    if env.main and not (run_dir / RECIPE_FILE).exists():
        atomic_write_text(run_dir / RECIPE_FILE, yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=env.main)
    log.repair()
    weights_dtype = DTYPES[recipe.precision] if recipe.distributed != "fsdp" else torch.float32

    from linspec.convert import convert
    from linspec.sources import load_source

    base, tokenizer = load_source(recipe.base, dtype=weights_dtype, progress=env.main)
    if tokenizer is None:
        raise LinspecError(f"recipe key base: {recipe.base} has no tokenizer")
    if env.main:  # build the datasets cache (and the chat answers) once, then every process reads them
        training, eval_seqs = build_data(recipe, base, tokenizer, env)
    env.barrier()
    if not env.main:
        training, eval_seqs = build_data(recipe, base, tokenizer, env)
    eval_seqs = eval_seqs[: recipe.eval.max_sequences or len(eval_seqs)]
    text, chat = training.prepare(recipe.data.seq_len)
    say(env, f"data: {len(text)} training{f' + {len(chat)} chat' if chat is not None else ''} and {len(eval_seqs)} "
        f"held-out sequences of {recipe.data.seq_len}")

    done = {r["stage"] for r in log.records() if r.get("event") == "eval"}
    if recipe.eval.baselines and "original" not in done:
        evaluate(base.to(env.device), eval_seqs, env, log, "original", recipe)
    model = convert(base, recipe.conversion.settings())
    if recipe.eval.baselines and "converted" not in done:
        evaluate(model.to(env.device), eval_seqs, env, log, "converted", recipe)

    teacher = None
    if any(stage.loss == "distill" for stage in recipe.stages):
        teacher, _ = load_source(recipe.base, dtype=weights_dtype, progress=False)
        teacher = teacher.to(env.device).eval().requires_grad_(False)

    final = len(recipe.stages) - 1
    for index, stage in enumerate(recipe.stages):
        stage_dir = child_path(run_dir / "stages", stage.name, f"recipe key stages[{index}].name")
        if resume and (stage_dir / "config.json").is_file():
            model = load_stage(stage_dir, weights_dtype)
            say(env, f"stage {stage.name}: already finished, loaded {stage_dir}")
            continue
        model = run_stage(recipe, index, stage, model, training, eval_seqs, teacher, env, log, resume, on_step)
        keep_adapter = index == final and not recipe.merge_lora and stage.lora is not None
        model = save_stage(model, tokenizer, stage_dir, weights_dtype, env, keep_adapter)
        log.plot(run_dir / "loss.png")

    output = run_dir / "model"
    if env.main:
        with atomic_directory(output, force=True) as tmp:
            shutil.copytree(stage_dir, tmp, dirs_exist_ok=True)
        write_summary(run_dir, log, time.perf_counter() - started)
    env.barrier()
    return output


def build_data(recipe: Recipe, base, tokenizer, env: Env) -> tuple[TrainingSet, torch.Tensor]:
    """The training set, packed at every length the stages use, and the held-out sequences (``data.seq_len``).
    Chat data is answered by ``base``, the original model, before it is converted."""
    import datasets

    documents, eval_documents = split_documents(recipe.data)
    chat_documents = None
    if recipe.data.chat is not None:
        from linspec.train.chat_data import conversations

        texts = conversations(recipe.data.chat, recipe.base, base.to(env.device), tokenizer, progress=env.main)
        chat_documents = datasets.Dataset.from_dict({"text": texts})
    training = TrainingSet(documents, tokenizer, recipe.data, chat_documents)
    for stage in recipe.stages:
        for seq_len in stage.seq_lens(recipe.data.seq_len):
            training.prepare(seq_len)
    return training, pack(eval_documents, tokenizer, recipe.data.seq_len, recipe.data.max_eval_sequences)


RECIPE_FILE = "recipe.yaml"
RUN_FILES = ("checkpoints", "stages", "model", "metrics.jsonl", "loss.png", "summary.json", RECIPE_FILE)
# Keys that may change when a run resumes: where it lives, how it runs and how often it saves, or how its
# result is written; not what it computes.
RESUMABLE_CHANGES = ("output", "threads", "device", "checkpoint", "merge_lora")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, env: Env, recipe: Recipe) -> None:
    """Check the output before any work: a fresh or empty directory, a run to resume with the same recipe, or
    (with ``force``) a run to discard. A directory that holds other files is never written into or emptied."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LinspecError(f"recipe key output: {run_dir} exists and is not a directory")
    has_run = (run_dir / RECIPE_FILE).exists() or (run_dir / "metrics.jsonl").exists()
    if run_dir.is_dir() and not has_run and any(p.name not in RUN_FILES for p in run_dir.iterdir()):
        raise LinspecError(
            f"recipe key output: {run_dir} holds files that are not a linspec run; choose an empty or new directory"
        )
    if has_run and not (resume or force):
        raise LinspecError(f"{run_dir} already holds a run; pass --resume to continue it or --force to start over")
    if resume and has_run:
        check_same_recipe(run_dir / RECIPE_FILE, recipe)
    if force and not resume and env.main:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    env.barrier()
    run_dir.mkdir(parents=True, exist_ok=True)


def check_same_recipe(path: Path, recipe: Recipe) -> None:
    """Refuse to resume a run under a recipe that differs from the one it started with (but for
    ``RESUMABLE_CHANGES``): the checkpoints, metrics and finished stages belong to that recipe."""
    if not path.is_file():
        raise LinspecError(f"{path.parent} holds no {RECIPE_FILE}, so it cannot be resumed; start over with --force")
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise LinspecError(f"{path} is damaged ({type(error).__name__}); start over with --force") from None
    current = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    changed = [key for key in _differences(stored, current) if key.split(".")[0] not in RESUMABLE_CHANGES]
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise LinspecError(
            f"the recipe differs from the one {path.parent} was started with ({shown}); resume with the same "
            "recipe, or start over with --force"
        )


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain YAML structures."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".") or "(whole recipe)"]


def say(env: Env, message: str) -> None:
    if env.main:
        print(f"linspec train: {message}", flush=True)


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
    writing = atomic_directory(stage_dir, force=True) if env.main else _null()
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


def is_sharded(model) -> bool:
    """Whether ``fully_shard`` was applied. Not read off the parameters: FSDP2's root module keeps its weights
    gathered after forward (embeddings, final norm, head), so they read as plain tensors until resharded."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor as an ordinary CPU tensor; a collective when it is sharded.

    ``full_tensor()`` may hand back an ``AsyncCollectiveTensor`` whose storage is not a real one (safetensors
    fails on it), so it is waited on first, as torch's own full-state-dict gathering does.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
        if isinstance(tensor, AsyncCollectiveTensor):
            tensor = tensor.wait()
    return tensor.detach().cpu()


def unshard(model):
    """A plain copy of an FSDP2-sharded model (its peft wrapping included), whole on the CPU of every process.

    ``fully_shard`` works in place (DTensor parameters, swapped module classes) and has no inverse, while
    ``merge_and_unload``, ``save_pretrained`` and the next stage's own sharding need ordinary tensors. So the same
    structure is built on the meta device (no init cost, like ``convert``) and the gathered weights are assigned
    to it. Weights are gathered one tensor at a time, so a GPU holds at most one extra whole tensor; buffers are
    never sharded and are taken over as they are, which covers non-persistent ones (RoPE's ``inv_freq``) that no
    state dict carries.
    """
    from torch.distributed.fsdp import FSDPModule

    from linspec.convert import _set_tensor

    weights = {name: gathered(tensor) for name, tensor in model.state_dict().items()}
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    model_class = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = model_class(base.config)
    plain_base = plain
    if peft_config:
        from peft import get_peft_model

        if list(peft_config) != ["default"]:
            raise LinspecError(f"cannot gather a sharded model with adapters {list(peft_config)}; expected one")
        plain = get_peft_model(plain_base, copy.deepcopy(peft_config["default"]))
    result = plain.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise LinspecError(
            f"gathering the sharded model: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
        )
    for name, buffer in model.named_buffers():
        _set_tensor(plain, name, buffer.detach().cpu())
    plain_base.tie_weights()  # assign=True gave tied weights (embeddings, lm_head) two separate tensors
    plain_base.generation_config = base.generation_config
    leftover = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if leftover:
        raise LinspecError(f"gathering the sharded model left uninitialised tensors: {leftover[:4]}")
    return plain.train(model.training)


def set_trainable(model, stage: Stage, dtype: torch.dtype, seed: int):
    """Freeze everything, add the stage's LoRA (peft), open the listed parameters; trainables kept in fp32."""
    model.requires_grad_(False)
    if stage.lora is not None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same run
        config = LoraConfig(
            r=stage.lora.r,
            lora_alpha=stage.lora.alpha,
            lora_dropout=stage.lora.dropout,
            target_modules=list(stage.lora.targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    patterns = [p for name in stage.trainable if name != "all" for p in TRAINABLE_PATTERNS[name]]
    for name, parameter in model.named_parameters():
        if stage.kind == "full" or "all" in stage.trainable or any(p in name for p in patterns):
            parameter.requires_grad_(True)
        if "lora_" in name:
            parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LinspecError(f"stage {stage.name}: nothing to train (trainable: {stage.trainable}, lora: {stage.lora})")
    if "feature_map" in stage.trainable and not any("feature_map" in n for n, _ in model.named_parameters()):
        raise LinspecError(f"stage {stage.name}: trainable lists feature_map but this feature map has no parameters")
    for parameter in trainable:  # fp32 master copies of what trains; frozen weights stay in ``dtype``
        parameter.data = parameter.data.float()
    return model


def wrap(model, recipe: Recipe, env: Env, stage: Stage):
    """The module to call forward on: the model itself, DDP around it, or FSDP2 sharding it in place.

    Attention transfer is replicated (DDP) even under ``distributed: fsdp``. Its losses leave each layer through
    hooks, not through the layer outputs, so no gradient ever reaches an output FSDP2 hooks: its post-backward
    (the reduce-scatter into the sharded gradients) would never run and the optimiser would see no gradient for
    sharded weights. DDP's hooks sit on the parameters instead. The stage needs every layer whole for its
    softmax targets anyway and trains only small tensors (γ, conv, LoRA), so sharding would save little.
    """
    if env.world == 1:
        return model
    if recipe.distributed == "fsdp" and stage.kind != "attention_transfer":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=DTYPES[recipe.precision], reduce_dtype=torch.float32)
        # FSDP2 cannot shard 0-d tensors (γ): they stay replicated and their gradients are averaged by hand.
        scalars = {p for p in model.parameters() if p.dim() == 0}
        for layer in model.get_decoder().layers:
            fully_shard(layer, mp_policy=policy, ignored_params=scalars)
        fully_shard(model, mp_policy=policy, ignored_params=scalars)
        model.linspec_replicated = [p for p in scalars if p.requires_grad]
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


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


def compute_loss(stage: Stage, forward, batch, teacher, transfer) -> torch.Tensor:
    if stage.kind == "attention_transfer":
        forward(input_ids=batch, use_cache=False, logits_to_keep=1)  # hooks record each layer's loss
        return transfer.loss()
    if stage.loss == "next_token":
        return forward(input_ids=batch, labels=batch, use_cache=False).loss
    # Distillation: KL(teacher ‖ student) over the vocabulary at every position, × T² (Hinton et al.).
    t = stage.distill_temperature
    student = forward(input_ids=batch, use_cache=False).logits.float() / t  # (B, L, V)
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits.float() / t
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(target, -1), log_target=True, reduction="none")
    return kl.sum(-1).mean() * t * t


def set_checkpointing(model, stage: Stage, phase: Phase | None, recipe: Recipe, current: bool) -> bool:
    """Turn activation checkpointing on or off for ``phase`` (None: the stage is over, so off); returns the new
    setting. Long phases need it (activations grow with the length), short ones run faster without it.
    Attention transfer never uses it: its backward stays inside each layer already."""
    wanted = False
    if phase is not None and stage.kind != "attention_transfer":
        wanted = recipe.gradient_checkpointing if phase.gradient_checkpointing is None else phase.gradient_checkpointing
    if wanted and not current:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif current and not wanted:
        model.activation_checkpointing_disable()
    return wanted


def run_stage(recipe, index, stage, model, training, eval_seqs, teacher, env, log, resume, on_step):
    """Train one stage; returns the (possibly peft-wrapped) model. Exact resume from the newest checkpoint."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from tqdm.auto import tqdm

    weights_dtype = next(model.parameters()).dtype
    model = set_trainable(model, stage, weights_dtype, recipe.seed + index)
    model.to(env.device)
    model.train()
    forward = wrap(model, recipe, env, stage)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))
    per_process = stage.batch_size // env.world
    if per_process * env.world != stage.batch_size or per_process % stage.micro_batch_size:
        raise LinspecError(
            f"recipe key stages[{index}].batch_size: {stage.batch_size} sequences cannot be split into "
            f"{env.world} process(es) × micro batches of {stage.micro_batch_size}"
        )
    accumulation = per_process // stage.micro_batch_size
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    load = StateDictOptions(full_state_dict=True, strict=False)

    def snapshot(step: int) -> dict:
        weights = get_model_state_dict(model, options=full)
        states = [None] * env.world
        if env.world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        return {
            "step": step,
            "trainable": {n: weights[n] for n in trainable_names if n in weights},
            "optimizer": get_optimizer_state_dict(model, optimizer, options=full),
            "scheduler": scheduler.state_dict(),
            "rng": states,
        }

    def save(step: int) -> Path | None:
        state = snapshot(step)
        path = None
        if env.main:
            run_dir = Path(recipe.output)
            path = save_checkpoint(run_dir, stage.name, step, state, recipe.checkpoint.keep)
            log.plot(run_dir / "loss.png")
        env.barrier()
        return path

    start, last_good = 0, None
    existing = checkpoint_dirs(Path(recipe.output), stage.name) if resume else []
    if existing:
        last_good, state = newest_usable_checkpoint(existing, trainable_names, env)
        set_model_state_dict(model, state["trainable"], options=load)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=load)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][env.rank] if len(state["rng"]) == env.world else state["rng"][0])
        start = state["step"]
        log.truncate(lambda r: r.get("stage") != stage.name or r.get("step", 0) <= start)
        say(env, f"stage {stage.name}: resuming at step {start} from {last_good}")
    elif env.main:
        log.truncate(lambda r: r.get("stage") != stage.name)

    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, unit="step", disable=not env.main, dynamic_ncols=True)
    autocast = torch.autocast(env.device.type, dtype=DTYPES[recipe.precision], enabled=recipe.precision != "fp32")
    session_start, session_tokens = time.perf_counter(), 0
    checkpointing = False
    with StopFlag() as stop, AttentionTransfer(model) if stage.kind == "attention_transfer" else _null() as transfer:
        for step in range(start, stage.steps):
            phase = stage.phase_at(step, recipe.data.seq_len)
            seq_len = phase.seq_len
            checkpointing = set_checkpointing(model, stage, phase, recipe, checkpointing)
            batch = training.batch(step, stage.batch_size, seq_len)  # (batch_size, seq_len)
            local = batch[env.rank * per_process : (env.rank + 1) * per_process].to(env.device)
            total = 0.0
            for i, micro in enumerate(local.split(stage.micro_batch_size)):
                sync = i == accumulation - 1 or not hasattr(forward, "no_sync")  # FSDP2 reduces every time
                with autocast, _null() if sync else forward.no_sync():
                    loss = compute_loss(stage, forward, micro, teacher, transfer) / accumulation
                loss.backward()
                total += float(loss.detach())
            for parameter in getattr(forward, "linspec_replicated", []):  # FSDP: parameters it does not shard
                dist.all_reduce(parameter.grad)
                parameter.grad /= env.world
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], opt.grad_clip or float("inf")
            )
            loss_value = env.mean(total)
            bad_gradient = env.any(not bool(torch.isfinite(grad_norm)))
            if not math.isfinite(loss_value) or bad_gradient:
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {float(grad_norm)}"
                bar.close()
                raise TrainingDiverged(
                    f"stage {stage.name}: {what} at step {step + 1}; stopped before applying it. Last good "
                    f"checkpoint: {last_good or 'none'}. Lower stages[{index}].optimizer.lr and run again with --resume"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            session_tokens += stage.batch_size * seq_len
            elapsed = time.perf_counter() - session_start
            record = {
                "event": "step",
                "stage": stage.name,
                "step": step + 1,
                "loss": loss_value,
                "loss_name": stage.loss,
                "seq_len": seq_len,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": session_tokens / elapsed,
                "elapsed_s": elapsed,
            }
            if transfer is not None:  # which layers linearise badly: candidates for conversion.softmax_layers
                record["layer_losses"] = [round(x, 5) for x in transfer.take_layer_losses()]
            log.write(**record)
            bar.set_postfix(loss=f"{loss_value:.4g}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            finished = step + 1 == stage.steps
            if recipe.eval.every and (step + 1) % recipe.eval.every == 0 and not finished:
                with transfer.paused() if transfer is not None else _null():
                    evaluate(forward, eval_seqs, env, log, stage.name, recipe, step + 1)
                model.train()
            if env.any(stop.requested):
                path = save(step + 1)
                bar.close()
                raise TrainingInterrupted(f"interrupted at stage {stage.name} step {step + 1}; checkpoint: {path}")
            if recipe.checkpoint.every and (step + 1) % recipe.checkpoint.every == 0 and not finished:
                last_good = save(step + 1)
            if on_step is not None:
                on_step(stage.name, step + 1, loss_value)
        bar.close()
    set_checkpointing(model, stage, None, recipe, checkpointing)
    evaluate(forward, eval_seqs, env, log, stage.name, recipe, stage.steps)
    return model


def newest_usable_checkpoint(existing: list[Path], trainable_names: list[str], env: Env) -> tuple[Path, dict]:
    """The newest checkpoint that loads and holds exactly this stage's trainable tensors, skipping (and naming)
    damaged newer ones; none usable is one error naming the newest problem."""
    problems = []
    for path in reversed(existing):
        try:
            state = load_checkpoint(path)
            if not isinstance(state["trainable"], dict) or set(state["trainable"]) != set(trainable_names):
                raise LinspecError(f"checkpoint {path} holds other trainable tensors than this stage trains")
        except LinspecError as error:
            problems.append(str(error))
            say(env, f"skipping {path}: {error}")
            continue
        return path, state
    raise LinspecError(f"no usable checkpoint to resume from: {problems[0]}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


@torch.no_grad()
def evaluate(forward, eval_seqs, env: Env, log: MetricsLog, stage: str, recipe: Recipe, step: int = 0) -> float:
    """Held-out perplexity; each process scores its share of the sequences, the sums are all-reduced."""
    was_training = forward.training
    forward.eval()
    share = eval_seqs[env.rank :: env.world][: len(eval_seqs) // env.world]
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    autocast = torch.autocast(env.device.type, dtype=DTYPES[recipe.precision], enabled=recipe.precision != "fp32")
    start = time.perf_counter()
    for batch in share.split(max(1, recipe.stages[0].micro_batch_size)):
        batch = batch.to(env.device)
        with autocast:
            logits = forward(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum")
        totals += torch.stack([nll.double(), torch.tensor(batch[:, 1:].numel(), dtype=torch.float64)])
    if env.world > 1:
        dist.all_reduce(totals)
    ppl = math.exp(float(totals[0] / totals[1]))
    seconds = time.perf_counter() - start
    log.write(event="eval", stage=stage, step=step, ppl=ppl, tokens=int(totals[1]), seconds=seconds)
    say(env, f"held-out perplexity ({stage}, step {step}): {ppl:.2f}")
    forward.train(was_training)
    return ppl


def write_summary(run_dir: Path, log: MetricsLog, run_seconds: float) -> dict:
    """``summary.json``: held-out perplexity of every phase (original, converted, each stage) and training time.

    A stage's time adds up its steps across sessions: ``elapsed_s`` restarts at each resume.
    """
    import json

    ppl: dict = {}
    seconds: dict = {}
    previous: dict = {}
    for record in log.records():
        if record.get("event") == "eval":
            ppl[record["stage"]] = record["ppl"]  # a stage's final evaluation overwrites earlier ones
        elif record.get("event") == "step":
            stage, elapsed = record["stage"], record["elapsed_s"]
            last = previous.get(stage, 0.0)
            seconds[stage] = seconds.get(stage, 0.0) + (elapsed - last if elapsed >= last else elapsed)
            previous[stage] = elapsed
    summary = {"ppl": ppl, "train_seconds": seconds, "run_seconds": run_seconds}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
