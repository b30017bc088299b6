"""Model cards: the ``README.md`` written into every saved linspec model, so the next person knows what it is.

A linspec directory looks like any Hugging Face checkpoint, but it only loads after ``import linspec`` and
most inference engines cannot run it; the card says so, next to where the model came from, its licence, how
it was converted and trained, and what quality was measured (or that none was).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from linspec.config import LinspecConfig

# Licences of the built-in demo sources (their GGUF wheels carry no model card).
KNOWN_LICENSES = {"smollm2-135m": "apache-2.0"}

ENGINES_NOTE = (
    "vLLM, llama.cpp / GGUF, TGI, SGLang, ONNX and TensorRT-LLM have no linspec attention layer and cannot load "
    "this model; it runs in PyTorch through `transformers` (after `import linspec`) and `linspec`."
)


@dataclass
class ModelCard:
    """What a card says. ``quality``: context length → ``(perplexity, reference perplexity or None)``."""

    base_model: str
    settings: LinspecConfig
    license: str | None = None
    recipe: str | None = None
    data: str | None = None
    training: list[str] = field(default_factory=list)
    quality: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    quality_data: str | None = None

    def render(self) -> str:
        settings = self.settings
        layers = ", ".join(map(str, settings.softmax_layers)) or "none (all linear)"
        heads = ", ".join(f"{layer}:{head}" for layer, head in settings.softmax_heads)
        local = (
            f"the pretrained softmax over the last {settings.local_window} tokens and "
            f"{settings.sink_tokens} attention sinks ({settings.sink_positions} positions)"
            if settings.softmax_window
            else "local attention inside groups"
        )
        lines = [
            "---",
            "library_name: transformers",
            f"license: {self.license or 'other'}",
            f"base_model: {self.base_model}",
            "tags: [linspec, linear-attention, linearized]",
            "---",
            "",
            f"# linspec model from {self.base_model}",
            "",
            f"The softmax attention of `{self.base_model}` replaced by augmented grouped linear attention ({local},",
            "a global KV sum across groups, and a causal depthwise convolution on V), reusing its pretrained q/k/v/o",
            "weights. Its decode cache is constant in context length.",
            "",
            "## Conversion",
            "",
            "| setting | value |",
            "|---|---|",
            f"| group size | {settings.group_size} |",
            f"| conv taps | {settings.conv_taps} |",
            f"| feature map | {settings.feature_map} |",
            f"| local kernel | {settings.local_kernel} |",
            *([f"| softmax window | {settings.window_summary} |"] if settings.softmax_window else []),
            f"| global memory | decay {'on' if settings.global_decay else 'off'}, norm {settings.global_norm} |",
            f"| softmax layers kept | {layers} |",
            *([f"| softmax kv heads kept (layer:head) | {heads} |"] if settings.softmax_heads else []),
            "",
            "## Training",
            "",
        ]
        if self.recipe or self.training:
            lines += [f"Recipe: `{self.recipe}`." if self.recipe else "", *[f"- {step}" for step in self.training]]
            if self.data:
                lines.append(f"\nData: {self.data}.")
        else:
            lines.append(
                "None: a raw conversion. Expect poor text until it is trained (`linspec train`); γ and the "
                "convolution start at zero, so it is local grouped attention only."
            )
        lines += ["", "## Measured quality", ""]
        if self.quality:
            lines += ["| context | perplexity | base model |", "|---|---|---|"]
            for context, (ppl, base) in sorted(self.quality.items()):
                lines.append(f"| {context} | {ppl:.2f} | {'' if base is None else f'{base:.2f}'} |")
            if self.quality_data:
                lines.append(f"\nHeld-out text: {self.quality_data}.")
        else:
            lines.append("Not measured. `linspec eval ppl MODEL --data FILE` measures it.")
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "import linspec  # registers the linspec model classes with transformers",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            "```",
            "",
            "`model.generate(...)` works as usual; `linspec generate PATH --draft lookup` generates speculatively.",
            "",
            f"{ENGINES_NOTE}",
            "",
            f"Licence: {self.license or 'not recorded — the base model’s licence applies'}.",
            "",
        ]
        return "\n".join(lines)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "README.md"
        path.write_text(self.render(), encoding="utf-8")
        return path


def drafter_card(kind: str, settings: dict, target: dict, training: dict) -> str:
    """The ``README.md`` of a trained drafter directory: what it drafts for, how to use it, how it was trained."""
    settings_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(settings.items()))
    training_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(training.items())) or "| — | — |"
    target_rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(target.items()))
    return f"""---
library_name: linspec
tags: [linspec, speculative-decoding, drafter, {kind}]
---

# linspec {kind} drafter

A trained drafter for linspec's exact speculative decoding: it proposes tokens, the target verifies them in one
forward, and the output is exactly the target's (greedy: the same tokens; sampling: the same distribution). It
holds only its own weights; the target's embeddings and head are read from the target when it loads, so it
loads against the target it was trained for and no other (the fingerprint below is checked).

## Use

```bash
linspec generate TARGET --draft {kind} --drafter PATH --prompt "..." --stats
```

```python
import linspec
from linspec.drafting import load_drafter

model, tokenizer = linspec.load("TARGET")
drafter = load_drafter("PATH", model, tokenizer).drafter()
out = linspec.speculative_generate(model, drafter, input_ids, max_new_tokens=64)
```

## Settings

| setting | value |
|---|---|
{settings_rows}

## Target

| fingerprint | value |
|---|---|
{target_rows}

## Training

| key | value |
|---|---|
{training_rows}

{ENGINES_NOTE}
"""


def source_license(source: str) -> str | None:
    """The base model's licence, when it is known: a built-in demo source, or the ``license:`` line of a local
    model directory's card."""
    if source in KNOWN_LICENSES:
        return KNOWN_LICENSES[source]
    card = Path(source) / "README.md"
    if not card.is_file():
        return None
    try:
        head = card.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    match = re.search(r"^license:\s*([\w.\-+]+)\s*$", head, flags=re.MULTILINE)
    return match.group(1) if match else None
