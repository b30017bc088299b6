"""Instruction prompts: built from plain text reproducibly, and encoded for a model — the one prompt encoder.

No instruction dataset is available offline, so prompts are made from paragraphs of a corpus (``builtin:NAME``
or a local file) with a handful of instruction templates. The same seed gives the same prompts, so two models —
or a model before and after training — answer exactly the same questions. A training data builder can reuse
:func:`build_prompts` on its training split; evaluations use held-out text (``builtin:wiki-en-eval``).

Every command that turns a prompt into tokens (generate, chat's first turn aside, the evaluations, the demo, the
benchmarks, drafter data) goes through :func:`encode_prompt` (one prompt) or :func:`encode_prompts` (a left-padded
batch of them), so a prompt is the same tokens wherever it is used.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from linspec.errors import LinspecError
from linspec.utils.validation import MAX_PROMPTS, check_count


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, conversation: list[dict[str, str]], **options):
    """``tokenizer.apply_chat_template(conversation, **options)``, with a template that does not render (a syntax
    error in ``chat_template.jinja``, or a template that raises) refused in one line."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(conversation, **options)
    except jinja2.TemplateError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LinspecError(
            f"the tokenizer's chat template does not render ({message:.120}); fix its chat_template.jinja, or pass "
            "--no-chat where the command has it"
        ) from None


def encode_prompt(tokenizer, text: str, *, chat: bool | None = None, answer_prefix: str = "") -> list[int]:
    """Token ids of ``text`` as a user turn (the chat template, when the tokenizer has one and ``chat`` is not
    False) followed by ``answer_prefix``, which starts the model's answer (e.g. "The pass key is")."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat:
        ids = render_chat(
            tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return ids + (tokenizer.encode(answer_prefix, add_special_tokens=False) if answer_prefix else [])
    joined = f"{text}\n{answer_prefix}" if answer_prefix else text
    return tokenizer.encode(joined, add_special_tokens=True)


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = True):
    """``(input_ids, attention_mask)`` of a batch of prompts, each encoded by :func:`encode_prompt` (the chat
    template when ``chat`` and the tokenizer has one) and left-padded. A tokenizer without a pad token gets EOS
    as its pad token, the id ``generate`` is then told to pad with."""
    import torch

    rows = [encode_prompt(tokenizer, text, chat=None if chat else False) for text in prompts]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(row)
            mask[index, width - len(row) :] = 1
    return input_ids, mask


# kind -> template; "{text}" is a paragraph (or, for "continue", its first half).
TEMPLATES = {
    "summarise": "Summarise the following paragraph in one sentence.\n\n{text}",
    "continue": "Continue the text:\n\n{text}",
    "topic": "What is the main topic of the following text? Answer briefly.\n\n{text}",
    "facts": "List three facts stated in this text.\n\n{text}",
    "question": "Write one question that this text answers, then answer it.\n\n{text}",
}
# kind -> template about the paragraph's subject ("{subject}": a name it mentions, see ``subject``): open-ended
# requests — stories, explanations, lists, follow-ups — whose answers do not copy a given text.
OPEN_TEMPLATES = {
    "story": "Write a short story about {subject}.",
    "explain": "Explain {subject} to a curious ten-year-old.",
    "list": "List five facts about {subject}, one line each.",
    "follow-up": "Earlier you told me about {subject}. Follow-up question: why does it matter, and what do people "
    "most often get wrong about it?",
}
KINDS = (*TEMPLATES, *OPEN_TEMPLATES)
MIN_WORDS, MAX_WORDS = 40, 120  # paragraphs used as material; longer ones are cut at MAX_WORDS
_SUBJECT_VERBS = {"is", "was", "are", "were", "has", "had", "became", "refers"}
_CONNECTORS = {"of", "the", "and", "de", "von", "van", "for"}
# capitalised only because they open a sentence: not part of a name that follows them
_OPENERS = {
    "The", "A", "An", "In", "On", "At", "Then", "However", "When", "After", "Before", "During", "Some", "This",
    "These", "Its", "His", "Her", "Their", "According", "Despite", "If", "Since", "While",
}  # fmt: skip
_SUBJECT_WORDS = 8  # a subject longer than this is a clause, not a name: its first words are used instead


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


def subject(paragraph: str) -> str:
    """What a paragraph is about, as a name to ask about: its first run of capitalised words (connectors such as
    "of" may join it; a sentence opener such as "The" does not) that is more than a sentence's first word
    ("…by the Russian Federation…" → "Russian Federation"), else the first sentence's words before "is"/"was"/…,
    else its first words. A heuristic: the prompt only needs a plausible topic, not the paragraph's true one."""
    words = paragraph.split()
    runs: list[list[str]] = [[]]
    for raw in words:
        word = raw.strip(",;:()\"'.")
        if (word[:1].isupper() and word.isalpha()) or (runs[-1] and word in _CONNECTORS):
            runs[-1].append(word)
        elif runs[-1]:
            runs.append([])
        if runs[-1] and raw.endswith((",", ";", ":", ".", ")")):  # punctuation ends a name
            runs.append([])
    for run in runs:
        while run and run[-1] in _CONNECTORS:
            run.pop()
        if run and run[0] in _OPENERS:
            run.pop(0)
        opens_sentence = bool(run) and (paragraph.startswith(run[0]) or f". {run[0]}" in paragraph)
        if len(run) >= 2 or (run and not opens_sentence):
            return " ".join(run)
    first = paragraph.split(". ")[0].split()
    cut = next((i for i, w in enumerate(first[: _SUBJECT_WORDS + 1]) if w.lower() in _SUBJECT_VERBS and i), None)
    return " ".join(first[: cut if cut is not None else min(len(first), 5)]).strip(" ,;:()\"'")


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """``kinds`` as a list, or ``LinspecError`` naming the first unknown one (or saying that none is named)."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        what = f"unknown prompt kind {unknown[0]!r}" if unknown else "no prompt kind named"
        raise LinspecError(f"{what}; known: {', '.join(KINDS)}")
    return kinds


def build_prompts(
    documents: Sequence[str], count: int, seed: int = 0, kinds: Sequence[str] | None = None
) -> list[Prompt]:
    """``count`` prompts: paragraphs in a seeded order, the ``kinds`` in turn (default: the paragraph-instruction
    ones, ``TEMPLATES``; any of ``KINDS``). Deterministic given the inputs."""
    check_count(count, "the number of prompts", 1, MAX_PROMPTS)
    kinds = list(TEMPLATES) if kinds is None else check_kinds(kinds)
    material = paragraphs(documents)
    if len(material) < count:
        raise LinspecError(
            f"the text has {len(material)} paragraphs of {MIN_WORDS}..{MAX_WORDS} words; {count} prompts need as many"
        )
    random.Random(seed).shuffle(material)
    prompts = []
    for index, paragraph in enumerate(material[:count]):
        kind = kinds[index % len(kinds)]
        if kind in OPEN_TEMPLATES:
            prompts.append(Prompt(kind, OPEN_TEMPLATES[kind].format(subject=subject(paragraph))))
            continue
        if kind == "continue":
            words = paragraph.split()
            paragraph = " ".join(words[: len(words) // 2])
        prompts.append(Prompt(kind, TEMPLATES[kind].format(text=paragraph)))
    return prompts


def load_prompts(
    source: str, count: int, seed: int = 0, text_field: str = "text", kinds: Sequence[str] | None = None
) -> list[Prompt]:
    """Prompts from ``builtin:NAME`` or a corpus file (built with :func:`build_prompts` of ``kinds``), or read
    verbatim from a ``.jsonl`` file whose rows have a ``prompt`` field or a ``.txt`` file with one prompt per line
    (the first ``count`` of them)."""
    texts = verbatim_prompts(source)
    if texts is not None:
        if kinds is not None:
            raise LinspecError(f"{source} holds prompts verbatim; prompt kinds apply to prompts built from a corpus")
        return _verbatim(texts, count, source)
    from linspec.data.documents import load_documents

    return build_prompts(list(load_documents(source, text_field)["text"]), count, seed, kinds)


def verbatim_prompts(source: str) -> list[str] | None:
    """The prompts of a ``.txt`` (one per line) or ``.jsonl`` (``prompt`` fields) file; None for a corpus."""
    path = Path(source).expanduser()
    if not source.startswith("builtin:") and not path.is_file():
        raise LinspecError(f"{source}: no such prompt file (expected builtin:NAME, .txt or .jsonl)")
    if path.suffix not in (".txt", ".jsonl") or not path.is_file():
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines] if path.suffix == ".jsonl" else None
    except UnicodeDecodeError:
        raise LinspecError(f"{source} is not UTF-8 text") from None
    except ValueError as error:
        raise LinspecError(f"{source} is not valid JSON lines ({str(error).splitlines()[0][:80]})") from None
    if rows is None:
        return lines
    if rows and all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        return [r["prompt"] for r in rows]
    return None


def _verbatim(texts: list[str], count: int, source: str) -> list[Prompt]:
    check_count(count, "the number of prompts", 1, MAX_PROMPTS)
    if not texts:
        raise LinspecError(f"{source} has no prompts")
    return [Prompt("file", text) for text in texts[:count]]
