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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from linspec.config import DEFAULT_PRESET, PRESETS, LinspecConfig
from linspec.errors import LinspecError
from linspec.utils.paths import check_name
from linspec.utils.validation import check_number, check_seed

TRAINABLE = ("gamma", "conv", "embeddings", "norms", "lm_head", "feature_map", "all")
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
    """How the base model is linearised (docs/design.md §2); unset values come from the preset."""

    preset: str = DEFAULT_PRESET  # window (recommended), stable, paper (exact), decay, mean, normalized, elu
    group_size: int | None = None  # tokens per group G (paper: 64; default: the preset's)
    conv_taps: int | None = None  # causal depthwise-conv taps P (paper: 32; default: the preset's)
    feature_map: str | None = None  # φ for q/k: l2norm (paper), elu1, relu (default: the preset's)
    local_kernel: str | None = None  # relu2 (paper) or identity inside a group, softmax: a window (default: preset's)
    local_window: int | None = None  # tokens the softmax window covers (window preset: 512)
    sink_tokens: int | None = None  # first tokens the softmax window always sees (window preset: 4)
    sink_positions: str | None = None  # adjacent: sinks scored as if right before the window (window preset); absolute
    softmax_layers: list[int] | str = field(default_factory=list)  # layers kept softmax (a hybrid); auto:N measures
    softmax_heads: list[list[int]] = field(default_factory=list)  # [layer, kv head] pairs kept softmax (eval heads)

    def auto_layers(self):
        """``AutoLayers(N)`` for ``softmax_layers: auto:N`` (chosen by measurement when the run starts), else None."""
        from linspec.conversion.softmax_layers import AutoLayers, parse_softmax_layers

        layers = parse_softmax_layers(self.softmax_layers)
        return layers if isinstance(layers, AutoLayers) else None

    def settings(self) -> LinspecConfig:
        """The layer settings; with ``auto:N`` the softmax layers are left empty until ``train`` measures them."""
        from linspec.conversion.softmax_layers import AutoLayers, parse_softmax_layers

        overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}
        layers = parse_softmax_layers(self.softmax_layers)
        overrides["softmax_layers"] = () if isinstance(layers, AutoLayers) else layers
        return LinspecConfig.from_preset(self.preset, **overrides)


@dataclass
class Data:
    """Text in, packed token sequences out. Sources: a local .txt/.jsonl/.json/.parquet file or folder,
    ``builtin:NAME`` (wiki-en, wiki-en-eval: a Wikipedia sample fetched once into the linspec cache; sample: a
    few KB shipped with linspec), or ``hub:NAME[:CONFIG]`` (needs network)."""

    train: list[str] = field(default_factory=lambda: ["builtin:wiki-en"])  # training sources
    eval: str | None = "builtin:wiki-en-eval"  # held-out source; null: hold out eval_fraction of train documents
    eval_fraction: float = 0.05  # share of documents held out when eval is null
    text_field: str = "text"  # column holding the text in jsonl/parquet/hub data
    seq_len: int = 256  # tokens per packed training sequence
    max_documents: int | None = None  # use only the first N documents of each source (null: all)
    max_train_sequences: int | None = None  # cap on packed training sequences (null: all)
    max_eval_sequences: int = 64  # packed held-out sequences used for perplexity
    seed: int = 0  # shuffling seed (order of sequences in each epoch)
    chat: Chat | None = None  # the original model's own answers to instruction prompts, mixed in (null: none)
    recall: Recall | None = None  # text with facts stated far back and asked for at the end, mixed in (null: none)


@dataclass
class Chat:
    """Chat data: the original model's own answers to instruction prompts, mixed with the plain text.

    Prompts are built from a corpus, answered once by the original model in its chat template and cached on disk.
    Distilling on them keeps an instruct model an instruct model; plain text alone restores language modelling
    but not instruction following."""

    prompts: str = "builtin:wiki-en"  # corpus the instruction prompts are built from (never the eval source)
    num_prompts: int = 128  # prompts answered by the original model (once; cached)
    max_new_tokens: int = 128  # length limit of each answer
    temperature: float = 0.0  # 0: greedy answers; > 0: sampled at this temperature
    seed: int = 0  # which paragraphs become prompts, and the sampling seed
    batch_size: int = 16  # prompts answered together while generating
    ratio: float = 0.25  # share of training sequences taken from the chat data (the rest: data.train)


@dataclass
class Recall:
    """Recall data: training text with short facts ("The code for the red fox is 40213.") inserted at random
    depths and all of them restated, in another order, at the end.

    Plain text rarely makes a model fetch an exact token from thousands of tokens back, so distillation on it
    never asks a hybrid's softmax layers to retrieve past the linear layers' window. Restating the facts does:
    each code's digits can only come from its first statement, and the teacher's logits there are retrieval."""

    ratio: float = 0.1  # share of training sequences that are recall sequences (taken from the plain-text share)
    facts: int = 8  # facts per sequence (fewer in short sequences: at most one per 128 tokens)
    seed: int = 0  # which labels and codes, and where they go


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


@dataclass
class Schedule:
    """Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to min_lr_ratio × lr."""

    name: Literal["constant", "cosine", "linear"] = "cosine"  # shape after warm-up
    warmup_steps: int = 0  # steps of linear warm-up from 0
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, linear)


def _gamma_conv() -> list[str]:
    return ["gamma", "conv"]


@dataclass
class Stage:
    """One training stage. kind: attention_transfer (stage 1: per-layer MSE between the frozen softmax output
    and the linear output), lora (stage 2: LoRA via peft), full (every parameter trains)."""

    name: str = ""  # label in logs, checkpoints and metrics (default: the kind)
    kind: Literal["attention_transfer", "lora", "full"] = "lora"  # what trains and against what
    steps: int = 100  # optimiser steps
    batch_size: int = 8  # sequences per optimiser step, across all processes
    micro_batch_size: int = 1  # sequences per forward pass per process (gradient accumulation fills the rest)
    loss: Literal["next_token", "distill", "mse"] = "next_token"  # lora/full: next_token or distill; transfer: mse
    distill_temperature: float = 1.0  # softmax temperature of the KL to the teacher's logits
    trainable: list[str] = field(default_factory=_gamma_conv)  # gamma conv embeddings norms lm_head feature_map all
    lora: Lora | None = None  # adapter for this stage (null: none)
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
    """A full training run, from base checkpoint to a linspec model directory at OUTPUT/model."""

    base: str = "smollm2-135m"  # base checkpoint: HF dir, hub id, .gguf file or a demo name
    output: str = "runs/linspec"  # run directory: model/, checkpoints/, stages/, metrics.jsonl, loss.png
    conversion: Conversion = field(default_factory=Conversion)
    data: Data = field(default_factory=Data)
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
    if recipe.conversion.preset not in PRESETS:
        raise LinspecError(f"recipe key conversion.preset: expected one of {', '.join(PRESETS)}")
    try:
        recipe.conversion.auto_layers()
    except LinspecError as error:
        raise LinspecError(f"recipe key conversion.softmax_layers: {error}") from None
    try:
        recipe.conversion.settings()
    except LinspecError as error:
        raise LinspecError(f"recipe key conversion: {error}") from None
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
        _check_source(source, f"data.train[{i}]")
    if data.eval is not None:
        _check_source(data.eval, "data.eval")
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
    if not recipe.stages:
        raise LinspecError("recipe key stages: at least one stage is needed")
    names = set()
    for i, stage in enumerate(recipe.stages):
        key = f"stages[{i}]"
        stage.name = check_name(stage.name or stage.kind, f"recipe key {key}.name")  # it becomes stages/<name>
        if stage.name in names:
            raise LinspecError(f"recipe key {key}.name: duplicate stage name {stage.name!r}")
        names.add(stage.name)
        _positive(stage.steps, f"{key}.steps", limit=MAX_STEPS)
        for name in ("batch_size", "micro_batch_size"):
            _positive(getattr(stage, name), f"{key}.{name}", limit=MAX_BATCH)
        if stage.batch_size % stage.micro_batch_size:
            raise LinspecError(f"recipe key {key}.batch_size: must be a multiple of micro_batch_size")
        if stage.kind == "attention_transfer" and stage.loss != "mse":
            if stage.loss != "next_token":  # next_token is the field default; anything else is a mistake
                raise LinspecError(f"recipe key {key}.loss: attention_transfer trains with mse, got {stage.loss!r}")
            stage.loss = "mse"
        if stage.kind != "attention_transfer" and stage.loss == "mse":
            raise LinspecError(f"recipe key {key}.loss: mse is for attention_transfer; use next_token or distill")
        for j, name in enumerate(stage.trainable):
            if name not in TRAINABLE:
                raise LinspecError(f"recipe key {key}.trainable[{j}]: expected one of {', '.join(TRAINABLE)}")
        if stage.kind == "lora" and stage.lora is None:
            raise LinspecError(f"recipe key {key}.lora: a lora stage needs a lora section")
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


def _check_chat(chat: Chat, data: Data) -> None:
    _check_source(chat.prompts, "data.chat.prompts")
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
    if len(opt.betas) != 2:
        raise LinspecError(f"recipe key {key}.betas: expected two numbers")
    for j, beta in enumerate(opt.betas):
        _fraction(beta, f"{key}.betas[{j}]", closed=False)


def _check_source(source: str, key: str) -> None:
    if source.startswith("builtin:"):
        from linspec.data.corpus import BUILTIN

        if source[len("builtin:") :] not in BUILTIN:
            raise LinspecError(f"recipe key {key}: unknown builtin {source!r}; known: {', '.join(BUILTIN)}")
    elif source.startswith("hub:"):
        if not source[4:]:
            raise LinspecError(f"recipe key {key}: hub: needs a dataset name")
    elif not Path(source).expanduser().exists():
        raise LinspecError(f"recipe key {key}: file not found: {source}")
    else:
        from linspec.data.documents import local_files

        try:
            local_files(source)
        except LinspecError as error:
            raise LinspecError(f"recipe key {key}: {error}") from None


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


def build_recipe(cls: type, path: str | os.PathLike, overrides: list[str], example_keys: str) -> Any:
    """Read ``path``, apply ``key=value`` overrides and build the dataclass ``cls`` from it (types checked, unknown
    keys refused); every recipe kind loads this way and then runs its own ``validate``."""
    data, path = read_recipe_file(path)
    if not isinstance(data, dict):
        raise LinspecError(f"{path}: a recipe is a mapping of keys ({example_keys}), got {_shown(data)}")
    for assignment in overrides:
        apply_override(data, assignment)
    return _build(cls, data, "")


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read ``path`` (a file, or a shipped recipe's name), apply ``key=value`` overrides, build and validate."""
    return validate(build_recipe(Recipe, path, overrides, "base:, stages:, ..."))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line from a YAML error: what went wrong and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


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
