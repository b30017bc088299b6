"""Held-out instruction prompts built from plain text, reproducibly.

No instruction dataset is available offline, so prompts are made from paragraphs of a corpus (``builtin:NAME``
or a local file) with a handful of instruction templates. The same seed gives the same prompts, so two models —
or a model before and after training — answer exactly the same questions. A training data builder can reuse
:func:`build_prompts` on its training split; evaluations use held-out text (``builtin:wiki-en-eval``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from linspec.errors import LinspecError

# kind -> template; "{text}" is a paragraph (or, for "continue", its first half).
TEMPLATES = {
    "summarise": "Summarise the following paragraph in one sentence.\n\n{text}",
    "continue": "Continue the text:\n\n{text}",
    "topic": "What is the main topic of the following text? Answer briefly.\n\n{text}",
    "facts": "List three facts stated in this text.\n\n{text}",
    "question": "Write one question that this text answers, then answer it.\n\n{text}",
}
MIN_WORDS, MAX_WORDS = 40, 120  # paragraphs used as material; longer ones are cut at MAX_WORDS


@dataclass(frozen=True)
class Prompt:
    kind: str  # a TEMPLATES key, or "file" for prompts read verbatim
    text: str


def paragraphs(documents: Sequence[str]) -> list[str]:
    """Paragraphs of MIN_WORDS..MAX_WORDS words (longer ones cut at a sentence end within MAX_WORDS if any)."""
    found = []
    for document in documents:
        for block in document.split("\n"):
            words = block.split()
            if len(words) < MIN_WORDS:
                continue
            text = " ".join(words[:MAX_WORDS])
            if len(words) > MAX_WORDS and ". " in text:
                text = text[: text.rindex(". ") + 1]
            if len(text.split()) >= MIN_WORDS:
                found.append(text)
    return found


def build_prompts(documents: Sequence[str], count: int, seed: int = 0) -> list[Prompt]:
    """``count`` prompts: paragraphs in a seeded order, templates in turn. Deterministic given the inputs."""
    if count < 1:
        raise LinspecError(f"the number of prompts must be at least 1, got {count}")
    material = paragraphs(documents)
    if len(material) < count:
        raise LinspecError(
            f"the text has {len(material)} paragraphs of {MIN_WORDS}..{MAX_WORDS} words; {count} prompts need as many"
        )
    random.Random(seed).shuffle(material)
    kinds = list(TEMPLATES)
    prompts = []
    for index, paragraph in enumerate(material[:count]):
        kind = kinds[index % len(kinds)]
        if kind == "continue":
            words = paragraph.split()
            paragraph = " ".join(words[: len(words) // 2])
        prompts.append(Prompt(kind, TEMPLATES[kind].format(text=paragraph)))
    return prompts


def load_prompts(source: str, count: int, seed: int = 0, text_field: str = "text") -> list[Prompt]:
    """Prompts from ``builtin:NAME`` or a corpus file (built with :func:`build_prompts`), or read verbatim from
    a ``.jsonl`` file whose rows have a ``prompt`` field or a ``.txt`` file with one prompt per line (the
    first ``count`` of them)."""
    path = Path(source).expanduser()
    if not source.startswith("builtin:") and not path.is_file():
        raise LinspecError(f"{source}: no such prompt file (expected builtin:NAME, .txt or .jsonl)")
    if path.suffix == ".txt" and path.is_file():
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return _verbatim(texts, count, source)
    if path.suffix == ".jsonl" and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
            return _verbatim([r["prompt"] for r in rows], count, source)
    from linspec.train.data import load_documents

    return build_prompts(list(load_documents(source, text_field)["text"]), count, seed)


def _verbatim(texts: list[str], count: int, source: str) -> list[Prompt]:
    if count < 1:
        raise LinspecError(f"the number of prompts must be at least 1, got {count}")
    if not texts:
        raise LinspecError(f"{source} has no prompts")
    return [Prompt("file", text) for text in texts[:count]]
