"""Hostile inputs: every command and the public Python API against a catalogue of bad input.

Each CLI row runs ``linspec.cli.main`` in-process (cwd: a fresh sandbox) and asserts what a user should see
from any bad input: exit code 2, exactly one short ``linspec ...: error:`` line and no traceback, nothing
created, changed or deleted in the sandbox, the fixture files or the repository's docs, and no code run from
data (the booby-trapped pickles never create their canary). Each API row asserts one ``LinspecError`` with a
one-line message. Interrupted runs and concurrent writers need real processes and have their own tests in
``test_hostile_processes.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_world import CANARY

from linspec.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_LINE = 400


pytestmark = pytest.mark.usefixtures("private_cache")


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # one string, split on spaces; {name} is a fixture file, {sandbox} the case's working directory
    fragment: str  # must appear in the error line
    setup: Callable[[Path], None] | None = None


def _mkdir(*names: str) -> Callable[[Path], None]:
    def setup(sandbox: Path) -> None:
        for name in names:
            (sandbox / name).mkdir(parents=True)
            (sandbox / name / "notes.txt").write_text("mine")

    return setup


def _long_prompt(sandbox: Path) -> None:
    (sandbox / "long.txt").write_text("word " * 6000)


def _outside(sandbox: Path) -> Path:
    """A folder beside the run that a planted link points into; the suite checks it is left as it was."""
    outside = sandbox / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "precious.txt").write_text("keep me")
    return outside


def _run_with_link(marker: str, link: str, *, to_file: bool = False) -> Callable[[Path], None]:
    """A run directory ``run`` (``marker`` marks it as a run) whose entry ``link`` is a symbolic link out of it."""

    def setup(sandbox: Path) -> None:
        outside = _outside(sandbox)
        (sandbox / "run").mkdir()
        (sandbox / "run" / marker).write_text("{}\n")
        (sandbox / "run" / link).symlink_to(outside / "precious.txt" if to_file else outside)

    return setup


def _run_file(name: str, text: str) -> Callable[[Path], None]:
    def setup(sandbox: Path) -> None:
        (sandbox / "run").mkdir()
        (sandbox / "run" / name).write_text(text)

    return setup


def _link(name: str, target: str) -> Callable[[Path], None]:
    def setup(sandbox: Path) -> None:
        _outside(sandbox)
        (sandbox / name).symlink_to(sandbox / target)

    return setup


def _dir(name: str) -> Callable[[Path], None]:
    return lambda sandbox: (sandbox / name).mkdir(parents=True)


HUGE = str(2**70)

# fmt: off
CONVERT = [
    Case("group-size-zero", "convert {base} out --group-size 0", "group_size must be an integer in 1.."),
    Case("group-size-negative", "convert {base} out --group-size -3", "group_size must be an integer in 1.."),
    Case("group-size-absurd", "convert {base} out --group-size 1000000000", "group_size must be an integer in 1.."),
    Case("group-size-text", "convert {base} out --group-size eight", "invalid int value"),
    Case("group-size-float", "convert {base} out --group-size 8.5", "invalid int value"),
    Case("conv-taps-absurd", "convert {base} out --conv-taps 100000000", "conv_taps must be an integer in 1.."),
    Case("conv-taps-zero", "convert {base} out --conv-taps 0", "conv_taps must be an integer in 1.."),
    Case("group-past-positions", "convert {small-positions} out --group-size 512", "larger than the model's 256"),
    Case("softmax-reversed", "convert {base} out --softmax-layers 3-1", "reversed"),
    Case("softmax-huge-range", "convert {base} out --softmax-layers 0-5000000", "past any model"),
    Case("softmax-out-of-range", "convert {base} out --softmax-layers 7", "out of range"),
    Case("softmax-negative", "convert {base} out --softmax-layers=-1", "expected layer indices"),
    Case("softmax-letters", "convert {base} out --softmax-layers a,b", "expected layer indices"),
    Case("softmax-open-range", "convert {base} out --softmax-layers 1-", "expected layer indices"),
    Case("softmax-only-commas", "convert {base} out --softmax-layers ,,", "expected layer indices"),
    Case("heads-letters", "convert {base} out --softmax-heads a:b", "expected layer:kv-head pairs"),
    Case("heads-no-head", "convert {base} out --softmax-heads 1", "expected layer:kv-head pairs"),
    Case("heads-kv-out-of-range", "convert {base} out --softmax-heads 0:9", "kv heads per layer"),
    Case("heads-layer-out-of-range", "convert {base} out --softmax-heads 9:0", "out of range"),
    Case("heads-in-softmax-layer", "convert {base} out --softmax-layers 1 --softmax-heads 1:0", "already is"),
    Case("heads-auto-without-data", "convert {base} out --softmax-heads auto:2", "needs --data"),
    Case("preset-unknown", "convert {base} out --preset fast", "invalid choice"),
    Case("feature-map-unknown", "convert {base} out --feature-map softmax", "feature_map must be one of"),
    Case("local-kernel-unknown", "convert {base} out --preset paper --local-kernel cubic",
         "local_kernel must be one of"),
    Case("weights-of-another-shape", "convert {wrong-shape} out", "q_proj.weight (stored [67, 64], config.json makes"),
    Case("local-kernel-unknown-windowed", "convert {base} out --local-kernel cubic", "local_kernel must be one of"),
    Case("text-field-without-data", "convert {base} out --text-field body", "give --data too"),
    Case("data-without-auto", "convert {base} out --data {text.txt}", "add --softmax-layers auto:N"),
    Case("sink-positions-unknown", "convert {base} out --preset window --sink-positions x", "sink_positions must be"),
    Case("sink-positions-without-window", "convert {base} out --preset paper --sink-positions adjacent",
         "belong to local_kernel"),
    Case("dtype-unknown", "convert {base} out --dtype float8", "dtype must be auto or one of"),
    Case("shard-size-garbage", "convert {base} out --max-shard-size lots", "expected a size"),
    Case("shard-size-bits", "convert {base} out --max-shard-size 2Gb0", "expected a size"),
    Case("unknown-flag", "convert {base} out --grop-size 8", "unrecognized arguments"),
    Case("missing-out", "convert {base}", "required"),
    Case("src-missing", "convert {sandbox}/nope out", "no such file or directory"),
    Case("src-local-typo-not-hub", "convert outdir/modle out", "no such file or directory", _mkdir("outdir")),
    Case("src-empty-dir", "convert {empty-dir} out", "no config.json"),
    Case("src-a-file", "convert {a-file} out", "neither a model directory nor a .gguf file"),
    Case("src-config-list", "convert {config-list} out", "holds a JSON list"),
    Case("src-config-binary", "convert {config-binary} out", "not valid JSON"),
    Case("src-config-no-type", "convert {config-no-type} out", "unsupported architecture"),
    Case("src-config-truncated", "convert {config-torn} out", "not valid JSON"),
    Case("src-truncated-weights", "convert {truncated} out", "truncated"),
    Case("src-header-bomb", "convert {header-bomb} out", "truncated or not a safetensors file"),
    Case("src-header-not-json", "convert {header-not-json} out", "corrupt safetensors header"),
    Case("src-index-missing-shard", "convert {index-missing-shard} out", "is missing"),
    Case("src-index-garbage", "convert {index-garbage} out", "not a valid safetensors index"),
    Case("src-pickle-refused", "convert {pickle-evil} out", "--allow-pickle"),
    Case("src-pickle-allowed-but-evil", "convert {pickle-evil} out --allow-pickle", "holds objects other than tensors"),
    Case("src-gguf-only-dir", "convert {gguf-only} out", "only GGUF"),
    Case("src-no-weights", "convert {no-weights} out", "holds no model weights"),
    Case("src-unsupported", "convert {gpt2} out", "unsupported architecture 'gpt2'"),
    Case("src-fake-gguf", "convert {fake.gguf} out", "not a GGUF file"),
    Case("src-truncated-gguf", "convert {truncated.gguf} out", "GGUF"),
    Case("src-already-linspec", "convert {linspec} out", "already a linspec model"),
    Case("out-exists", "convert {base} mine", "already exists; pass --force", _mkdir("mine")),
    Case("out-exists-not-a-model-even-forced", "convert {base} mine --force", "refusing to replace", _mkdir("mine")),
    Case("out-is-a-file", "convert {base} {a-file} --force", "not a directory"),
    Case("out-precious-dir-forced", "convert {base} {victim} --force", "refusing to replace"),
]

GENERATE = [
    Case("chat-draft-unknown", "chat {linspec} --draft telepathy", "telepathy"),
    Case("chat-command-temperature-negative", "chat {linspec} --do-sample --temperature -1", "temperature"),
    Case("prompt-empty", "generate {linspec} --prompt=", "--prompt is empty"),
    Case("prompt-blank", "generate {linspec} --prompt=\u2003", "--prompt is empty"),
    Case("prompt-missing", "generate {linspec}", "--prompt"),
    Case("max-new-zero", "generate {linspec} --prompt hi --max-new-tokens 0", "--max-new-tokens must be in"),
    Case("max-new-negative", "generate {linspec} --prompt hi --max-new-tokens -5", "--max-new-tokens must be in"),
    Case("max-new-absurd", "generate {linspec} --prompt hi --max-new-tokens 1000000000000", "--max-new-tokens"),
    Case("max-new-past-positions", "generate {linspec} --prompt hi --max-new-tokens 5000", "4096 positions"),
    Case("draft-unknown", "generate {linspec} --prompt hi --draft hydra", "--draft must be one of"),
    Case("drafter-missing-flag", "generate {linspec} --prompt hi --draft medusa", "needs --drafter DIR"),
    Case("drafter-ignored", "generate {linspec} --prompt hi --drafter {drafter-for-base}", "only applies to --draft"),
    Case("drafter-no-dir", "generate {linspec} --prompt hi --draft eagle --drafter {sandbox}/none", "no such dir"),
    Case("drafter-not-a-drafter", "generate {linspec} --prompt hi --draft medusa --drafter {empty-dir}", "no drafter"),
    Case("drafter-other-target", "generate {linspec} --prompt hi --draft medusa --drafter {drafter-for-base}",
         "trained for another target"),
    Case("drafter-other-kind", "generate {base} --prompt hi --draft eagle --drafter {drafter-for-base}",
         "is a medusa drafter, not eagle"),
    Case("drafter-too-deep", "generate {base} --prompt hi --draft medusa --drafter {drafter-for-base} "
         "--num-draft-tokens 3", "drafts 1..2 tokens per round"),
    Case("drafter-confidence-one", "generate {base} --prompt hi --draft medusa --drafter {drafter-for-base} "
         "--min-confidence 1", "--min-confidence must be in [0, 1)"),
    Case("drafter-confidence-ignored", "generate {base} --prompt hi --draft lookup --min-confidence 0.5",
         "only applies to --draft medusa"),
    Case("lookup-first-not-trained", "generate {base} --prompt hi --draft lookup --lookup-first",
         "--lookup-first only applies to --draft medusa"),
    Case("max-ngram-without-lookup-first", "generate {base} --prompt hi --draft medusa --drafter {drafter-for-base} "
         "--max-ngram 2", "--max-ngram applies to a trained drafter only with --lookup-first"),
    Case("drafter-tree-absurd", "generate {base} --prompt hi --draft medusa --drafter {drafter-for-base} "
         "--tree-width 999", "--tree-width must be an integer in 1..256"),
    Case("draft-model-without-path", "generate {linspec} --prompt hi --draft model", "needs --draft-model"),
    Case("draft-model-path-ignored", "generate {linspec} --prompt hi --draft-model {base}", "only applies to --draft"),
    Case("exit-layer-ignored", "generate {linspec} --prompt hi --exit-layer 1", "only applies to --draft early-exit"),
    Case("early-exit-no-layer", "generate {linspec} --prompt hi --draft early-exit", "needs --exit-layer"),
    Case("early-exit-layer-zero", "generate {linspec} --prompt hi --draft early-exit --exit-layer 0", "--exit-layer"),
    Case("early-exit-too-deep", "generate {linspec} --prompt hi --draft early-exit --exit-layer 9", "below the model"),
    Case("draft-depth-zero", "generate {linspec} --prompt hi --draft lookup --num-draft-tokens 0", "in 1..256"),
    Case("draft-depth-absurd", "generate {linspec} --prompt hi --draft lookup --num-draft-tokens 99999", "1..256"),
    Case("draft-depth-ignored", "generate {linspec} --prompt hi --num-draft-tokens 4", "only applies to --draft"),
    Case("tree-width-zero", "generate {linspec} --prompt hi --draft lookup --tree-width 0", "--tree-width"),
    Case("tree-width-ignored", "generate {linspec} --prompt hi --tree-width 3", "only applies to --draft"),
    Case("max-ngram-zero", "generate {linspec} --prompt hi --draft lookup --max-ngram 0", "--max-ngram"),
    Case("max-ngram-not-lookup", "generate {linspec} --prompt hi --draft model --draft-model {linspec} --max-ngram 2",
         "--max-ngram only applies to --draft lookup"),
    Case("tree-nodes-zero", "generate {linspec} --prompt hi --draft lookup --max-tree-nodes 0", "--max-tree-nodes"),
    Case("temperature-without-sampling", "generate {linspec} --prompt hi --temperature 0.7", "with --do-sample"),
    Case("top-k-without-sampling", "generate {linspec} --prompt hi --top-k 5", "only applies with --do-sample"),
    Case("seed-without-sampling", "generate {linspec} --prompt hi --seed 1", "only applies with --do-sample"),
    Case("temperature-nan", "generate {linspec} --prompt hi --do-sample --temperature nan", "temperature must be >= 0"),
    Case("temperature-negative", "generate {linspec} --prompt hi --do-sample --temperature -1", "must be >= 0"),
    Case("temperature-inf", "generate {linspec} --prompt hi --do-sample --temperature inf", "must be finite"),
    Case("top-p-zero", "generate {linspec} --prompt hi --do-sample --top-p 0", "top_p must be in (0, 1]"),
    Case("top-p-above-one", "generate {linspec} --prompt hi --do-sample --top-p 1.5", "top_p must be in (0, 1]"),
    Case("top-k-negative", "generate {linspec} --prompt hi --do-sample --top-k -1", "top_k must be a non-negative"),
    Case("model-missing", "generate {sandbox}/none --prompt hi", "no such file or directory"),
    Case("model-without-tokenizer", "generate {small-positions} --prompt hi", "no tokenizer"),
    Case("model-corrupt", "generate {truncated} --prompt hi", "truncated"),
    Case("model-crafted-config", "generate {linspec-crafted} --prompt hi", "group_size must be an integer in 1.."),
    Case("draft-model-missing", "generate {linspec} --prompt hi --draft model --draft-model {sandbox}/no",
         "no such file"),
    Case("draft-model-other-vocabulary", "generate {linspec} --prompt hi --draft model --draft-model {small-positions}",
         "not the same tokenizer"),
]

TRAIN = [
    Case("drafter-kind-unknown", "train {drafter.yaml} stages.0.drafter.kind=hydra", "drafter.kind: expected one of"),
    Case("drafter-depth-zero", "train {drafter.yaml} stages.0.drafter.depth=0", "drafter.depth: must be in 1..16"),
    Case("drafter-depth-absurd", "train {drafter.yaml} stages.0.drafter.depth=99", "drafter.depth: must be in 1..16"),
    Case("drafter-vocab-zero", "train {drafter.yaml} stages.0.drafter.draft_vocab=0", "draft_vocab: must be > 0"),
    Case("drafter-key-unknown", "train {drafter.yaml} stages.0.drafter.heads=3", "drafter.heads: unknown key"),
    Case("drafter-prompts-missing", "train {drafter.yaml} stages.0.drafter.data.prompts={sandbox}/none.txt",
         "data.prompts: file not"),
    Case("drafter-text-missing",
         "train {drafter.yaml} stages.0.drafter.data.text={sandbox}/none.txt stages.0.drafter.data.text_tokens=64",
         "data.text: file not"),
    Case("drafter-text-tokens-negative", "train {drafter.yaml} stages.0.drafter.data.text_tokens=-5",
         "data.text_tokens: must be >= 0"),
    Case("drafter-text-length-one", "train {drafter.yaml} stages.0.drafter.data.text_length=1",
         "data.text_length: must be at least 2"),
    Case("drafter-steps-negative", "train {drafter.yaml} stages.0.steps=-1", "steps: must be > 0"),
    Case("drafter-lr-nan", "train {drafter.yaml} stages.0.optimizer.lr=nan", "must be a finite number"),
    Case("drafter-lora", "train {drafter.yaml} stages.0.lora={r: 4}", "lora"),
    Case("drafter-base-missing", "train {drafter.yaml} output={sandbox}/run base={sandbox}/none", "none"),
    # an old-format drafter recipe is translated; its errors still name its own keys, in one line
    Case("drafter-old-kind-unknown", "train {drafter-old-format.yaml} drafter.kind=hydra", "drafter.kind: expected"),
    Case("drafter-old-steps-negative", "train {drafter-old-format.yaml} train.steps=-1", "train.steps: must be > 0"),
    Case("stage-name-absolute", "train {recipe.yaml} output={sandbox}/run stages.0.name={victim}", "not a plain name"),
    Case("stage-name-climbs", "train {recipe.yaml} output={sandbox}/run stages.0.name=../../escaped", "not a plain"),
    Case("stage-name-hidden", "train {recipe.yaml} output={sandbox}/run stages.0.name=.git", "not a plain name"),
    Case("stage-name-slash", "train {recipe.yaml} output={sandbox}/run stages.0.name=a/b", "not a plain name"),
    Case("stage-name-long", "train {recipe.yaml} output={sandbox}/run stages.0.name=" + "n" * 200, "not a plain"),
    Case("stage-name-number", "train {recipe.yaml} output={sandbox}/run stages.0.name=12", "expected str"),
    Case("stage-name-dot", "train {recipe.yaml} output={sandbox}/run stages.0.name=..", "not a plain name"),
    Case("record-bench-climbs", "train {recipe.yaml} output={sandbox}/run --record-bench ../../x", "--record-bench"),
    Case("record-bench-absolute", "train {recipe.yaml} output={sandbox}/run --record-bench /tmp/x", "--record-bench"),
    Case("resume-and-force", "train {recipe.yaml} output={sandbox}/run --resume --force", "pass one of them"),
    Case("grad-clip-negative", "train {recipe.yaml} stages.0.optimizer.grad_clip=-1", "grad_clip: must be > 0"),
    Case("grad-clip-zero", "train {recipe.yaml} stages.0.optimizer.grad_clip=0", "grad_clip: must be > 0"),
    Case("lr-nan", "train {recipe.yaml} stages.0.optimizer.lr=nan", "must be a finite number"),
    Case("lr-yaml-nan", "train {recipe.yaml} stages.0.optimizer.lr=.nan", "must be a finite number"),
    Case("lr-inf", "train {recipe.yaml} stages.0.optimizer.lr=.inf", "must be a finite number"),
    Case("lr-negative", "train {recipe.yaml} stages.0.optimizer.lr=-1e-3", "lr: must be > 0"),
    Case("lr-bool", "train {recipe.yaml} stages.0.optimizer.lr=true", "expected float"),
    Case("lr-text", "train {recipe.yaml} stages.0.optimizer.lr=fast", "expected float"),
    Case("min-lr-ratio-negative", "train {recipe.yaml} stages.0.schedule.min_lr_ratio=-5", "min_lr_ratio"),
    Case("min-lr-ratio-above-one", "train {recipe.yaml} stages.0.schedule.min_lr_ratio=2", "min_lr_ratio"),
    Case("betas-above-one", "train {recipe.yaml} stages.0.optimizer.betas=[1.5,0.9]", "betas[0]"),
    Case("betas-one-value", "train {recipe.yaml} stages.0.optimizer.betas=[0.9]", "expected two numbers"),
    Case("eps-zero", "train {recipe.yaml} stages.0.optimizer.eps=0", "eps: must be > 0"),
    Case("weight-decay-negative", "train {recipe.yaml} stages.0.optimizer.weight_decay=-1", "weight_decay"),
    Case("warmup-negative", "train {recipe.yaml} stages.0.schedule.warmup_steps=-1", "warmup_steps"),
    Case("schedule-unknown", "train {recipe.yaml} stages.0.schedule.name=exponential", "expected one of"),
    Case("steps-absurd", "train {recipe.yaml} stages.0.steps=1000000000000", "steps: must be at most"),
    Case("steps-float", "train {recipe.yaml} stages.0.steps=2.5", "expected int"),
    Case("batch-zero", "train {recipe.yaml} stages.0.batch_size=0", "batch_size: must be > 0"),
    Case("batch-absurd", "train {recipe.yaml} stages.0.batch_size=10000000", "batch_size: must be at most"),
    Case("micro-batch-uneven", "train {recipe.yaml} stages.0.micro_batch_size=3", "multiple of micro_batch_size"),
    Case("seq-len-zero", "train {recipe.yaml} data.seq_len=0", "seq_len: must be > 0"),
    Case("seq-len-absurd", "train {recipe.yaml} data.seq_len=1000000000", "seq_len: must be at most"),
    Case("eval-fraction-one", "train {recipe.yaml} data.eval_fraction=1", "eval_fraction"),
    Case("curriculum-not-a-list", "train {recipe.yaml} stages.0.curriculum=256", "curriculum: expected a list"),
    Case("curriculum-pair-list", "train {recipe.yaml} stages.0.curriculum=[[256,2]]", "expected a mapping"),
    Case("curriculum-unknown-key", "train {recipe.yaml} stages.0.curriculum=[{\"len\":8}]", "unknown key"),
    Case("curriculum-seq-len-zero", "train {recipe.yaml} stages.0.curriculum=[{\"seq_len\":0}]", "must be > 0"),
    Case("curriculum-seq-len-one", "train {recipe.yaml} stages.0.curriculum=[{\"seq_len\":1}]", "at least 2 tokens"),
    Case("curriculum-seq-len-absurd", "train {recipe.yaml} stages.0.curriculum=[{\"seq_len\":1000000000}]", "at most"),
    Case("curriculum-steps-zero", "train {recipe.yaml} stages.0.curriculum=[{\"steps\":0}]", "steps: must be > 0"),
    Case("curriculum-steps-sum", "train {recipe.yaml} stages.0.curriculum=[{\"steps\":1}]", "add up to 1 steps"),
    Case("curriculum-checkpointing-text", "train {recipe.yaml} stages.0.curriculum=[{\"gradient_checkpointing\":x}]",
         "expected bool"),
    Case("chat-not-a-mapping", "train {recipe.yaml} data.chat=5", "data.chat: expected a mapping"),
    Case("chat-unknown-key", "train {recipe.yaml} data.chat.prompt=x", "unknown key"),
    Case("chat-ratio-one", "train {recipe.yaml} data.chat.ratio=1", "ratio: must be in (0, 1)"),
    Case("chat-ratio-nan", "train {recipe.yaml} data.chat.ratio=.nan", "finite"),
    Case("chat-prompts-zero", "train {recipe.yaml} data.chat.num_prompts=0", "num_prompts: must be > 0"),
    Case("chat-prompts-absurd", "train {recipe.yaml} data.chat.num_prompts=1000000000", "at most"),
    Case("chat-tokens-zero", "train {recipe.yaml} data.chat.max_new_tokens=0", "max_new_tokens: must be > 0"),
    Case("chat-temperature-negative", "train {recipe.yaml} data.chat.temperature=-1", "temperature: must be >= 0"),
    Case("chat-batch-zero", "train {recipe.yaml} data.chat.batch_size=0", "batch_size: must be > 0"),
    Case("chat-prompts-missing", "train {recipe.yaml} data.chat.prompts={sandbox}/none.txt", "file not found"),
    Case("chat-prompts-unknown-builtin", "train {recipe.yaml} data.chat.prompts=builtin:nope", "unknown builtin"),
    Case("recall-not-a-mapping", "train {recipe.yaml} data.recall=5", "data.recall: expected a mapping"),
    Case("recall-ratio-one", "train {recipe.yaml} data.recall.ratio=1", "recall.ratio: must be in (0, 1)"),
    Case("recall-ratio-nan", "train {recipe.yaml} data.recall.ratio=.nan", "finite"),
    Case("recall-facts-zero", "train {recipe.yaml} data.recall.facts=0", "facts: must be > 0"),
    Case("recall-facts-absurd", "train {recipe.yaml} data.recall.facts=100000", "at most"),
    Case("recall-and-chat-leave-no-text", "train {recipe.yaml} data.recall.ratio=0.5 data.chat.ratio=0.5",
         "must leave room for plain text"),
    Case("chat-prompts-are-eval", "train {recipe.yaml} data.eval=builtin:sample data.chat.prompts=builtin:sample",
         "must not be the held-out source"),
    Case("text-field-empty", "train {recipe.yaml} data.text_field=''", "text_field: empty"),
    Case("train-output-model-not-a-run", "train {recipe.yaml} output={sandbox}/R",
         "not a linspec run (model)", setup=_mkdir("R/model")),
    Case("train-output-model-not-a-run-forced", "train {recipe.yaml} output={sandbox}/R --force",
         "not a linspec run (model)", setup=_mkdir("R/model")),
    Case("train-output-stages-not-a-run", "train {recipe.yaml} output={sandbox}/R",
         "not a linspec run (stages)", setup=_mkdir("R/stages/lora")),
    Case("train-data-empty-list", "train {recipe.yaml} data.train=[]", "at least one training source"),
    Case("train-data-missing", "train {recipe.yaml} data.train=[{sandbox}/none.txt]", "file not found"),
    Case("train-data-empty-file", "train {recipe.yaml} data.train=[{empty.txt}]", "empty"),
    Case("train-data-binary", "train {recipe.yaml} data.train=[{binary.txt}]", "not UTF-8 text"),
    Case("train-data-unknown-builtin", "train {recipe.yaml} data.train=[builtin:nope]", "unknown builtin"),
    Case("train-data-hub-empty", "train {recipe.yaml} data.train=['hub:']", "needs a dataset name"),
    Case("lora-rank-zero", "train {recipe.yaml} stages.0.lora.r=0", "lora.r: must be > 0"),
    Case("lora-rank-absurd", "train {recipe.yaml} stages.0.lora.r=100000000", "lora.r: must be at most"),
    Case("lora-dropout-one", "train {recipe.yaml} stages.0.lora.dropout=1", "lora.dropout"),
    Case("lora-alpha-nan", "train {recipe.yaml} stages.0.lora.alpha=.nan", "finite"),
    Case("lora-no-targets", "train {recipe.yaml} stages.0.lora.targets=[]", "name at least one module"),
    Case("distill-temperature-zero", "train {recipe.yaml} stages.0.distill_temperature=0", "distill_temperature"),
    Case("trainable-unknown", "train {recipe.yaml} stages.0.trainable=[everything]", "trainable[0]"),
    Case("checkpoint-keep-zero", "train {recipe.yaml} checkpoint.keep=0", "checkpoint.keep"),
    Case("threads-zero", "train {recipe.yaml} threads=0", "threads: must be > 0"),
    Case("threads-absurd", "train {recipe.yaml} threads=1000000", "threads: must be at most"),
    Case("conversion-group-absurd", "train {recipe.yaml} conversion.group_size=1000000000",
         "group_size must be an integer in 1.."),
    Case("conversion-conv-absurd", "train {recipe.yaml} conversion.conv_taps=100000000",
         "conv_taps must be an integer in 1.."),
    Case("conversion-layers-negative", "train {recipe.yaml} conversion.softmax_layers=[-1]", "softmax_layers"),
    Case("conversion-layers-text", "train {recipe.yaml} conversion.softmax_layers=abc",
         "conversion.softmax_layers: expected layer indices like '0,5-7' or auto:N"),
    Case("conversion-layers-auto-zero", "train {recipe.yaml} conversion.softmax_layers=auto:0", "auto:N with N >= 1"),
    Case("conversion-layers-reversed", "train {recipe.yaml} conversion.softmax_layers=5-1", "is reversed"),
    Case("conversion-heads-not-pairs", "train {recipe.yaml} conversion.softmax_heads=[[1]]", "softmax_heads"),
    Case("conversion-heads-text", "train {recipe.yaml} conversion.softmax_heads=abc", "softmax_heads"),
    Case("precision-unknown", "train {recipe.yaml} precision=fp8", "expected one of"),
    Case("device-unknown", "train {recipe.yaml} device=tpu", "expected one of"),
    Case("override-broken-yaml", "train {recipe.yaml} seed=[1", "not valid YAML"),
    Case("override-wrong-type", "train {recipe.yaml} seed=abc", "expected int"),
    Case("override-unknown-key", "train {recipe.yaml} sed=1", "unknown key"),
    Case("override-no-equals", "train {recipe.yaml} seed", "expected key=value"),
    Case("override-empty-key", "train {recipe.yaml} =5", "expected key=value"),
    Case("override-empty-part", "train {recipe.yaml} stages..steps=1", "empty key"),
    Case("override-bad-index", "train {recipe.yaml} stages.9.steps=1", "not an index"),
    Case("override-index-word", "train {recipe.yaml} stages.first.steps=1", "not an index"),
    Case("override-into-set-value", "train {recipe.yaml} data.seq_len.x=1", "is a value, not a section"),
    Case("override-into-value", "train {recipe.yaml} seed.x=1", "seed: expected int"),
    Case("base-empty", "train {recipe.yaml} base=''", "recipe key base: empty"),
    Case("base-missing-file", "train {recipe.yaml} base=./missing.gguf", "file not found"),
    Case("output-is-a-file", "train {recipe.yaml} output={a-file}", "not a directory"),
    Case("output-not-a-run", "train {recipe.yaml} output={victim}", "not a linspec run"),
    Case("output-not-a-run-forced", "train {recipe.yaml} output={victim} --force", "not a linspec run"),
    Case("recipe-missing", "train {sandbox}/none.yaml", "recipe not found"),
    Case("recipe-is-dir", "train {empty-dir}", "recipe not found"),
    Case("recipe-scalar", "train {recipe-scalar.yaml}", "a recipe is a mapping"),
    Case("recipe-list", "train {recipe-list.yaml}", "a recipe is a mapping"),
    Case("recipe-broken-yaml", "train {recipe-broken.yaml}", "not valid YAML"),
    Case("recipe-binary", "train {recipe-binary.yaml}", "not a text file"),
    Case("recipe-huge", "train {recipe-huge.yaml}", "too large for a recipe"),
    Case("recipe-python-tag", "train {recipe-python-tag.yaml}", "not valid YAML"),
    Case("recipe-empty", "train {recipe-empty.yaml}", "at least one"),
    Case("recipe-check-still-validates", "train {recipe.yaml} stages.0.steps=0 --check", "steps: must be > 0"),
    Case("dry-run-still-validates", "train {recipe.yaml} stages.0.optimizer.lr=nan --dry-run", "finite"),
]

EVAL = [
    Case("ppl-data-missing", "eval ppl {linspec} --data {sandbox}/none.txt", "no such file"),
    Case("ppl-data-empty", "eval ppl {linspec} --data {empty.txt}", "empty"),
    Case("ppl-data-binary", "eval ppl {linspec} --data {binary.txt}", "not UTF-8 text"),
    Case("ppl-data-nul", "eval ppl {linspec} --data {nul.jsonl}", "NUL bytes"),
    Case("ppl-data-malformed-jsonl", "eval ppl {linspec} --data {broken.jsonl}", "cannot read it as json"),
    Case("ppl-data-unknown-kind", "eval ppl {linspec} --data {table.csv}", "expected .txt, .jsonl"),
    Case("ppl-data-empty-dir", "eval ppl {linspec} --data {empty-dir}", "expected .txt, .jsonl"),
    Case("ppl-data-unknown-builtin", "eval ppl {linspec} --data builtin:nope", "unknown builtin"),
    Case("ppl-data-hub-empty", "eval ppl {linspec} --data hub:", "needs a dataset name"),
    Case("ppl-data-mixed-kinds", "eval ppl {linspec} --data {mixed-dir}", "of one kind"),
    Case("ppl-text-field-missing", "eval ppl {linspec} --data {docs.jsonl}", "no column 'text'"),
    Case("ppl-text-not-strings", "eval ppl {linspec} --data {numbers.jsonl}", "numbers.jsonl: column 'text' must hold"),
    Case("ppl-text-nulls", "eval ppl {linspec} --data {nulls.jsonl}", "nulls.jsonl: column 'text' is null in 1 row"),
    Case("ppl-window-one", "eval ppl {linspec} --data {text.txt} --window 1", "--window: must be an"),
    Case("ppl-window-absurd", "eval ppl {linspec} --data {text.txt} --window 1000000000", "--window: must be an"),
    Case("ppl-stride-zero", "eval ppl {linspec} --data {text.txt} --stride 0", "--stride: must be an"),
    Case("ppl-stride-past-window", "eval ppl {linspec} --data {text.txt} --window 8 --stride 9", "--stride"),
    Case("ppl-max-tokens-one", "eval ppl {linspec} --data {text.txt} --max-tokens 1", "--max-tokens"),
    Case("ppl-ablate-unknown", "eval ppl {linspec} --data {text.txt} --ablate mlp", "invalid choice"),
    Case("ppl-ablate-and-ablations", "eval ppl {linspec} --data {text.txt} --ablate conv --ablations", "one of them"),
    Case("ppl-dtype-unknown", "eval ppl {linspec} --data {text.txt} --dtype int8", "dtype must be auto or one of"),
    Case("ppl-model-crafted-config", "eval ppl {linspec-crafted} --data {text.txt}",
         "group_size must be an integer in 1.."),
    Case("ppl-model-missing", "eval ppl {sandbox}/m --data {text.txt}", "no such file"),
    Case("ppl-ablations-softmax-model", "eval ppl {base} --data {text.txt} --ablations", "need a linspec model"),
    Case("ppl-task-missing", "eval", "required"),
    Case("layers-seq-len-zero", "eval layers {linspec} --data {text.txt} --seq-len 0", "--seq-len: must be an"),
    Case("layers-top-zero", "eval layers {linspec} --data {text.txt} --top 0", "--top: must be an"),
    Case("layers-pool-zero", "eval layers {linspec} --data {text.txt} --search greedy --pool 0", "--pool: must be an"),
    Case("layers-pool-single", "eval layers {linspec} --data {text.txt} --search single --pool 2", "--search greedy"),
    Case("layers-ppl-without-data", "eval layers {linspec}", "--by ppl needs --data"),
    Case("layers-passkey-trials-zero", "eval layers {linspec} --by passkey --trials 0", "--trials: must be an"),
    Case("layers-passkey-too-long", "eval layers {linspec} --by passkey --passkey-length 99999999", "1..1048576"),
    Case("layers-sequences-absurd", "eval layers {linspec} --data {text.txt} --max-sequences 99999999", "1..65536"),
    Case("layers-softmax-model", "eval layers {base} --data {text.txt}", "no linear-attention layers"),
    Case("layers-too-little-text", "eval layers {linspec} --data {one-token.txt}", "fewer than --seq-len"),
    Case("layers-data-binary", "eval layers {linspec} --data {binary.txt}", "not UTF-8"),
]

BENCH_AND_DEMO = [
    Case("bench-unknown", "bench everything", "invalid choice"),
    Case("bench-decode-steps-zero", "bench decode --steps 0 --no-record", "must be positive"),
    Case("bench-decode-context-negative", "bench decode --contexts -1 --no-record", "must be positive"),
    Case("bench-decode-steps-absurd", "bench decode --steps 100000 --no-record", "at most 10000"),
    Case("bench-decode-sparse-cache-negative", "bench decode --sparse-cache -1 --no-record", "sparse_cache must be"),
    Case(
        "bench-decode-sparse-cache-without-window",
        "bench decode --preset paper --sparse-cache 8 --no-record",
        "needs local_kernel 'softmax'",
    ),
    Case(
        "bench-decode-context-past-positions",
        "bench decode --model {linspec} --contexts 100000 --no-record",
        "exceeds the model's",
    ),
    Case("bench-prefill-lengths-zero", "bench prefill --lengths 0 --no-record", "--lengths"),
    Case("bench-prefill-lengths-absurd", "bench prefill --lengths 1000000000 --no-record", "--lengths"),
    Case("bench-prefill-repeats-zero", "bench prefill --repeats 0 --no-record", "--repeats"),
    Case("bench-prefill-threads-zero", "bench prefill --threads 0 --no-record", "--threads"),
    Case("bench-prefill-shape-unknown", "bench prefill --shapes giant", "invalid choice"),
    Case("bench-kernels-lengths-zero", "bench kernels --lengths 0 --no-record", "--lengths"),
    Case("bench-kernels-batch-heads", "bench kernels --batch-heads 4y16", "BATCHxHEADS"),
    Case("bench-speculative-tokens-zero", "bench speculative --max-new-tokens 0", "--max-new-tokens must be in"),
    Case("bench-speculative-repeats-zero", "bench speculative --repeats 0", "--repeats must be in"),
    Case("bench-speculative-threads-zero", "bench speculative --threads 0", "--threads must be in"),
    Case("bench-speculative-exit-layer", "bench speculative --exit-layer 0", "--exit-layer must be in"),
    Case("bench-speculative-drafter-missing", "bench speculative --drafters {sandbox}/none", "no such directory"),
    Case("bench-speculative-not-a-drafter", "bench speculative --drafters {empty-dir}", "no drafter.json"),
    Case("bench-speculative-model-missing", "bench speculative --model {sandbox}/m", "no such file"),
    Case("bench-speculative-converted-softmax", "bench speculative --model {base} --converted {base}", "not a linspec"),
    Case("bench-speculative-converted-other-vocab", "bench speculative --model {base} --converted {other-linspec}",
         "not a conversion of --model"),
    Case("demo-tokens-zero", "demo --max-new-tokens 0", "--max-new-tokens must be in"),
    Case("demo-tokens-absurd", "demo --max-new-tokens 1000000000", "--max-new-tokens must be in"),
    Case("demo-context-zero", "demo --contexts 0", "--contexts must be in"),
    Case("demo-context-absurd", "demo --contexts 100000000000", "--contexts must be in"),
    Case("demo-prompt-empty", "demo --prompt=", "--prompt is empty"),
    Case("demo-trained-and-out", "demo --trained {linspec} --out {sandbox}/o", "pass one of them"),
    Case("demo-out-a-file", "demo --out {a-file}", "not a directory"),
    Case("demo-out-not-a-model", "demo --out {victim}", "holds no model"),
    Case("no-command", "", "required"),
    Case("unknown-command", "deploy", "invalid choice"),
]

ENV_AND_RECIPES = [
    Case("env-unknown-flag", "env --yaml", "unrecognized arguments"),
    Case("recipes-no-action", "recipes", "required"),
    Case("recipes-unknown-action", "recipes rm smollm2-135m-demo", "invalid choice"),
    Case("recipes-cp-unknown", "recipes cp nope {sandbox}", "no shipped recipe 'nope'"),
    Case("recipes-cp-path-as-name", "recipes cp ../../etc/passwd {sandbox}", "no shipped recipe"),
    Case("recipes-cp-taken", "recipes cp smollm2-135m-demo {sandbox}/taken.yaml", "exists; pass --force",
         setup=lambda sandbox: (sandbox / "taken.yaml").write_text("mine")),
    Case("recipes-cp-no-dir", "recipes cp smollm2-135m-demo {sandbox}/no/where.yaml", "is not a directory"),
    Case("recipes-cp-dash", "recipes cp smollm2-135m-demo -", "linspec train smollm2-135m-demo --check"),
    Case("train-shipped-name-climbs", "train ../recipes/smollm2-135m-demo", "recipe not found"),
]

PLACEMENT_AND_OUTPUT = [
    Case("generate-device-unknown", "generate {linspec} --prompt hi --device bogus", "unknown device 'bogus'"),
    Case("generate-device-unsupported", "generate {linspec} --prompt hi --device hpu", "unsupported device"),
    Case("generate-dtype-unknown", "generate {linspec} --prompt hi --dtype int8", "dtype must be auto or one of"),
    Case("ppl-device-unknown", "eval ppl {linspec} --data {empty.txt} --device gpu0", "unknown device"),
    Case("ppl-dtype-double", "eval ppl {linspec} --data {empty.txt} --dtype double", "dtype must be auto"),
    Case("layers-dtype-unknown", "eval layers {linspec} --data {empty.txt} --dtype q4", "dtype must be auto"),
    Case("convert-device-unknown", "convert {base} {sandbox}/o --device nowhere", "unknown device"),
    Case("demo-device-unknown", "demo --device abacus", "unknown device"),
    Case("bench-decode-dtype-unknown", "bench decode --model {base} --dtype half-ish --no-record", "dtype must be"),
    Case("bench-decode-out-and-docs", "bench decode --out {sandbox}/b --update-docs", "pass one of them"),
    Case("bench-decode-out-a-file", "bench decode --out {a-file} --contexts 8 --steps 1", "is not a folder"),
    Case("bench-prefill-no-record-and-out", "bench prefill --no-record --out {sandbox}/b", "writes nothing"),
    Case("bench-speculative-device", "bench speculative --device bogus", "unknown device"),
    Case("train-update-docs-alone", "train {recipe.yaml} --update-docs", "needs --record-bench"),
]

# Round two: drafters, softmax heads and windows, recall and chat data, the quality evaluations, recipes cp,
# models whose weights disagree with their config, and run directories with planted links.
DRAFTERS = [
    Case("drafter-force-linked-checkpoints", "train {drafter.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("recipe.yaml", "checkpoints")),
    Case("drafter-force-linked-metrics", "train {drafter.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("recipe.yaml", "metrics.jsonl", to_file=True)),
    Case("drafter-force-linked-drafter", "train {drafter.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("recipe.yaml", "drafter")),
    Case("drafter-resume-linked-checkpoints", "train {drafter.yaml} output={sandbox}/run --resume", "symbolic link",
         _run_with_link("recipe.yaml", "checkpoints")),
    Case("drafter-force-linked-run-file", "train {drafter.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("metrics.jsonl", "recipe.yaml", to_file=True)),
    Case("drafter-resume-run-file-torn", "train {drafter.yaml} output={sandbox}/run --resume", "is damaged",
         _run_file("run.json", '{"target": {"vocab')),
    Case("drafter-resume-run-file-no-target", "train {drafter.yaml} output={sandbox}/run --resume", "is damaged",
         _run_file("run.json", "{}")),
    Case("drafter-resume-run-file-list", "train {drafter.yaml} output={sandbox}/run --resume", "is damaged",
         _run_file("run.json", "[1, 2]")),
    Case("drafter-seed-huge", "train {drafter.yaml} output={sandbox}/run seed=" + HUGE, "seed must be an integer in"),
    Case("drafter-seed-negative", "train {drafter.yaml} output={sandbox}/run seed=-1", "seed must be an integer in"),
    Case("drafter-data-seed-huge", "train {drafter.yaml} output={sandbox}/run data.seed=" + HUGE, "data.seed"),
    Case("drafter-output-a-file", "train {drafter.yaml} output={a-file}", "not a directory"),
    Case("drafter-ids-out-of-range", "generate {base} --prompt hi --draft medusa --drafter {drafter-ids-out-of-range}",
         "draft vocabulary ids must be in"),
    Case("drafter-ids-repeated", "generate {base} --prompt hi --draft medusa --drafter {drafter-ids-repeated}",
         "more than once"),
    Case("drafter-ids-float", "generate {base} --prompt hi --draft medusa --drafter {drafter-ids-float}",
         "integer token ids"),
    Case("drafter-weights-nan", "generate {base} --prompt hi --draft medusa --drafter {drafter-nan}", "non-finite"),
    Case("drafter-weights-shape", "generate {base} --prompt hi --draft medusa --drafter {drafter-shape}",
         "does not match its drafter.json"),
    Case("drafter-depth-text", "generate {base} --prompt hi --draft medusa --drafter {drafter-depth-text}",
         "depth must be an integer in 1..16"),
    Case("drafter-depth-huge", "generate {base} --prompt hi --draft medusa --drafter {drafter-depth-huge}",
         "depth must be an integer in 1..16"),
    Case("drafter-settings-list", "generate {base} --prompt hi --draft medusa --drafter {drafter-settings-list}",
         "lacks its settings"),
    Case("drafter-bench-bad-ids", "bench speculative --model {base} --drafters {drafter-ids-out-of-range}",
         "draft vocabulary ids"),
]

MODELS_THAT_DISAGREE = [
    Case("model-fewer-layers", "generate {fewer-layers} --prompt hi", "has no place for"),
    Case("model-missing-layer", "generate {missing-layer} --prompt hi", "lacks model.layers.1"),
    Case("model-nan-weights", "generate {nan-weights} --prompt hi", "non-finite"),
    Case("model-zero-heads", "generate {zero-heads} --prompt hi", "num_attention_heads must be an integer in 1.."),
    Case("model-heads-text", "generate {heads-text} --prompt hi", "num_attention_heads must be an integer in 1.."),
    Case("convert-fewer-layers", "convert {fewer-layers} out", "has no place for"),
    Case("convert-missing-layer", "convert {missing-layer} out", "lacks"),
    Case("convert-nan-weights", "convert {nan-weights} out", "non-finite"),
    Case("convert-zero-heads", "convert {zero-heads} out", "num_attention_heads"),
    Case("ppl-nan-weights", "eval ppl {nan-weights} --data {text.txt}", "non-finite"),
    Case("passkey-fewer-layers", "eval passkey {fewer-layers} --lengths 64 --trials 1 --out {sandbox}/e",
         "has no place for"),
    Case("linspec-section-list", "generate {linspec-section-list} --prompt hi", "must be a mapping"),
    Case("linspec-group-text", "generate {linspec-group-text} --prompt hi", "group_size must be an integer in 1.."),
    Case("linspec-layers-number", "generate {linspec-layers-number} --prompt hi", "softmax_layers must be a list"),
    Case("linspec-feature-map-list", "eval ppl {linspec-feature-map-list} --data {text.txt}",
         "feature_map must be a name"),
]

RECIPES_ROUND_TWO = [
    Case("seq-len-one", "train {recipe.yaml} output={sandbox}/run data.seq_len=1", "seq_len: must be at least 2"),
    Case("seed-huge", "train {recipe.yaml} output={sandbox}/run seed=" + HUGE, "recipe key seed must be an integer"),
    Case("seed-negative", "train {recipe.yaml} output={sandbox}/run seed=-5", "recipe key seed must be an integer"),
    Case("data-seed-huge", "train {recipe.yaml} output={sandbox}/run data.seed=" + HUGE, "data.seed must be"),
    Case("chat-seed-huge", "train {recipe.yaml} output={sandbox}/run data.chat.seed=" + HUGE, "data.chat.seed"),
    Case("recall-seed-huge", "train {recipe.yaml} output={sandbox}/run data.recall.seed=" + HUGE, "recall.seed"),
    Case("lora-seed-huge-check", "train {recipe.yaml} seed=" + HUGE + " --check", "seed must be an integer"),
    Case("recall-facts-float", "train {recipe.yaml} data.recall.facts=1.5", "expected int"),
    Case("chat-prompts-binary", "train {recipe.yaml} data.chat.prompts={binary.txt}", "not UTF-8"),
    Case("softmax-heads-auto-zero", "train {recipe.yaml} conversion.softmax_heads=auto:0", "softmax_heads"),
    Case("window-zero", "train {recipe.yaml} conversion.preset=window conversion.local_window=0", "local_window"),
    Case("train-force-linked-checkpoints", "train {recipe.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("recipe.yaml", "checkpoints")),
    Case("train-force-linked-stages", "train {recipe.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("recipe.yaml", "stages")),
    Case("train-force-linked-summary", "train {recipe.yaml} output={sandbox}/run --force", "symbolic link",
         _run_with_link("recipe.yaml", "summary.json", to_file=True)),
    Case("train-resume-linked-metrics", "train {recipe.yaml} output={sandbox}/run --resume", "symbolic link",
         _run_with_link("recipe.yaml", "metrics.jsonl", to_file=True)),
    Case("convert-window-zero", "convert {base} out --preset window --local-window 0", "local_window"),
    Case("convert-sinks-absurd", "convert {base} out --preset window --sink-tokens 100000000", "sink_tokens"),
    Case("convert-heads-auto-zero", "convert {base} out --softmax-heads auto:0 --data {text.txt}", "auto:N"),
]

QUALITY_EVALS = [
    Case("passkey-trials-absurd", "eval passkey {linspec} --trials 100000000", "--trials: must be an integer in 1.."),
    Case("passkey-lengths-absurd", "eval passkey {linspec} --lengths 100000000", "must be an integer in 1..1048576"),
    Case("passkey-length-past-model", "eval passkey {linspec} --lengths 100000 --out {sandbox}/e", "exceeds"),
    Case("passkey-seed-huge", "eval passkey {linspec} --seed " + HUGE, "must be an integer in 0..4294967295"),
    Case("passkey-seed-negative", "eval passkey {linspec} --seed -1", "must be an integer in 0.."),
    Case("passkey-chunk-zero", "eval passkey {linspec} --chunk 0", "--chunk: must be an integer in 1.."),
    Case("passkey-no-tokenizer", "eval passkey {small-positions} --lengths 64 --out {sandbox}/e", "no tokenizer"),
    Case("agreement-prompts-absurd", "eval agreement {linspec} --reference {base} --num-prompts 100000000",
         "--num-prompts: must be an integer in 1.."),
    Case("agreement-tokens-absurd", "eval agreement {linspec} --reference {base} --max-new-tokens 100000000",
         "--max-new-tokens: must be an integer in 1.."),
    Case("agreement-answers-past-positions",
         "eval agreement {linspec} --reference {base} --num-prompts 2 --max-new-tokens 4095 --prompts builtin:sample",
         "exceeds the model's 4096 positions"),
    Case("agreement-seed-huge", "eval agreement {linspec} --reference {base} --seed " + HUGE, "0..4294967295"),
    Case("agreement-prompts-missing", "eval agreement {linspec} --reference {base} --prompts {sandbox}/none.txt",
         "no such prompt file"),
    Case("agreement-prompts-binary", "eval agreement {linspec} --reference {base} --prompts {binary.txt}", "UTF-8"),
    Case("harness-limit-absurd", "eval harness {linspec} --tasks x --limit 100000000000", "--limit: must be"),
    Case("harness-fewshot-negative", "eval harness {linspec} --tasks x --num-fewshot -1", "in 0..1024"),
    Case("harness-max-length-absurd", "eval harness {linspec} --tasks x --max-length 100000000000", "1..1048576"),
    Case("harness-include-path-missing", "eval harness {linspec} --tasks x --include-path {sandbox}/none",
         "no such directory"),
    Case("curve-max-windows-absurd", "eval ppl {linspec} --data {text.txt} --lengths 8 --max-windows 100000000",
         "--max-windows: must be an integer in 1.."),
    Case("curve-score-tokens-absurd", "eval ppl {linspec} --data {text.txt} --lengths 8 --score-tokens 10000000000",
         "--score-tokens"),
    Case("layers-passkey-trials-absurd", "eval layers {linspec} --by passkey --trials 100000000", "1..4096"),
    Case("heads-top-zero", "eval heads {base} --data {text.txt} --top 0", "--top: must be an integer in 1.."),
    Case("heads-sequences-absurd", "eval heads {base} --data {text.txt} --max-sequences 100000000", "1..1024"),
    Case("curve-ablate-window-only-no-window", "eval ppl {linspec} --data {text.txt} --lengths 8 --ablate window-only",
         "needs a linspec model with a softmax window"),
    Case("curve-ablate-softmax-model", "eval ppl {base} --data {text.txt} --lengths 8 --ablate gamma",
         "need a linspec model"),
    Case("curve-ablate-and-ablations", "eval ppl {linspec} --data {text.txt} --lengths 8 --ablate conv --ablations",
         "one of them"),
    Case("passkey-depth-above-one", "eval passkey {linspec} --depths 1.5", "fraction in 0..1"),
    Case("passkey-depth-negative", "eval passkey {linspec} --depths -0.1", "fraction in 0..1"),
    Case("passkey-depth-nan", "eval passkey {linspec} --depths nan", "fraction in 0..1"),
    Case("passkey-depth-text", "eval passkey {linspec} --depths deep", "expected a fraction"),
    Case("passkey-depths-too-many", "eval passkey {linspec} --depths" + " 0.5" * 65, "give 1..64 depths"),
    Case("passkey-grid-length-past-model", "eval passkey {linspec} --depths 0.5 --lengths 100000 --out {sandbox}/e",
         "exceeds the model's 4096 positions"),
    Case("passkey-grid-length-too-short", "eval passkey {linspec} --depths 0.5 --lengths 16 --out {sandbox}/e",
         "too short"),
    Case("passkey-grid-trials-absurd", "eval passkey {linspec} --depths 0.5 --trials 100000000", "1..4096"),
    Case("needle-keys-absurd", "eval needle {linspec} --keys 100000000", "--keys: must be an integer in 1..20"),
    Case("needle-keys-zero", "eval needle {linspec} --keys 0", "--keys: must be an integer in 1..20"),
    Case("needle-trials-absurd", "eval needle {linspec} --trials 100000000", "--trials: must be an integer in 1.."),
    Case("needle-lengths-absurd", "eval needle {linspec} --lengths 100000000", "must be an integer in 1..1048576"),
    Case("needle-length-past-model", "eval needle {linspec} --lengths 100000 --out {sandbox}/e", "exceeds"),
    Case("needle-length-too-short", "eval needle {linspec} --lengths 32 --out {sandbox}/e", "too short"),
    Case("needle-seed-huge", "eval needle {linspec} --seed " + HUGE, "must be an integer in 0..4294967295"),
    Case("needle-no-tokenizer", "eval needle {small-positions} --lengths 64 --out {sandbox}/e", "no tokenizer"),
    Case("needle-model-missing", "eval needle {sandbox}/none", "no such file or directory"),
    Case("recall-pairs-absurd", "eval recall {linspec} --pairs 100000000", "--pairs: must be an integer in 1..20"),
    Case("recall-pairs-zero", "eval recall {linspec} --pairs 0", "--pairs: must be an integer in 1..20"),
    Case("recall-window-absurd", "eval recall {linspec} --window 100000000000", "--window: must be an integer"),
    Case("recall-window-past-model", "eval recall {linspec} --window 100000 --out {sandbox}/e", "exceeds"),
    Case("recall-trials-absurd", "eval recall {linspec} --trials 100000000", "--trials: must be an integer in 1.."),
    Case("recall-softmax-model-without-window", "eval recall {base} --out {sandbox}/e", "give --window W"),
    Case("recall-crafted-config", "eval recall {linspec-crafted}", "group_size must be an integer in 1.."),
]

RECIPES_CP = [
    Case("recipes-cp-through-link", "recipes cp smollm2-135m-demo {sandbox}/mine.yaml --force", "symbolic link",
         _link("mine.yaml", "outside/precious.txt")),
    Case("recipes-cp-dangling-link", "recipes cp smollm2-135m-demo {sandbox}/mine.yaml", "symbolic link",
         _link("mine.yaml", "nowhere.yaml")),
    Case("recipes-cp-name-taken-by-dir", "recipes cp smollm2-135m-demo {sandbox} --force", "not a file",
         _dir("smollm2-135m-demo.yaml")),
]

CHAT = [
    Case("chat-system-empty", "chat {base} --system=", "--system is empty"),
    Case("chat-model-missing", "chat {sandbox}/none", "no such file or directory"),
    Case("chat-no-tokenizer", "chat {small-positions}", "no tokenizer"),
    Case("chat-fewer-layers", "chat {fewer-layers}", "has no place for"),
    Case("chat-command-tokens-zero", "chat {base} --max-new-tokens 0", "--max-new-tokens"),
    Case("chat-drafter-bad-ids", "chat {base} --draft medusa --drafter {drafter-ids-out-of-range}", "vocabulary ids"),
    Case("chat-drafter-without-draft", "chat {base} --drafter {drafter-for-base}", "only applies to --draft"),
]

OUTPUTS_OVER_INPUTS = [  # an output that would replace what it is made from, and inputs that break late
    Case("convert-onto-its-source", "convert {sandbox}/m {sandbox}/m --force", "would overwrite", _mkdir("m")),
    Case("convert-over-its-source-folder", "convert {sandbox}/m/src {sandbox}/m --force", "would overwrite",
         _mkdir("m/src")),
    Case("train-base-inside-output", "train {recipe.yaml} output={sandbox}/run base={sandbox}/run/model --force",
         "would overwrite", _mkdir("run/model")),
    Case("train-overrides-after-an-unknown-flag", "train {recipe.yaml} --check --bogus seed=1",
         "unrecognized arguments: --bogus"),
    Case("generate-chat-template-broken", "generate {broken-template} --prompt hi", "chat template does not render"),
    Case("passkey-chat-template-broken", "eval passkey {broken-template} --lengths 64 --trials 1 --out {sandbox}/e",
         "chat template does not render"),
    Case("demo-out-another-models-conversion", "demo --model {base} --out {other-linspec} --contexts 16 "
         "--max-new-tokens 2", "pass --force to replace it"),
    Case("demo-model-without-tokenizer", "demo --model {small-positions} --contexts 16 --max-new-tokens 2",
         "has no tokenizer"),
    Case("demo-context-past-positions", "demo --model {base} --contexts 9000 --max-new-tokens 2", "exceeds"),
    Case("demo-force-without-out", "demo --force", "it needs --out"),
    Case("generate-seed-negative", "generate {linspec} --prompt hi --seed=-1", "--seed: must be an integer in 0.."),
    Case("generate-seed-absurd", "generate {linspec} --prompt hi --seed 99999999999999999999", "--seed: must be"),
    Case("generate-prompt-only-a-bom", "generate {linspec} --prompt-file {bom.txt}", "--prompt is empty"),
    Case("recipes-cp-into-a-missing-folder", "recipes cp smollm2-135m-demo {sandbox}/newdir/", "is not a directory"),
    Case("heads-window-past-positions", "eval heads {base} --data {text.txt} --local-window 3000",
         "linspec eval heads: error: heads are ranked on sequences of twice"),
    Case("heads-foreign-tokenizer", "eval heads {foreign-tokenizer} --data {text.txt} --local-window 8",
         "more than the model's 97 embeddings"),
    Case("agreement-foreign-tokenizer", "eval agreement {linspec} --reference {foreign-tokenizer} --prompts "
         "{text.txt} --num-prompts 1 --max-new-tokens 2 --out {sandbox}/a", "the tokenizer belongs to another model"),
    Case("demo-trained-from-another-model", "demo --model {base} --trained {other-linspec} --contexts 16 "
         "--max-new-tokens 2", "not made from"),
]

SERVE = [  # each is refused before vLLM is looked for: none would start a server where vLLM is installed
    Case("serve-model-missing", "serve {sandbox}/none", "is not a directory"),
    Case("serve-softmax-model", "serve {base}", "is not a linspec model"),
    Case("serve-port-zero", "serve {linspec} --port 0", "--port"),
    Case("serve-name-empty", "serve {linspec} --name=", "--name: must not be empty"),
    Case("serve-host-empty", "serve {linspec} --host=", "--host: must not be empty"),
    Case("serve-concurrency-zero", "serve {linspec} --max-concurrency 0", "--max-concurrency"),
    Case("serve-dtype-unknown", "serve {linspec} --dtype int4", "--dtype"),
    Case("serve-device-unknown", "serve {linspec} --device tpu", "--device"),
    Case("serve-own-flag-after-dashes", "serve {linspec} -- --max-num-seqs=4", "--max-concurrency"),
]

# fmt: on
ROUND_ONE = [*CONVERT, *GENERATE, *TRAIN, *EVAL, *BENCH_AND_DEMO, *ENV_AND_RECIPES, *PLACEMENT_AND_OUTPUT]
ROUND_TWO = [
    *DRAFTERS,
    *MODELS_THAT_DISAGREE,
    *RECIPES_ROUND_TWO,
    *QUALITY_EVALS,
    *RECIPES_CP,
    *CHAT,
    *SERVE,
    *OUTPUTS_OVER_INPUTS,
]
CLI_CASES = [*ROUND_ONE, *ROUND_TWO]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots`` with its size and modification time."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            seen[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return seen


def expand(argv: str, world, sandbox: Path) -> list[str]:
    """``{name}`` -> the fixture file ``name`` (dots and dashes allowed), ``{sandbox}`` -> the working directory."""
    names = {p.name: str(p) for p in world.root.iterdir()} | {"sandbox": str(sandbox)}
    return [re.sub(r"\{([\w.-]+)\}", lambda m: names[m[1]], part) for part in argv.split(" ") if part]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse usage errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, fragment: str) -> None:
    """Exit 2; the last stderr line is the only ``linspec`` line (progress bars may precede it); short."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    messages = [line for line in lines if line.startswith("linspec")]
    assert code == 2, (code, err)
    assert len(messages) == 1 and lines[-1] == messages[0], err
    assert len(messages[0]) <= MAX_LINE, len(messages[0])
    assert ": error: " in messages[0] and fragment in messages[0], messages[0]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_refuses_bad_input_cleanly(case: Case, world, tmp_path, monkeypatch, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    if case.setup is not None:
        case.setup(sandbox)
    monkeypatch.chdir(sandbox)
    before = snapshot(sandbox, world.root, DOCS)
    code, _, err = run_main(expand(case.argv, world, sandbox), capsys)
    assert_refused(code, err, case.fragment)
    assert snapshot(sandbox, world.root, DOCS) == before, "a refused command changed files"
    assert not world.canary.exists() and not (sandbox / CANARY).exists()


def test_catalogue_is_large_and_ids_are_unique():
    assert len(CLI_CASES) >= 390
    assert len({c.id for c in CLI_CASES}) == len(CLI_CASES)


def test_every_sub_command_has_bad_input_rows():
    from linspec.cli import COMMANDS

    covered = {c.argv.split(" ")[0] for c in CLI_CASES if c.argv}
    assert {command for command, *_ in COMMANDS} <= covered


def test_a_refused_parser_error_is_one_line_in_a_real_process(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "linspec", "convert", "a", "b", "--group-size", "x"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("model", "stdin", "fragment"),
    [
        ("broken-template", b"hello\n", "chat template does not render"),
        ("linspec", b"\xff\xfe\n", "not UTF-8"),
    ],
    ids=["template-broken", "message-not-utf8"],
)
def test_chat_refuses_a_template_or_a_message_it_cannot_use_in_one_line(model, stdin, fragment, world, monkeypatch,
                                                                       capsys):  # fmt: skip
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape"))
    code, _, err = run_main(["chat", str(world.root / model), "--max-new-tokens", "2"], capsys)
    assert_refused(code, err, fragment)
