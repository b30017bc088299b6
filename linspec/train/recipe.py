"""Recipes: typed, validated training plans loaded from YAML, with ``key=value`` overrides.

Every key is a field of one of the dataclasses below; its docstring line is the key's documentation (``linspec
train --help`` prints them). Loading checks everything that can be checked before work starts: unknown keys,
wrong types, out-of-range values and missing files each raise one ``LinspecError`` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from linspec.config import DEFAULT_PRESET, PRESETS, LinspecConfig
from linspec.data.settings import Chat, Data, DistillData, Recall
from linspec.errors import LinspecError
from linspec.train.legacy_drafter import is_legacy_recipe, old_key_names, translate_recipe
from linspec.utils.paths import check_name
from linspec.utils.validation import check_number, check_seed

TRAINABLE = ("gamma", "conv", "embeddings", "norms", "lm_head", "feature_map", "far_memory", "all")
DEFAULT_TRAINABLE = ["gamma", "conv"]
Loss = Literal["next_token", "distill", "mse", "far_attention", "draft"]
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a bigger file is the wrong file
# Upper bounds far beyond any real run that stop absurd sizes before they allocate anything.
MAX_STEPS = 10**8
MAX_BATCH = 1 << 16
MAX_SEQ_LEN = 1 << 20
MAX_LORA_RANK = 4096
MAX_THREADS = 1024
MAX_CHAT_PROMPTS = 1 << 20
MAX_NEW_TOKENS = 1 << 16


@dataclass
class Conversion:
    """How the base model is linearised (docs/design.md §2); unset values come from the preset. ``conversion: null``
    keeps the base as it is, for a recipe whose only stage trains a drafter for it."""

    preset: str = (
        DEFAULT_PRESET  # window (recommended), window-hedgehog, stable, paper (exact), decay, mean, normalized, elu
    )
    group_size: int | None = None  # tokens per group G (paper: 64; default: the preset's)
    conv_taps: int | None = None  # causal depthwise-conv taps P (paper: 32; default: the preset's)
    feature_map: str | None = None  # φ for q/k: l2norm (paper), elu1, relu (default: the preset's)
    local_kernel: str | None = None  # relu2 (paper) or identity inside a group, softmax: a window (default: preset's)
    local_window: int | None = None  # tokens the softmax window covers (window preset: 512)
    sink_tokens: int | None = None  # first tokens the softmax window always sees (window preset: 4)
    sink_positions: str | None = None  # adjacent: as if right before the window (window); absolute (window-hedgehog)
    memory_distance_decay: bool | None = None  # far tokens weighed by (d/W)^-α_h, α_h learnt (default: off)
    sparse_cache: int | None = None  # K evicted tokens per kv head kept exactly beside the window (default: 0, none)
    sparse_cache_policy: str | None = None  # which: recall-error (default), recency, random
    softmax_layers: list[int] | str = field(default_factory=list)  # layers kept softmax (a hybrid); auto:N measures
    softmax_heads: list[list[int]] = field(default_factory=list)  # [layer, kv head] pairs kept softmax (eval heads)

    def auto_layers(self):
        """``Auto(N)`` for ``softmax_layers: auto:N`` (chosen by measurement when the run starts), else None."""
        from linspec.conversion.choice import Auto, parse_softmax_layers

        layers = parse_softmax_layers(self.softmax_layers)
        return layers if isinstance(layers, Auto) else None

    def settings(self) -> LinspecConfig:
        """The layer settings; with ``auto:N`` the softmax layers are left empty until ``train`` measures them."""
        from linspec.conversion.choice import Auto, parse_softmax_layers

        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}
        layers = parse_softmax_layers(self.softmax_layers)
        overrides["softmax_layers"] = () if isinstance(layers, Auto) else layers
        return LinspecConfig.from_preset(self.preset, **overrides)


@dataclass
class Phase:
    """One part of a sequence-length curriculum: ``steps`` optimiser steps on sequences of ``seq_len`` tokens."""

    seq_len: int = 256  # tokens per training sequence in this phase
    steps: int = 1  # optimiser steps of this phase
    gradient_checkpointing: bool | None = None  # recompute activations in backward (null: the recipe's setting)


@dataclass
class Lora:
    """A LoRA adapter added through peft; merged into the weights when its stage ends."""

    r: int = 8  # rank
    alpha: float = 16.0  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # module names


@dataclass
class Optimizer:
    """AdamW over the stage's trainable parameters."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam β1, β2
    eps: float = 1e-8  # Adam ε
    grad_clip: float | None = 1.0  # max global gradient norm (null: no clipping)
    memory_bias_lr: float | None = None  # peak lr of the far memory's b_h and α_h (null: lr); they move nats


@dataclass
class Schedule:
    """Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to min_lr_ratio × lr."""

    name: Literal["constant", "cosine", "linear"] = "cosine"  # shape after warm-up
    warmup_steps: int = 0  # steps of linear warm-up from 0
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, linear)


@dataclass
class DrafterSettings:
    """What a drafter stage trains, for the model the stages before it made (or the base as it is, with
    ``conversion: null``), that model frozen: medusa (K heads on the last hidden state), eagle (a feature-level
    layer, autoregressive) or redrafter (a recurrent cell over token embeddings). The result is OUTPUT/drafter."""

    kind: str = "medusa"  # drafter architecture: medusa, eagle or redrafter
    depth: int = 4  # tokens drafted per round it is trained for (medusa: number of heads)
    draft_vocab: int | None = 8192  # most frequent target tokens the drafter may propose (null: the whole vocabulary)
    intermediate_size: int = 1024  # eagle: width of the layer's MLP
    data: DistillData = field(default_factory=DistillData)

    def module_settings(self, draft_vocab: int | None) -> dict:
        """The settings the drafter module is built with, ``draft_vocab`` being the number of ids kept."""
        settings = {"depth": self.depth, "draft_vocab": draft_vocab}
        if self.kind == "eagle":
            settings["intermediate_size"] = self.intermediate_size
        return settings


@dataclass
class Stage:
    """One training stage. kind: attention_transfer (stage 1: per-layer MSE between the frozen softmax output
    and the linear output, or with a far memory the KL of the attention past the window), lora (stage 2: LoRA via
    peft), full (every parameter trains), drafter (a drafter for the model so far, which stays frozen; the last
    stage)."""

    name: str = ""  # label in logs, checkpoints and metrics (default: the kind)
    kind: Literal["attention_transfer", "lora", "full", "drafter"] = "lora"  # what trains and against what
    steps: int = 100  # optimiser steps
    batch_size: int = 8  # sequences per optimiser step, across all processes (drafter: positions per step)
    micro_batch_size: int | None = None  # per forward pass and process, accumulating the rest (null: 1, drafter: all)
    loss: Loss = "next_token"  # lora/full: next_token, distill; attention_transfer: mse, far_attention; drafter: draft
    output_mse_weight: float = 0.0  # loss far_attention: weight of the output MSE added to the far attention KL
    window_sizes: list[int] = field(default_factory=list)  # attention_transfer: window sizes, one drawn per step
    distill_temperature: float = 1.0  # softmax temperature of the KL to the teacher's logits
    trainable: list[str] | None = None  # gamma conv embeddings norms lm_head feature_map far_memory all; null:
    # γ and the conv, or the far memory where the conversion has no grouped term (default_trainable)
    lora: Lora | None = None  # adapter for this stage (null: none; a lora stage: the defaults below)
    drafter: DrafterSettings | None = None  # kind drafter: the drafter and its self-distillation data
    optimizer: Optimizer = field(default_factory=Optimizer)
    schedule: Schedule = field(default_factory=Schedule)
    curriculum: list[Phase] = field(default_factory=list)  # seq_len per run of steps (empty: data.seq_len throughout)

    def phase_at(self, step: int, default_seq_len: int) -> Phase:
        """The curriculum phase of optimiser step ``step`` (0-based); without a curriculum, one phase of
        ``default_seq_len`` (``data.seq_len``) over the whole stage."""
        end = 0
        for phase in self.curriculum:
            end += phase.steps
            if step < end:
                return phase
        return Phase(seq_len=default_seq_len, steps=self.steps)

    def seq_lens(self, default_seq_len: int) -> list[int]:
        """Every sequence length this stage trains on, in order."""
        return list(dict.fromkeys(p.seq_len for p in self.curriculum)) or [default_seq_len]


@dataclass
class Checkpoint:
    """Atomic checkpoints under OUTPUT/checkpoints; ``--resume`` continues from the newest."""

    every: int = 50  # steps between checkpoints (0: only at stage ends and on Ctrl-C)
    keep: int = 2  # newest checkpoints kept per stage


@dataclass
class Evaluation:
    """Held-out perplexity on data.eval (packed sequences of data.seq_len tokens)."""

    every: int = 0  # steps between evaluations inside a stage (0: only at stage ends)
    baselines: bool = True  # also measure the original model and the raw conversion before training
    max_sequences: int | None = None  # overrides data.max_eval_sequences for evaluations during training


@dataclass
class Recipe:
    """A full training run: from a base checkpoint to a linspec model directory at OUTPUT/model, a drafter for it
    at OUTPUT/drafter, or both."""

    base: str = "smollm2-135m"  # base checkpoint: HF dir, hub id, .gguf file or a demo name
    output: str = "runs/linspec"  # run directory: model/, checkpoints/, stages/, metrics.jsonl, loss.png
    conversion: Conversion | None = field(default_factory=Conversion)  # null: the base as it is (drafter stage only)
    data: Data = field(default_factory=Data)  # what the model stages train on and are evaluated on
    stages: list[Stage] = field(default_factory=list)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 on CPU (bf16 is ~9x slower there); bf16 on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    distributed: Literal["ddp", "fsdp"] = "ddp"  # several processes (torchrun): ddp replicates, fsdp shards lora/full
    seed: int = 0  # seed for LoRA init and dropout
    gradient_checkpointing: bool = False  # recompute activations in backward (lora/full stages): less memory per token
    threads: int | None = None  # torch CPU threads (null: torch's default)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    eval: Evaluation = field(default_factory=Evaluation)
    merge_lora: bool = True  # merge LoRA into the weights of the output model (false: OUTPUT/model/adapter)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (dataclasses recursively); ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except LinspecError as error:
                errors.append(str(error))
        raise LinspecError(errors[0] if errors else f"recipe key {key}: got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise LinspecError(f"recipe key {key}: expected one of {_type_name(tp)}, got {_shown(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise LinspecError(f"recipe key {key}: expected a list, got {_shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:
        return _coerce_float(value, key)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise LinspecError(f"recipe key {key}: expected {_type_name(tp)}, got {_shown(value)}")
    return value


def _coerce_float(value: Any, key: str) -> float:
    """A finite float from an int, a float or a numeric string (YAML 1.1 reads 1e-3 as a string); never a bool,
    NaN or infinity, which would train silently wrong."""
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise LinspecError(f"recipe key {key}: expected float, got {_shown(value)}")
    if not math.isfinite(number):
        raise LinspecError(f"recipe key {key}: must be a finite number, got {value!r}")
    return number


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LinspecError(f"recipe key {prefix or '(top level)'}: expected a mapping, got {_shown(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise LinspecError(f"recipe key {where:.80}: unknown key; known keys here: {', '.join(sorted(known))}")
    values = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    return cls(**values)


def _positive(value: Any, key: str, allow_zero: bool = False, limit: float | None = None) -> None:
    check_number(value, f"recipe key {key}", allow_zero=allow_zero, limit=limit)


def check_seeds(section: Any, prefix: str = "") -> None:
    """Every ``seed`` key of a recipe (any section, any depth) in ``0..MAX_SEED``, checked before anything is
    written: a seed past 64 bits otherwise fails only when it reaches torch, after the run directory exists."""
    if dataclasses.is_dataclass(section):
        for f in dataclasses.fields(section):
            key = f"{prefix}{f.name}"
            value = getattr(section, f.name)
            if f.name == "seed":
                check_seed(value, f"recipe key {key}")
            else:
                check_seeds(value, f"{key}.")
    elif isinstance(section, list):
        for i, item in enumerate(section):
            check_seeds(item, f"{prefix.rstrip('.')}[{i}].")


def _fraction(value: float, key: str, *, closed: bool) -> None:
    """``value`` in [0, 1] (``closed``) or [0, 1)."""
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise LinspecError(f"recipe key {key}: must be in [0, 1{']' if closed else ')'}, got {value!r}")


def is_local_path(source: str) -> bool:
    """Whether a base/data string names a local file rather than a hub id or a demo name."""
    return source.startswith(("/", "./", "../", "~")) or source.endswith((".gguf", ".txt", ".jsonl", ".parquet"))


def validate(recipe: Recipe) -> Recipe:
    """Checks that need more than one key or the file system. Raises ``LinspecError`` naming the key."""
    from linspec.data.documents import check_source

    if recipe.conversion is not None:
        _check_conversion(recipe.conversion)
    if not recipe.base.strip():
        raise LinspecError("recipe key base: empty; name a model directory, a .gguf file, a hub id or a demo name")
    if is_local_path(recipe.base) and not Path(recipe.base).expanduser().exists():
        raise LinspecError(f"recipe key base: file not found: {recipe.base}")
    if not recipe.output.strip() or "\0" in recipe.output:
        raise LinspecError("recipe key output: empty or not a path")
    output = Path(recipe.output).expanduser()
    recipe.output = str(output)
    if output.exists() and not output.is_dir():
        raise LinspecError(f"recipe key output: {recipe.output} exists and is not a directory")
    data = recipe.data
    if not data.train:
        raise LinspecError("recipe key data.train: at least one training source is needed")
    for i, source in enumerate(data.train):
        check_source(source, f"recipe key data.train[{i}]")
    if data.eval is not None:
        check_source(data.eval, "recipe key data.eval")
    if not 0 < data.eval_fraction < 1:
        raise LinspecError(f"recipe key data.eval_fraction: must be in (0, 1), got {data.eval_fraction}")
    if not data.text_field:
        raise LinspecError("recipe key data.text_field: empty")
    _positive(data.seq_len, "data.seq_len", limit=MAX_SEQ_LEN)
    if data.seq_len < 2:  # one token has no next token to predict: every batch would be empty
        raise LinspecError(f"recipe key data.seq_len: must be at least 2 tokens, got {data.seq_len}")
    _positive(data.max_train_sequences, "data.max_train_sequences")
    _positive(data.max_documents, "data.max_documents")
    _positive(data.max_eval_sequences, "data.max_eval_sequences")
    if data.chat is not None:
        _check_chat(data.chat, data)
    if data.recall is not None:
        _check_recall(data.recall, data)
    _check_stage_kinds(recipe)
    names = set()
    for i, stage in enumerate(recipe.stages):
        key = f"stages[{i}]"
        stage.name = check_name(stage.name or stage.kind, f"recipe key {key}.name")  # it becomes stages/<name>
        if stage.name in names:
            raise LinspecError(f"recipe key {key}.name: duplicate stage name {stage.name!r}")
        names.add(stage.name)
        _positive(stage.steps, f"{key}.steps", limit=MAX_STEPS)
        if stage.kind == "drafter":
            _check_drafter_stage(stage, key)
        elif stage.drafter is not None:
            raise LinspecError(f"recipe key {key}.drafter: only a stage of kind drafter trains a drafter")
        if stage.micro_batch_size is None:
            stage.micro_batch_size = stage.batch_size if stage.kind == "drafter" else 1
        if stage.trainable is None and stage.kind != "drafter":
            stage.trainable = default_trainable(recipe.conversion.settings() if recipe.conversion else None)
        for name in ("batch_size", "micro_batch_size"):
            _positive(getattr(stage, name), f"{key}.{name}", limit=MAX_BATCH)
        if stage.batch_size % stage.micro_batch_size:
            raise LinspecError(f"recipe key {key}.batch_size: must be a multiple of micro_batch_size")
        _check_loss(stage, key)
        _check_far_attention(stage, key, recipe)
        for j, name in enumerate(stage.trainable or ()):
            if name not in TRAINABLE:
                raise LinspecError(f"recipe key {key}.trainable[{j}]: expected one of {', '.join(TRAINABLE)}")
        if stage.kind == "lora" and stage.lora is None:
            stage.lora = Lora()  # the defaults ``linspec train --help`` lists
        if stage.lora is not None:
            _check_lora(stage.lora, f"{key}.lora")
        _check_optimizer(stage.optimizer, f"{key}.optimizer")
        _positive(stage.schedule.warmup_steps, f"{key}.schedule.warmup_steps", allow_zero=True, limit=MAX_STEPS)
        _fraction(stage.schedule.min_lr_ratio, f"{key}.schedule.min_lr_ratio", closed=True)
        _positive(stage.distill_temperature, f"{key}.distill_temperature")
        _check_curriculum(stage, key)
    _positive(recipe.checkpoint.every, "checkpoint.every", allow_zero=True)
    _positive(recipe.checkpoint.keep, "checkpoint.keep", limit=1000)
    _positive(recipe.eval.every, "eval.every", allow_zero=True)
    _positive(recipe.eval.max_sequences, "eval.max_sequences")
    _positive(recipe.threads, "threads", limit=MAX_THREADS)
    check_seeds(recipe)
    return recipe


def _check_conversion(conversion: Conversion) -> None:
    if conversion.preset not in PRESETS:
        raise LinspecError(f"recipe key conversion.preset: expected one of {', '.join(PRESETS)}")
    try:
        conversion.auto_layers()
    except LinspecError as error:
        raise LinspecError(f"recipe key conversion.softmax_layers: {error}") from None
    try:
        conversion.settings()
    except LinspecError as error:
        raise LinspecError(f"recipe key conversion: {error}") from None


def _check_stage_kinds(recipe: Recipe) -> None:
    """A drafter is trained for the model as the stages before it leave it, so it comes last (a later stage would
    change the model under it); ``conversion: null`` keeps the base as it is, which only a drafter stage can use."""
    if not recipe.stages:
        raise LinspecError("recipe key stages: at least one stage is needed")
    kinds = [stage.kind for stage in recipe.stages]
    if "drafter" in kinds[:-1]:
        raise LinspecError(
            f"recipe key stages[{kinds.index('drafter')}].kind: a drafter stage must be last (it drafts for the model)"
        )
    if recipe.conversion is None and kinds != ["drafter"]:
        raise LinspecError(
            "recipe key conversion: null keeps the base as it is, for a recipe whose only stage is a drafter stage; "
            "set a conversion to train the model"
        )
    if recipe.conversion is not None and kinds == ["drafter"]:
        raise LinspecError(
            "recipe key conversion: a recipe that only trains a drafter uses the base as it is; set conversion: null "
            "(or add a stage that trains the converted model before the drafter stage)"
        )


def _check_drafter_stage(stage: Stage, key: str) -> None:
    """A drafter stage trains the drafter's own weights on its own data: the model's keys do not apply to it."""
    if stage.drafter is None:
        raise LinspecError(f"recipe key {key}.drafter: a drafter stage needs a drafter section (kind: medusa, ...)")
    for name in ("lora", "trainable"):
        if getattr(stage, name) is not None:
            raise LinspecError(f"recipe key {key}.{name}: a drafter stage trains the drafter; the model stays frozen")
    if stage.curriculum:
        raise LinspecError(f"recipe key {key}.curriculum: a drafter stage trains on positions, not sequence lengths")
    _check_drafter(stage.drafter, f"{key}.drafter")


def _check_drafter(settings: DrafterSettings, key: str) -> None:
    from linspec.data.documents import check_source
    from linspec.drafting.base import MAX_DEPTH
    from linspec.drafting.registry import TRAINED_KINDS

    if settings.kind not in TRAINED_KINDS:
        raise LinspecError(f"recipe key {key}.kind: expected one of {', '.join(TRAINED_KINDS)}, got {settings.kind!r}")
    if not 1 <= settings.depth <= MAX_DEPTH:
        raise LinspecError(f"recipe key {key}.depth: must be in 1..{MAX_DEPTH}, got {settings.depth}")
    _positive(settings.draft_vocab, f"{key}.draft_vocab", limit=1 << 24)
    _positive(settings.intermediate_size, f"{key}.intermediate_size", limit=1 << 16)
    data = settings.data
    check_source(data.prompts, f"recipe key {key}.data.prompts")
    if data.prompt_kinds is not None:
        from linspec.data.prompts import check_kinds, verbatim_prompts

        try:
            check_kinds(data.prompt_kinds)
        except LinspecError as error:
            raise LinspecError(f"recipe key {key}.data.prompt_kinds: {error}") from None
        if verbatim_prompts(data.prompts) is not None:
            raise LinspecError(f"recipe key {key}.data.prompt_kinds: {data.prompts} holds prompts verbatim; kinds "
                               "apply to prompts built from a corpus")  # fmt: skip
    if data.text_tokens:
        check_source(data.text, f"recipe key {key}.data.text")
    _positive(data.text_tokens, f"{key}.data.text_tokens", allow_zero=True, limit=1 << 26)
    _positive(data.text_length, f"{key}.data.text_length", limit=1 << 14)
    if data.text_length < 2:
        raise LinspecError(f"recipe key {key}.data.text_length: must be at least 2, got {data.text_length}")
    limits = {"num_prompts": 1 << 20, "eval_prompts": 1 << 16, "max_new_tokens": 1 << 14, "batch_size": 1 << 12}
    for name, limit in limits.items():
        _positive(getattr(data, name), f"{key}.data.{name}", limit=limit)


def default_trainable(settings: LinspecConfig | None) -> list[str]:
    """What a stage that names no ``trainable`` opens: γ and the conv, or, for a conversion without the grouped
    term (``grouped_term`` false), its far memory if it has one and nothing else (LoRA alone)."""
    if settings is None or settings.grouped_term:
        return list(DEFAULT_TRAINABLE)
    return ["far_memory"] if settings.far_memory else []


def _check_loss(stage: Stage, key: str) -> None:
    """Each kind has its loss; the field's default (next_token) becomes the kind's own where it has only one."""
    own = {"attention_transfer": "mse", "drafter": "draft"}.get(stage.kind)
    if stage.kind == "attention_transfer" and stage.loss == "far_attention":
        return
    if own is not None and stage.loss != own:
        if stage.loss != "next_token":  # next_token is the field default; anything else is a mistake
            raise LinspecError(f"recipe key {key}.loss: {stage.kind} trains with {own}, got {stage.loss!r}")
        stage.loss = own
    if own is None and stage.loss in ("mse", "far_attention", "draft"):
        raise LinspecError(f"recipe key {key}.loss: {stage.loss} is for another stage kind; use next_token or distill")


def _check_far_attention(stage: Stage, key: str, recipe: Recipe) -> None:
    """The far attention KL and stochastic windows need a softmax window (with a far memory, for the KL) and
    sequences that reach past it, else a step has no row to learn from."""
    _positive(stage.output_mse_weight, f"{key}.output_mse_weight", allow_zero=True)
    if stage.output_mse_weight and stage.loss != "far_attention":
        raise LinspecError(f"recipe key {key}.output_mse_weight: only adds to loss far_attention, not {stage.loss}")
    if stage.window_sizes and stage.kind != "attention_transfer":
        raise LinspecError(f"recipe key {key}.window_sizes: only an attention_transfer stage trains with other windows")
    if stage.loss != "far_attention" and not stage.window_sizes and stage.optimizer.memory_bias_lr is None:
        return
    settings = recipe.conversion.settings() if recipe.conversion is not None else None
    if settings is None or not settings.softmax_window:
        raise LinspecError(f"recipe key {key}: far_attention, window_sizes and memory_bias_lr need a softmax window "
                           "(preset window or window-hedgehog)")  # fmt: skip
    has_memory = settings.memory_feature_map != "none"
    if not has_memory and (stage.loss == "far_attention" or stage.optimizer.memory_bias_lr is not None):
        what = "loss far_attention" if stage.loss == "far_attention" else "optimizer.memory_bias_lr"
        raise LinspecError(f"recipe key {key}: {what} needs a far memory (preset window-hedgehog)")
    for j, size in enumerate(stage.window_sizes):
        if not 1 <= size <= settings.local_window:
            raise LinspecError(
                f"recipe key {key}.window_sizes[{j}]: must be in 1..{settings.local_window} (the model's window), "
                f"got {size}"
            )
    if stage.loss == "far_attention":
        reach = max(stage.window_sizes or [settings.local_window]) + settings.sink_tokens
        for seq_len in stage.seq_lens(recipe.data.seq_len):
            if seq_len <= reach:
                raise LinspecError(
                    f"recipe key {key}: loss far_attention learns from tokens past the window; sequences of "
                    f"{seq_len} tokens never leave a window of {reach - settings.sink_tokens} + "
                    f"{settings.sink_tokens} sinks (raise data.seq_len or the curriculum's seq_len)"
                )


def _check_chat(chat: Chat, data: Data) -> None:
    from linspec.data.documents import check_source

    check_source(chat.prompts, "recipe key data.chat.prompts")
    if chat.prompts == data.eval:
        raise LinspecError("recipe key data.chat.prompts: must not be the held-out source data.eval")
    _positive(chat.num_prompts, "data.chat.num_prompts", limit=MAX_CHAT_PROMPTS)
    _positive(chat.max_new_tokens, "data.chat.max_new_tokens", limit=MAX_NEW_TOKENS)
    _positive(chat.temperature, "data.chat.temperature", allow_zero=True, limit=100)
    _positive(chat.batch_size, "data.chat.batch_size", limit=MAX_BATCH)
    if not 0 < chat.ratio < 1:
        raise LinspecError(f"recipe key data.chat.ratio: must be in (0, 1), got {chat.ratio!r}")


def _check_recall(recall: Recall, data: Data) -> None:
    from linspec.data.recall import MAX_FACTS

    _positive(recall.facts, "data.recall.facts", limit=MAX_FACTS)
    if not 0 < recall.ratio < 1:
        raise LinspecError(f"recipe key data.recall.ratio: must be in (0, 1), got {recall.ratio!r}")
    if data.chat is not None and recall.ratio + data.chat.ratio >= 1:
        raise LinspecError(
            f"recipe keys data.recall.ratio + data.chat.ratio: must leave room for plain text, "
            f"got {recall.ratio!r} + {data.chat.ratio!r}"
        )


def _check_curriculum(stage: Stage, key: str) -> None:
    """Phases name their lengths and steps; their steps must add up to the stage's, so ``steps`` keeps meaning
    the stage's length (and its learning-rate schedule) with or without a curriculum."""
    for j, phase in enumerate(stage.curriculum):
        _positive(phase.seq_len, f"{key}.curriculum[{j}].seq_len", limit=MAX_SEQ_LEN)
        if phase.seq_len < 2:
            raise LinspecError(f"recipe key {key}.curriculum[{j}].seq_len: must be at least 2 tokens")
        _positive(phase.steps, f"{key}.curriculum[{j}].steps", limit=MAX_STEPS)
    total = sum(phase.steps for phase in stage.curriculum)
    if stage.curriculum and total != stage.steps:
        raise LinspecError(
            f"recipe key {key}.curriculum: its phases add up to {total} steps but {key}.steps is {stage.steps}; "
            "make them equal"
        )


def _check_lora(lora: Lora, key: str) -> None:
    _positive(lora.r, f"{key}.r", limit=MAX_LORA_RANK)
    _positive(lora.alpha, f"{key}.alpha")
    _fraction(lora.dropout, f"{key}.dropout", closed=False)
    if not lora.targets or not all(lora.targets):
        raise LinspecError(f"recipe key {key}.targets: name at least one module, with no empty names")


def _check_optimizer(opt: Optimizer, key: str) -> None:
    """AdamW's own checks come too late (after loading) and miss a negative clip, which flips the update."""
    _positive(opt.lr, f"{key}.lr")
    _positive(opt.weight_decay, f"{key}.weight_decay", allow_zero=True)
    _positive(opt.eps, f"{key}.eps")
    _positive(opt.grad_clip, f"{key}.grad_clip")
    _positive(opt.memory_bias_lr, f"{key}.memory_bias_lr")
    if len(opt.betas) != 2:
        raise LinspecError(f"recipe key {key}.betas: expected two numbers")
    for j, beta in enumerate(opt.betas):
        _fraction(beta, f"{key}.betas[{j}]", closed=False)


def apply_override(data: dict, assignment: str) -> None:
    """``stages.1.optimizer.lr=2e-5`` sets that key in the raw recipe mapping; the value is parsed as YAML."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise LinspecError(f"override {assignment!r}: expected key=value, e.g. stages.0.steps=10")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as error:
        raise LinspecError(f"override {path:.60}: the value is not valid YAML ({_yaml_problem(error)})") from None
    if any(not part for part in path.split(".")):
        raise LinspecError(f"override {path:.60}: empty key between dots")
    *parents, last = path.split(".")
    node: Any = data
    walked = []
    for part in parents:
        walked.append(part)
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise LinspecError(f"override {path}: {'.'.join(walked)} is not an index of a {len(node)}-item list")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]  # an unknown key is named by the recipe check that follows
        if not isinstance(node, dict | list):
            raise LinspecError(f"override {path}: {'.'.join(walked)} is a value, not a section")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise LinspecError(f"override {path}: {last} is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value


def read_recipe_file(path: str | os.PathLike) -> tuple[Any, Path]:
    """``(parsed YAML, file)`` of a recipe file or a shipped recipe's name: size-capped, UTF-8, safe YAML only
    (tags like ``!!python`` are refused); every problem is one ``LinspecError``. Every recipe kind reads this way."""
    from linspec.train.catalog import resolve_recipe

    path = resolve_recipe(str(path))
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise LinspecError(f"{path}: {path.stat().st_size} bytes is too large for a recipe (at most 1 MiB)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, path
    except UnicodeDecodeError:
        raise LinspecError(f"{path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as error:
        raise LinspecError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None


def build_recipe(data: dict) -> Recipe:
    """A ``Recipe`` from its plain mapping, types checked and unknown keys refused (``validate`` checks the rest)."""
    return _build(Recipe, data, "")


def load_recipe(
    path: str | os.PathLike, overrides: list[str] = (), on_note: Callable[[str], None] | None = None
) -> Recipe:
    """Read ``path`` (a file, or a shipped recipe's name), apply ``key=value`` overrides, build and validate.

    A drafter recipe of the old format (top-level ``drafter:``) is translated into a recipe with one drafter stage
    (``linspec.train.legacy_drafter``): its overrides use its own keys and its errors name them; ``on_note`` hears
    one line saying so."""
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(item, str) for item in overrides):
        raise LinspecError(f"overrides: a list of 'key=value' strings, e.g. ['seed=1'], got {_shown(overrides)}")
    data, path = read_recipe_file(path)
    if not isinstance(data, dict):
        raise LinspecError(f"{path}: a recipe is a mapping of keys (base:, stages:, ...), got {_shown(data)}")
    for assignment in overrides:
        apply_override(data, assignment)
    if not is_legacy_recipe(data):
        return validate(build_recipe(data))
    try:
        recipe = validate(build_recipe(translate_recipe(data)))
    except LinspecError as error:
        raise old_key_names(error) from None
    if on_note is not None:  # only for a recipe that loads: a refusal stays one line
        on_note(f"{path} is a drafter recipe of the old format; read as a recipe with one drafter stage "
                "(--check prints it)")  # fmt: skip
    return recipe


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line from a YAML error: what went wrong and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def describe_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, type, comment)`` for every key, from the field comments in this file (for ``--help``)."""
    source = inspect.getsource(cls)
    comments = {}
    for line in source.splitlines():
        name, colon, rest = line.strip().partition(":")
        if colon and "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else []
        )
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            inner = [typing.get_args(tp)[0]]
            key += ".N"
        if inner:
            rows.append((key, "section", _first_paragraph(inner[0].__doc__ or "")))
            rows.extend(describe_keys(inner[0], key + "."))
        else:
            comment = comments.get(f.name, "")
            rows.append((key, _type_name(tp), comment if "default" in comment else comment + _default_text(f)))
    return rows


def _first_paragraph(doc: str) -> str:
    """A docstring's first paragraph on one line: ``--help`` shows whole sentences, not a cut first line."""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _default_text(f: dataclasses.Field) -> str:
    """`` (default: VALUE)`` as YAML would spell it, or `` (required)``."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return " (required)"
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f" (default: {text.removesuffix('...').strip()})"
