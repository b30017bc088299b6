"""Model cards: the ``README.md`` written into every saved linspec model, so the next person knows what it is.

A card answers what a user asks before downloading: which model it came from (as the hub id the Hub links, or
the local file it was made from), under which licence, the exact ``linspec`` command that rebuilds it, how
good it is against its parent and against its own local attention alone (perplexity by context length), how
much memory decoding needs as the context grows, and how to load it — with ``linspec``, with plain
``transformers`` (``trust_remote_code=True``) and with the evaluation harness. Numbers a run did not measure
are named as missing, never filled in.

This module is the card itself and its rendering; what fills one in lives with what made the model: the card of a
conversion in ``linspec.conversion.card``, of a training run and of a trained drafter in ``linspec.train.cards``,
of any other save in ``linspec.models.publish``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from linspec.config import LinspecConfig
from linspec.models.cache_size import CacheGrowth, card_contexts

# A Hub repository id, ``org/name``, as ``base_model:`` metadata must be.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")

ENGINES_NOTE = (
    "vLLM 0.32 serves this model through linspec's vLLM plugin (`pip install 'linspec[vllm]'`, then "
    "`linspec serve DIR`: an OpenAI-compatible server). llama.cpp / GGUF, TGI, SGLang, ONNX and TensorRT-LLM have "
    "no linspec attention layer and cannot load it; it also runs in PyTorch, through `transformers` or `linspec`."
)
CURVE_COLUMNS = {"model": "this model", "local-only": "{local} only", "original": "original"}
MISSING_WHY = {
    "model": "the run's final evaluation did not finish",
    "local-only": "the model has no linear layer to ablate",
    "original": "the run skipped its baselines (`eval.baselines: false`)",
}


@dataclass(frozen=True)
class Source:
    """Where a model came from: ``repo_id`` for the card's ``base_model`` metadata (None for a local file the Hub
    cannot link), how the text names it, and its licence when known."""

    given: str
    repo_id: str | None
    text: str
    license: str | None


def source_license(source: str) -> str | None:
    """The base model's licence when a local model directory's card names it (its ``license:`` line)."""
    card = Path(source) / "README.md"
    if not card.is_file():
        return None
    try:
        head = card.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    match = re.search(r"^license:\s*([\w.\-+]+)\s*$", head, flags=re.MULTILINE)
    return match.group(1) if match else None


@dataclass
class Quality:
    """What a training run measured on held-out text (``linspec.train.evaluation``): ``curve`` maps a column
    (``model``, ``local-only``, ``original``) to a ``LengthCurve`` as a dict; ``phases`` the perplexity of every
    phase on ``phase_length``-token sequences."""

    data: str
    curve: dict[str, dict] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    phase_length: int | None = None


@dataclass
class ModelCard:
    """What a card says. ``location``: the directory (or repo id) the usage snippets load; ``reproduce``: the
    ``linspec`` arguments that rebuild the model (None: no command does, ``recipe`` then shows every key)."""

    source: Source
    settings: LinspecConfig
    location: str
    reproduce: list[str] | None = None
    recipe: str | None = None
    training: list[str] = field(default_factory=list)
    data: str | None = None
    quality: Quality | None = None
    cache: CacheGrowth | None = None
    original_cache: CacheGrowth | None = None
    max_positions: int | None = None

    def render(self) -> str:
        return "\n".join(
            [
                self._metadata(),
                f"# linspec model from {self._short_source()}",
                "",
                *self._summary(),
                *self._conversion(),
                *self._training(),
                *self._quality(),
                *self._state_size(),
                *self._usage(),
            ]
        )

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "README.md"
        path.write_text(self.render(), encoding="utf-8")
        return path

    def _metadata(self) -> str:
        meta: dict = {"library_name": "transformers", "pipeline_tag": "text-generation"}
        if self.source.license:
            meta["license"] = self.source.license
        if self.source.repo_id:
            meta["base_model"] = self.source.repo_id
        meta["tags"] = ["linspec", "linear-attention", "linearized", "custom_code"]
        return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"

    def _short_source(self) -> str:
        return self.source.repo_id or self.source.text

    def _summary(self) -> list[str]:
        settings = self.settings
        local = (
            f"the pretrained softmax over the last {settings.local_window} tokens and "
            f"{settings.sink_tokens} attention sinks at {settings.sink_positions} positions"
            if settings.softmax_window
            else "local attention inside groups"
        )
        kept = [
            _count(len(settings.softmax_layers), "layer"),
            _count(len(settings.softmax_heads), "kv head"),
        ]
        kept = [part for part in kept if part]
        hybrid = f" It keeps the original softmax attention in {' and '.join(kept)}." if kept else ""
        if settings.grouped_term:
            layer = (
                f"augmented grouped linear attention ({local}, a global memory across groups, and a causal "
                "depthwise convolution on V)"
            )
        else:
            far = (
                f", a linear memory of the tokens that leave it read through {settings.memory_feature_map} feature "
                "maps in the same softmax"
                if settings.far_memory
                else ""
            )
            cache = ", and a sparse cache of evicted tokens attended exactly" if settings.sparse_cache else ""
            layer = f"{local}{far}{cache}"
        return [
            f"Converted from {self.source.text}: its softmax attention replaced by {layer}, reusing its pretrained "
            f"q/k/v/o weights.{hybrid}",
            "",
        ]

    def _conversion(self) -> list[str]:
        settings = self.settings
        layers = ", ".join(map(str, settings.softmax_layers)) or "none (all linear)"
        heads = ", ".join(f"{layer}:{head}" for layer, head in settings.softmax_heads)
        scaling = ", far tokens weighed by (distance / window)^-α per head" if settings.memory_distance_decay else ""
        lines = [
            "## Conversion",
            "",
            "| setting | value |",
            "|---|---|",
            *(
                [
                    f"| group size | {settings.group_size} |",
                    f"| conv taps | {settings.conv_taps} |",
                    f"| feature map | {settings.feature_map} |",
                ]
                if settings.grouped_term
                else ["| grouped term | none (no global memory across groups, no convolution) |"]
            ),
            f"| local kernel | {settings.local_kernel} |",
            *([f"| softmax window | {settings.window_summary} |"] if settings.softmax_window else []),
            *(
                [f"| far memory | {settings.memory_feature_map} feature map, in the window's softmax{scaling} |"]
                if settings.far_memory
                else []
            ),
            *(
                [
                    f"| sparse cache | {settings.sparse_cache_summary}: evicted tokens attended exactly in the "
                    f"window's softmax, {settings.sparse_cache} keys and values (and their scores and positions) "
                    "per kv head and layer in the decode state, at any context length |"
                ]
                if settings.sparse_cache
                else []
            ),
            *(
                [f"| global memory | decay {'on' if settings.global_decay else 'off'}, norm {settings.global_norm} |"]
                if settings.grouped_term
                else []
            ),
            f"| softmax layers kept | {layers} |",
            *([f"| softmax kv heads kept (layer:head) | {heads} |"] if settings.softmax_heads else []),
            "",
            "## Reproduce",
            "",
        ]
        if self.reproduce:
            lines += ["```bash", f"linspec {shlex.join(self.reproduce)}", "```", ""]
        if self.recipe:
            how = (
                "The resolved recipe, every key"
                if self.reproduce
                else "No shipped recipe with overrides gives this one; save the resolved recipe below as "
                "`recipe.yaml` and run `linspec train recipe.yaml`"
            )
            lines += ["<details><summary>resolved recipe</summary>", "", f"{how}:", "", "```yaml"]
            lines += [self.recipe.rstrip(), "```", "", "</details>", ""]
        elif not self.reproduce:
            lines += ["No `linspec convert` flags reach this global memory; the settings above are complete.", ""]
        return lines

    def _training(self) -> list[str]:
        lines = ["## Training", ""]
        if not self.training:
            local = (
                "attends only within its softmax window (exactly as the original does there)"
                if self.settings.softmax_window
                else "is local grouped attention only"
            )
            if not self.settings.grouped_term:
                start = (
                    "its far memory starts untrained (identity feature maps), so until it is trained (`linspec "
                    "train`) it is close to its softmax window alone"
                    if self.settings.far_memory
                    else "it attends only within its softmax window and what its sparse cache keeps"
                )
                return [*lines, f"None: a raw conversion; {start}.", ""]
            return [
                *lines,
                "None: a raw conversion. γ and the convolution start at zero, so until it is trained (`linspec "
                f"train`) it {local}, with nothing from further back.",
                "",
            ]
        lines += [f"- {step}" for step in self.training]
        if self.data:
            lines += ["", f"Data: {self.data}."]
        return [*lines, ""]

    def _quality(self) -> list[str]:
        lines = ["## Measured quality", ""]
        quality = self.quality
        if quality is None or not (quality.curve or quality.phases):
            where, reference = shlex.quote(self.location), shlex.quote(self.source.given)
            limit = self.max_positions or 2048
            lengths = [n for n in (256, 1024, 2048) if n <= limit] or [limit]
            earners = "global memory and convolution earn" if self.settings.grouped_term else "far memory earns"
            return [
                *lines,
                f"Not measured. Perplexity by context length against the original, and the share of it the {earners} "
                "(`--ablations`):",
                "",
                "```bash",
                f"linspec eval ppl {where} --data builtin:wiki-en-eval --lengths {' '.join(map(str, lengths))} "
                f"--reference {reference}",
                f"linspec eval ppl {where} --data builtin:wiki-en-eval --window {lengths[-1]} --ablations",
                "```",
                "",
            ]
        if quality.curve:
            lines += self._curve_table(quality)
        if quality.phases:
            shown = ", ".join(f"{_phase_label(name)} {ppl:.2f}" for name, ppl in quality.phases.items())
            lines += [f"Held-out perplexity on {quality.phase_length}-token sequences after each phase: {shown}.", ""]
        return lines

    def _curve_table(self, quality: Quality) -> list[str]:
        local = "window" if self.settings.softmax_window else "local attention"
        names = {key: label.format(local=local) for key, label in CURVE_COLUMNS.items()}
        reference = next(iter(quality.curve.values()))
        bounds, starts = reference["bounds"], [0, *reference["bounds"][:-1]]
        rows = []
        for index, (start, end) in enumerate(zip(starts, bounds, strict=True)):
            cells = [_ppl_cell(quality.curve.get(key), index) for key in CURVE_COLUMNS]
            rows.append(f"| {max(start, 1)}–{end - 1} | {' | '.join(cells)} |")
        lines = [
            f"Perplexity by context length on held-out text ({quality.data}): {reference['sequences']} sequences of "
            f"{bounds[-1]} tokens, each token scored once with the context it had. The {names['local-only']} "
            "column is this model with its global memory and convolution switched off (γ = 0, conv = 0): what "
            "the long-range path adds is the gap to it.",
            "",
            f"| context (tokens) | {' | '.join(names.values())} |",
            "|---" * (len(names) + 1) + "|",
            *rows,
            "",
        ]
        missing = [f"{names[key]} ({MISSING_WHY[key]})" for key in CURVE_COLUMNS if key not in quality.curve]
        if missing:
            lines += [f"Not measured: {'; '.join(missing)}.", ""]
        return lines

    def _state_size(self) -> list[str]:
        if self.cache is None:
            return []
        contexts = card_contexts(self.max_positions)
        original = self.original_cache
        rows = [
            f"| {context:,} | {_mib(self.cache.bytes_at(context))} | "
            f"{'—' if original is None else _mib(original.bytes_at(context))} |"
            for context in contexts
        ]
        if self.cache.per_token:
            growth = (
                f"It grows by {self.cache.per_token / 1024:.1f} KiB per token for its softmax layers and heads, "
                f"on top of {_mib(self.cache.fixed)} MiB of constant linear state."
            )
        else:
            growth = "It is the same at every context length: every layer keeps a constant-size state."
        return [
            "## State size",
            "",
            f"Decode cache of one sequence, in MiB, measured on this model's own cache. {growth}",
            "",
            "| context (tokens) | this model | original (softmax KV cache) |",
            "|---|---|---|",
            *rows,
            "",
        ]

    def _usage(self) -> list[str]:
        where = json.dumps(self.location)
        shell = shlex.quote(self.location)
        harness = shlex.quote(f"pretrained={self.location},trust_remote_code=True")
        return [
            "## Use",
            "",
            f"`{self.location}` is where this model was written; once it is pushed to the Hub, use its repo id.",
            "",
            "With linspec installed (`pip install linspec`):",
            "",
            "```python",
            "import linspec",
            "",
            f"model, tokenizer = linspec.load({where})",
            "```",
            "",
            "With `transformers` alone: the directory carries the code that defines the model.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({where}, trust_remote_code=True)",
            f"tokenizer = AutoTokenizer.from_pretrained({where})",
            "```",
            "",
            "From the command line and the evaluation harness:",
            "",
            "```bash",
            f"linspec generate {shell} --prompt 'Hello' --draft lookup",
            f"lm_eval --model hf --model_args {harness} --tasks hellaswag",
            "```",
            "",
            ENGINES_NOTE,
            "",
            f"Licence: {self.source.license or 'not recorded — the base model’s licence applies'}.",
            "",
        ]


def _count(number: int, noun: str) -> str:
    return "" if not number else f"{number} {noun}{'s' if number > 1 else ''}"


def _mib(size: int) -> str:
    """Bytes in MiB, with the digits a small model's cache needs to show as more than 0.0."""
    mib = size / 2**20
    return f"{mib:.1f}" if mib >= 1 or mib == 0 else f"{mib:.3f}"


def _ppl_cell(curve: dict | None, index: int) -> str:
    if curve is None or index >= len(curve["ppl"]) or curve["ppl"][index] != curve["ppl"][index]:  # NaN: no token
        return "—"
    return f"{curve['ppl'][index]:.2f}"


def _phase_label(name: str) -> str:
    return {"original": "original", "converted": "raw conversion"}.get(name, f"after {name}")
