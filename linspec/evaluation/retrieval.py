"""Retrieval from far back, scored in one forward per prompt: the passkey on a depth × length grid, several named
keys in one haystack (needle), and name–number pairs stated more than W tokens before the question (recall).

Every probe is a prompt that ends where the answer starts, and the answer. One pass through the model's own cache
(chunk by chunk, so long prompts fit in memory) gives the teacher-forced log-probability of the answer —
continuous, so a memory that helps a little shows where exact match is still 0 — and whether every answer token
is the argmax given the prompt and the answer's earlier tokens, which is exactly whether greedy decoding starts
with the answer. Probes are a pure function of (seed, their coordinates), so two models, or two runs, answer the
same prompts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from linspec.errors import LinspecError
from linspec.evaluation.passkey import FILLER, longest_fitting, make_trial
from linspec.utils.validation import MAX_LENGTH, MAX_TRIALS, check_count, check_seed

# Names of the keys (needle) and pairs (recall): common words, each its own idea, none in the filler.
NAMES = (
    "apple", "river", "lamp", "tiger", "violin", "castle", "pepper", "rocket", "garden", "mirror",
    "falcon", "copper", "island", "lantern", "marble", "orchid", "pencil", "saddle", "tunnel", "walnut",
)  # fmt: skip
MAX_KEYS = len(NAMES)  # needles per haystack, pairs per list
MAX_DEPTHS = 64  # depths per passkey grid

NEEDLE_INTRO = (
    "Several pass keys, each with a name, are hidden inside a lot of irrelevant text. Find them and memorize "
    "them. I will quiz you about one of them.\n"
)
NAMED_NEEDLE = "The pass key of the {name} is {key}. Remember it. "
NEEDLE_QUESTION = "\nWhat is the pass key of the {name}?"
NEEDLE_ANSWER = "The pass key of the {name} is"

RECALL_INTRO = "Here is a list of names, each with a number. Memorize it; I will ask for one of the numbers.\n"
PAIR = "{name}: {value}\n"
RECALL_QUESTION = "\nIn the list at the start, what is the number of {name}?"
RECALL_ANSWER = "The number of {name} is"


@dataclass(frozen=True)
class Probe:
    """A prompt ending where the answer starts, the answer, and where the probe sits (stored with its score)."""

    prompt_ids: list[int] = field(repr=False)
    answer: str
    answer_ids: list[int] = field(repr=False)
    where: dict


@dataclass(frozen=True)
class AnswerScore:
    logprob: float  # log p(answer | prompt) in nats, summed over the answer's tokens
    tokens: int  # the answer's tokens
    greedy: bool  # every answer token is the argmax: greedy decoding starts with the answer


def probe(tokenizer, prompt_ids: list[int], answer: str, **where) -> Probe:
    """A :class:`Probe` whose answer is ``answer`` after a space, tokenized as it follows the prompt."""
    return Probe(prompt_ids, answer, tokenizer.encode(" " + answer, add_special_tokens=False), where)


def score_answer(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], chunk: int = 512) -> AnswerScore:
    """Teacher-forced log-probability of ``answer_ids`` after ``prompt_ids``, and whether greedy decoding would give
    them: the prompt runs chunk-wise through the model's cache keeping one row of logits, then its last token and
    the answer's tokens but the last in one forward whose logits predict the answer."""
    import torch

    from linspec.models import hf
    from linspec.models.cache import new_cache_for

    check_count(chunk, "chunk", 1, MAX_LENGTH)
    if not prompt_ids or not answer_ids:
        raise LinspecError("a retrieval probe needs a prompt and an answer of at least one token each")
    device = next(model.parameters()).device
    ids = torch.tensor([*prompt_ids, *answer_ids], dtype=torch.long, device=device)
    split = len(prompt_ids) - 1
    cache = new_cache_for(model)
    with torch.no_grad():
        for piece in ids[:split].split(chunk):
            model(input_ids=piece[None], use_cache=True, logits_to_keep=1, **hf.cache_kwargs(cache))
        logits = model(input_ids=ids[split:-1][None], use_cache=True, **hf.cache_kwargs(cache)).logits[0].float()
    targets = ids[len(prompt_ids) :]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    return AnswerScore(float(logprobs.sum()), len(targets), bool((logits.argmax(-1) == targets).all()))


def score_probes(model, probes: Sequence[Probe], chunk: int = 512, progress: bool = True, desc: str = "") -> list[dict]:
    """One row per probe: its coordinates, the answer, the prompt's tokens, ``logprob`` and ``greedy``."""
    from tqdm.auto import tqdm

    from linspec.evaluation.lengths import check_within_positions

    if not probes:
        raise LinspecError("no retrieval prompts to score")
    longest = max(len(p.prompt_ids) + len(p.answer_ids) - 1 for p in probes)
    check_within_positions(model, longest, f"a prompt of {longest} tokens")
    model.eval()
    rows = []
    for item in tqdm(probes, desc=desc or "retrieval", disable=not progress):
        score = score_answer(model, item.prompt_ids, item.answer_ids, chunk)
        rows.append(
            {
                **item.where,
                "answer": item.answer,
                "prompt_tokens": len(item.prompt_ids),
                "logprob": round(score.logprob, 4),
                "answer_tokens": score.tokens,
                "greedy": score.greedy,
            }
        )
    return rows


def summarize(rows: Sequence[dict], by: Sequence[str]) -> list[dict]:
    """Rows grouped by the coordinates ``by`` (in first-seen order): trials, greedy accuracy, the mean
    log-probability of the answer and its mean NLL per answer token."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in by), []).append(row)
    return [
        {
            **dict(zip(by, coordinates, strict=True)),
            "trials": len(members),
            "accuracy": sum(r["greedy"] for r in members) / len(members),
            "logprob": sum(r["logprob"] for r in members) / len(members),
            "nll_per_token": sum(-r["logprob"] / r["answer_tokens"] for r in members) / len(members),
        }
        for coordinates, members in groups.items()
    ]


def check_depths(depths: Sequence[float]) -> list[float]:
    """1..MAX_DEPTHS distinct depths, each a finite fraction in 0..1, sorted; else one clear error."""
    if not depths or len(depths) > MAX_DEPTHS:
        raise LinspecError(f"give 1..{MAX_DEPTHS} depths, got {len(depths)}")
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1]
    if bad:  # NaN fails 0 <= d <= 1
        raise LinspecError(f"depths must be fractions in 0..1 (0: the start of the filler, 1: its end); got {bad[:5]}")
    return sorted({float(d) for d in depths})


def _check_common(trials: int, seed: int) -> None:
    check_count(trials, "trials", 1, MAX_TRIALS)
    check_seed(seed)


def passkey_grid_probes(
    tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int = 4, seed: int = 0
) -> list[Probe]:
    """``trials`` passkey prompts (``linspec.evaluation.passkey``) per (length, depth): the key exactly at that
    depth of the filler, a fresh seeded key each."""
    _check_common(trials, seed)
    probes = []
    for length in lengths:
        check_count(length, "length", 1, MAX_LENGTH)
        for depth in check_depths(depths):
            for index in range(trials):
                key = str(random.Random(f"passkey-grid:{seed}:{length}:{depth!r}:{index}").randrange(10000, 100000))
                trial = make_trial(tokenizer, length, depth, key)
                probes.append(probe(tokenizer, trial.prompt_ids, key, length=length, depth=depth, trial=index))
    return probes


def needle_probes(tokenizer, lengths: Sequence[int], keys: int = 4, trials: int = 8, seed: int = 0) -> list[Probe]:
    """``trials`` prompts per length holding ``keys`` named pass keys at random depths; the question asks for one
    of them, the others are distractors of the same form."""
    from linspec.data.prompts import encode_prompt

    _check_common(trials, seed)
    check_count(keys, "keys", 1, MAX_KEYS)
    probes = []
    for length in lengths:
        check_count(length, "length", 1, MAX_LENGTH)
        for index in range(trials):
            rng = random.Random(f"needle:{seed}:{length}:{keys}:{index}")
            names, values = _named_keys(rng, keys)
            depths = sorted(rng.random() for _ in range(keys))
            asked = rng.randrange(keys)

            def prompt(units: int, names=names, values=values, depths=depths, asked=asked) -> list[int]:
                text = (
                    NEEDLE_INTRO
                    + _with_needles(units, depths, names, values)
                    + NEEDLE_QUESTION.format(name=names[asked])
                )
                return encode_prompt(tokenizer, text, answer_prefix=NEEDLE_ANSWER.format(name=names[asked]))

            ids = longest_fitting(prompt, length, f"a prompt with {keys} needles")
            where = {"length": length, "keys": keys, "trial": index, "asked": names[asked], "depth": depths[asked]}
            probes.append(probe(tokenizer, ids, values[asked], **where))
    return probes


def _named_keys(rng: random.Random, count: int) -> tuple[list[str], list[str]]:
    """``count`` distinct names and ``count`` distinct 5-digit keys, drawn in that order (one seeded draw per prompt,
    shared by the needle and recall prompts)."""
    return rng.sample(NAMES, count), [str(v) for v in rng.sample(range(10000, 100000), count)]


def _with_needles(units: int, depths: Sequence[float], names: Sequence[str], values: Sequence[str]) -> str:
    """``units`` filler sentences with the named needles placed at their depths (sorted), whole sentences apart."""
    at = [round(depth * units) for depth in depths]
    pieces = []
    for unit in range(units + 1):
        pieces += [NAMED_NEEDLE.format(name=n, key=v) for n, v, a in zip(names, values, at, strict=True) if a == unit]
        if unit < units:
            pieces.append(FILLER)
    return "".join(pieces)


def recall_probes(tokenizer, pairs: Sequence[int], gap: int, trials: int = 8, seed: int = 0) -> list[Probe]:
    """``trials`` prompts per list size: a list of ``pairs`` name–number pairs, then at least ``gap`` tokens of
    filler, then a question for one name's number. The whole list is more than ``gap`` tokens before the answer, so
    a model that sees only its last ``gap`` tokens must recall it from its memory."""
    from linspec.data.prompts import encode_prompt

    _check_common(trials, seed)
    check_count(gap, "gap", 1, MAX_LENGTH)
    probes = []
    for size in pairs:
        check_count(size, "pairs", 1, MAX_KEYS)
        for index in range(trials):
            rng = random.Random(f"recall:{seed}:{size}:{gap}:{index}")
            names, values = _named_keys(rng, size)
            asked = rng.randrange(size)
            listing = RECALL_INTRO + "".join(PAIR.format(name=n, value=v) for n, v in zip(names, values, strict=True))

            def prompt(units: int, listing=listing, name=names[asked]) -> list[int]:
                text = listing + "\n" + FILLER * units + RECALL_QUESTION.format(name=name)
                return encode_prompt(tokenizer, text, answer_prefix=RECALL_ANSWER.format(name=name))

            ids, filler = _shortest_with_gap(prompt, gap)
            where = {"pairs": size, "gap": gap, "trial": index, "asked": names[asked], "position": asked + 1}
            probes.append(probe(tokenizer, ids, values[asked], filler_tokens=filler, **where))
    return probes


def _shortest_with_gap(prompt: Callable[[int], list[int]], gap: int) -> tuple[list[int], int]:
    """``(prompt(units), its filler tokens)`` for the fewest filler sentences that make at least ``gap`` tokens."""
    bare = len(prompt(0))
    per_unit = max(len(prompt(8)) - bare, 8) / 8
    units = max(math.ceil(gap / per_unit) - 1, 0)
    while len(prompt(units)) - bare < gap:
        units += 1
    while units > 0 and len(prompt(units - 1)) - bare >= gap:
        units -= 1
    ids = prompt(units)
    return ids, len(ids) - bare


def plot_passkey_grid(grids: dict[str, list[dict]]):
    """One heat map per model: depth (rows) × length (columns), coloured by greedy accuracy, each cell labelled
    with the accuracy and the mean log-probability of the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids) + 1, 4), squeeze=False)
    for ax, (label, cells) in zip(axes[0], grids.items(), strict=True):
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        at = {(c["depth"], c["length"]): c for c in cells}
        accuracy = [[at[(d, n)]["accuracy"] for n in lengths] for d in depths]
        image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        for row, depth in enumerate(depths):
            for column, length in enumerate(lengths):
                cell = at[(depth, length)]
                colour = "black" if cell["accuracy"] > 0.6 else "white"
                text = f"{cell['accuracy']:.2f}\n{cell['logprob']:.1f}"
                ax.text(column, row, text, ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("depth of the key")
        ax.set_title(label, fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), label="greedy accuracy (cell: accuracy, mean log p(key))")
    return figure


def plot_retrieval(curves: dict[str, list[dict]], x: str, xlabel: str, title: str):
    """Greedy accuracy and the mean log-probability of the answer against ``x``, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    for label, cells in curves.items():
        top.plot([c[x] for c in cells], [c["accuracy"] for c in cells], marker="o", label=label)
        bottom.plot([c[x] for c in cells], [c["logprob"] for c in cells], marker="o", label=label)
    top.set_ylim(-0.05, 1.05)
    top.set_ylabel("greedy accuracy")
    top.set_title(title)
    bottom.set_ylabel("mean log p(answer) (nats)")
    bottom.set_xlabel(xlabel)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    return figure
