"""Passkey retrieval: can the model fetch one exact fact from far back in its context?

A 5-digit key sits at a random depth in repetitive filler; the prompt ends by asking for it and starting the
answer ("The pass key is"). Greedy decoding; a trial passes when the first number in the answer is the key.
Pure linear attention compresses the past into a fixed-size state, so this is where it fails first and where
keeping a few layers softmax (a hybrid) pays. Every trial is a pure function of (seed, length, trial index).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from linspec.errors import LinspecError
from linspec.utils.validation import MAX_TRIALS, check_count, check_seed

INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
DEPTH_BUCKETS = ("0-33%", "33-67%", "67-100%")
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class Trial:
    length: int  # target prompt length in tokens (the real one is at most this)
    depth: float  # where the key sits, 0 = start of the filler, 1 = end
    key: str
    prompt_ids: list[int] = field(repr=False)

    @property
    def bucket(self) -> str:
        return DEPTH_BUCKETS[min(int(self.depth * len(DEPTH_BUCKETS)), len(DEPTH_BUCKETS) - 1)]


def longest_fitting(prompt: Callable[[int], list[int]], length: int, what: str = "a passkey prompt") -> list[int]:
    """``prompt(units)`` for the most filler sentences (``units``) that keep it within ``length`` tokens.

    Every retrieval prompt is text around a number of whole filler sentences; fitting by whole sentences keeps
    the text natural and the key's depth exact."""
    overhead = len(prompt(0))
    per_unit = max(len(prompt(8)) - overhead, 8) / 8
    if overhead > length:
        raise LinspecError(f"length {length} is too short for {what} (at least {overhead} tokens)")
    units = int((length - overhead) / per_unit) + 1
    ids = prompt(units)
    while len(ids) > length and units > 0:
        units -= 1
        ids = prompt(units)
    return ids


def make_trial(tokenizer, length: int, depth: float, key: str, chat: bool | None = None) -> Trial:
    """The longest prompt of whole filler sentences that fits in ``length`` tokens, key at ``depth``."""
    from linspec.data.prompts import encode_prompt

    def prompt(units: int) -> list[int]:
        at = round(depth * units)
        text = INTRO + FILLER * at + NEEDLE.format(key=key) + FILLER * (units - at) + QUESTION
        return encode_prompt(tokenizer, text, chat=chat, answer_prefix=ANSWER_PREFIX)

    return Trial(length, depth, key, longest_fitting(prompt, length))


def make_trials(tokenizer, length: int, trials: int, seed: int = 0, chat: bool | None = None) -> list[Trial]:
    """``trials`` prompts of ``length`` tokens; depths spread over the buckets, keys random, both seeded."""
    check_count(trials, "trials", 1, MAX_TRIALS)
    check_seed(seed)
    made = []
    for index in range(trials):
        rng = random.Random(f"{seed}:{length}:{index}")
        bucket = index % len(DEPTH_BUCKETS)  # every bucket gets trials even when there are few
        depth = (bucket + rng.random()) / len(DEPTH_BUCKETS)
        made.append(make_trial(tokenizer, length, depth, f"{rng.randrange(10000, 100000)}", chat))
    return made


def answer_key(answer: str) -> str | None:
    """The first run of digits in an answer (the model's key), or None."""
    found = re.search(r"\d+", answer)
    return found.group(0) if found else None


@dataclass
class PasskeyResult:
    length: int
    accuracy: float
    trials: int
    by_depth: dict[str, float]  # bucket -> accuracy
    answers: list[dict]  # per trial: depth, key, answer text, correct


def passkey_accuracy(
    model, tokenizer, lengths: Sequence[int], trials: int = 12, seed: int = 0, chunk: int = 512, progress: bool = True
) -> list[PasskeyResult]:
    """Exact-match rate per length (and per depth bucket) of greedy answers."""
    from tqdm.auto import tqdm

    from linspec.evaluation.greedy import greedy_generate, stop_ids
    from linspec.evaluation.lengths import check_lengths

    lengths = check_lengths(model, lengths)
    check_count(trials, "trials", 1, MAX_TRIALS)
    check_seed(seed)
    stop = stop_ids(tokenizer, model)
    results = []
    bar = tqdm(total=len(lengths) * trials, desc="passkey", disable=not progress)
    for length in lengths:
        rows = []
        for trial in make_trials(tokenizer, length, trials, seed):
            tokens = greedy_generate(model, trial.prompt_ids, ANSWER_TOKENS, stop, chunk)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            rows.append(
                {
                    "depth": round(trial.depth, 3),
                    "bucket": trial.bucket,
                    "key": trial.key,
                    "answer": text,
                    "prompt_tokens": len(trial.prompt_ids),
                    "correct": answer_key(text) == trial.key,
                }
            )
            bar.update()
        by_depth = {
            b: sum(r["correct"] for r in rows if r["bucket"] == b) / n
            for b in DEPTH_BUCKETS
            if (n := sum(r["bucket"] == b for r in rows))
        }
        results.append(PasskeyResult(length, sum(r["correct"] for r in rows) / len(rows), len(rows), by_depth, rows))
        bar.set_postfix(length=length, accuracy=f"{results[-1].accuracy:.2f}")
    bar.close()
    return results


def plot_passkey(curves: dict[str, list[PasskeyResult]]):
    """Accuracy vs prompt length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from linspec.evaluation.lengths import length_axis

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, results in curves.items():
        axes.plot([r.length for r in results], [r.accuracy for r in results], marker="o", label=label)
    length_axis(axes, [r.length for results in curves.values() for r in results])
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel("prompt length (tokens)")
    axes.set_ylabel("passkey exact-match rate")
    axes.set_title("passkey retrieval vs context length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure


def key_nll_scorer(tokenizer, length: int, trials: int = 4, seed: int = 1):
    """A function ``model -> mean NLL per key token`` over ``trials`` passkey prompts of ``length`` tokens.

    Teacher-forced (the key appended to the prompt, one full forward each), so it is continuous where exact-match
    accuracy is all-or-nothing, and cheap enough to run once per layer: what ``linspec eval layers --by passkey``
    ranks layers by. The seed differs from ``passkey_accuracy``'s default so a ranking is not chosen on the
    prompts it is then reported on.
    """
    import torch

    examples = []
    for trial in make_trials(tokenizer, length, trials, seed):
        answer = tokenizer.encode(" " + trial.key, add_special_tokens=False)
        examples.append((torch.tensor([trial.prompt_ids + answer]), len(answer)))

    @torch.no_grad()
    def score(model) -> float:
        total = 0.0
        for ids, answer_tokens in examples:
            ids = ids.to(model.device)
            logits = model(ids, use_cache=False).logits[0, -answer_tokens - 1 : -1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, -answer_tokens:]).item()
        return total / len(examples)

    return score
