"""Chat-preserving distillation data: the original model's own answers to instruction prompts.

Distilling a converted instruct model on plain text restores language modelling but not the chat behaviour: the
student never sees the chat template, a user turn or an answer. So instruction prompts are built from paragraphs
of a corpus (no instruction dataset is available offline), the *original* model answers each one in its own chat
template, and the rendered conversations are mixed with the plain text. The distillation loss then teaches the
student the teacher's distribution on exactly the kind of sequence the instruct model is used for.

Answers are generated once, with a progress bar, and cached as JSONL under ``$LINSPEC_CACHE/chat/`` in a file
named by a hash of everything that decides them: the base model, the prompts and the generation settings. A
second run, a resumed run and every process of a distributed run read the same file.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from linspec.data.prompts import render_chat
from linspec.data.settings import Chat
from linspec.errors import LinspecError
from linspec.utils.io import atomic_write_text
from linspec.utils.paths import cache_root

# "{text}" is a paragraph of the corpus (for "continue", its first half).
TEMPLATES = (
    "Summarise the following paragraph in one sentence.\n\n{text}",
    "Continue the text:\n\n{text}",
    "What is the main topic of the following text? Answer briefly.\n\n{text}",
    "List three facts stated in this text.\n\n{text}",
    "Write one question that this text answers, then answer it.\n\n{text}",
)
MIN_WORDS, MAX_WORDS = 40, 120  # paragraphs used as material; longer ones are cut at MAX_WORDS
CACHE_FORMAT = 1  # bump when the cached rows or the way they are made change


def instruction_prompts(corpus: str, n: int, seed: int) -> list[str]:
    """``n`` instruction prompts made from paragraphs of ``corpus`` (``builtin:NAME`` or a local file):
    paragraphs in a seeded order, the templates in turn. The same arguments always give the same prompts."""
    from linspec.data.documents import load_documents

    material = []
    for document in load_documents(corpus)["text"]:
        for block in document.split("\n"):
            words = block.split()
            if len(words) >= MIN_WORDS:
                material.append(" ".join(words[:MAX_WORDS]))
    if len(material) < n:
        raise LinspecError(f"{corpus} has {len(material)} paragraphs of {MIN_WORDS}+ words; {n} prompts need as many")
    random.Random(seed).shuffle(material)
    prompts = []
    for index, paragraph in enumerate(material[:n]):
        template = TEMPLATES[index % len(TEMPLATES)]
        if template.startswith("Continue"):
            words = paragraph.split()
            paragraph = " ".join(words[: len(words) // 2])
        prompts.append(template.format(text=paragraph))
    return prompts


def cache_file(base: str, prompts: list[str], chat: Chat) -> Path:
    """Where the answers for (base model, prompts, generation settings) live; any change gives a new file."""
    settings = {"temperature": chat.temperature, "max_new_tokens": chat.max_new_tokens, "seed": chat.seed}
    key = json.dumps({"format": CACHE_FORMAT, "base": base, "prompts": prompts, "settings": settings})
    return cache_root() / "chat" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.jsonl"


def conversations(chat: Chat, base: str, model, tokenizer, *, progress: bool = True) -> list[str]:
    """The rendered conversations (system turn if the template has one, user prompt, the original model's
    answer), generated on the first call and read from the cache afterwards."""
    if not getattr(tokenizer, "chat_template", None):
        raise LinspecError(f"recipe key data.chat: the tokenizer of {base} has no chat template; chat data needs one")
    prompts = instruction_prompts(chat.prompts, chat.num_prompts, chat.seed)
    path = cache_file(base, prompts, chat)
    rows = read_rows(path, prompts)
    if rows is None:
        answers = generate_answers(model, tokenizer, prompts, chat, progress=progress)
        rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return [
        render_chat(
            tokenizer,
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}],
            tokenize=False,
        )
        for row in rows
    ]


def read_rows(path: Path, prompts: list[str]) -> list[dict] | None:
    """The cached rows, or None when there is no usable cache (missing, torn or for other prompts)."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return None
    if [row.get("prompt") if isinstance(row, dict) else None for row in rows] != prompts:
        return None
    if not all(isinstance(row.get("answer"), str) for row in rows):
        return None
    return rows


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], chat: Chat, *, progress: bool = True) -> list[str]:
    """The model's answers, ``chat.batch_size`` prompts at a time (left-padded), greedy or sampled."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(chat.seed)  # sampled answers depend on the seed only, and the caller's RNG is left alone
    texts = [
        render_chat(tokenizer, [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": chat.temperature} if chat.temperature > 0 else {"do_sample": False}
    answers = []
    bar = tqdm(total=len(texts), desc="chat data", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(texts), chat.batch_size):
            batch = tokenizer(
                texts[start : start + chat.batch_size],
                add_special_tokens=False,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=chat.max_new_tokens,
                pad_token_id=pad,
                top_k=None,
                top_p=None,
                **sampling,
            )  # (B, prompt + new)
            new = out[:, batch["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
            bar.update(len(new))
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return answers
