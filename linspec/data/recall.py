"""Recall sequences: training text with facts stated at random depths and restated, in another order, at the end.

A model that keeps only a window of exact tokens (the linear layers) must leave long-range copying to the softmax
layers of a hybrid, and plain text asks for that copying too rarely for distillation to teach it. Here it is
asked for on purpose: a few short facts ("The code for the red fox is 40213.") are inserted into a sequence of
ordinary training text, and the sequence ends by stating every fact again in a shuffled order. The digits of each
restated code can only come from its first statement, up to thousands of tokens back, so the teacher's logits
there are retrieval, and the student is distilled on them like on every other position.

Everything is built in token space, so a recall sequence has exactly the length of the text sequence it is made
from, and is a pure function of (that text, the seed, the length, its index in the stream).
"""

from __future__ import annotations

import random

import torch

ADJECTIVES = (
    "red", "blue", "green", "silver", "golden", "quiet", "rapid", "ancient", "hidden", "northern", "southern",
    "wooden", "frozen", "bright", "hollow", "narrow", "gentle", "distant", "painted", "sleeping",
)  # fmt: skip
NOUNS = (
    "fox", "river", "tower", "lantern", "garden", "harbor", "mountain", "violin", "compass", "falcon", "bridge",
    "orchard", "engine", "island", "meadow", "castle", "library", "comet", "anchor", "forest",
)  # fmt: skip
MAX_FACTS = len(ADJECTIVES) * len(NOUNS)  # every label distinct within a sequence
TOKENS_PER_FACT = 128  # a sequence holds at most one fact per 128 tokens, so most of it stays ordinary text
RESTATE_HEADER = "\n\nThe codes above, once more:\n"


def statement(label: str, code: str) -> str:
    return f"The code for the {label} is {code}."


def recall_sequence(text: torch.Tensor, tokenizer, facts: int, rng: random.Random) -> torch.Tensor:
    """A 1-D sequence as long as ``text`` (1-D token ids): its first tokens with ``facts`` facts inserted at random
    depths, then every fact restated in a shuffled order. ``text`` itself when it is too short for one fact."""
    length = text.numel()
    count = min(facts, length // TOKENS_PER_FACT)
    if count == 0:
        return text

    def encode(piece: str) -> list[int]:
        return tokenizer.encode(piece, add_special_tokens=False)

    labels = rng.sample([f"{a} {n}" for a in ADJECTIVES for n in NOUNS], count)
    codes = [f"{rng.randrange(10000, 100000)}" for _ in labels]
    stated = [encode(f"\n{statement(label, code)}\n") for label, code in zip(labels, codes, strict=True)]
    order = rng.sample(range(count), count)
    tail = encode(RESTATE_HEADER + "\n".join(statement(labels[i], codes[i]) for i in order) + "\n")
    body = length - len(tail) - sum(map(len, stated))
    if body < length // 2:  # the tokenizer spends far more tokens on a fact than expected: leave the text alone
        return text
    cuts = sorted(rng.randrange(body + 1) for _ in range(count))
    pieces, start = [], 0
    for cut, fact in zip(cuts, stated, strict=True):
        pieces += [text[start:cut], torch.tensor(fact, dtype=text.dtype)]
        start = cut
    pieces += [text[start:body], torch.tensor(tail, dtype=text.dtype)]
    return torch.cat(pieces)
