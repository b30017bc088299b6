"""Repetition measures of generated token sequences: the symptom of a model that lost its long-range grip.

A linearized model that cannot look back sharply tends to loop ("the the the", a sentence over and over), so
its answers are compared with the original's on three measures: distinct-n (unique n-grams / n-grams), the
longest n-gram that occurs twice, and whether the answer ends in a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# An answer loops when a block of at most LOOP_MAX_PERIOD tokens repeats back to back LOOP_MIN_REPEATS times
# and the repeats cover at least LOOP_MIN_TOKENS tokens (so "no, no, no" alone does not count).
LOOP_MAX_PERIOD = 32
LOOP_MIN_REPEATS = 3
LOOP_MIN_TOKENS = 8


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Unique n-grams / n-grams of one sequence; 1.0 when it is too short to have any."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeated_ngram(tokens: Sequence[int]) -> int:
    """The largest n such that some n-gram occurs at least twice (occurrences may overlap); 0 if none."""

    def repeats(n: int) -> bool:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            if gram in seen:
                return True
            seen.add(gram)
        return False

    low, high = 0, max(len(tokens) - 1, 0)  # a repeat of length n implies one of every shorter length
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if repeats(middle) else (low, middle - 1)
    return low


def has_loop(tokens: Sequence[int]) -> bool:
    """Whether a block of ≤ LOOP_MAX_PERIOD tokens repeats back to back (see the constants above)."""
    tokens = list(tokens)
    for period in range(1, LOOP_MAX_PERIOD + 1):
        run = 0  # positions i with tokens[i] == tokens[i - period], consecutively
        for i in range(period, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            repeats = run // period + 1
            if repeats >= LOOP_MIN_REPEATS and (run + period) >= LOOP_MIN_TOKENS:
                return True
    return False


@dataclass
class Repetition:
    distinct_2: float  # mean over answers
    distinct_3: float
    longest_repeat: float  # mean longest repeated n-gram
    max_longest_repeat: int
    loop_share: float  # share of answers with a loop

    @classmethod
    def of(cls, answers: Sequence[Sequence[int]]) -> Repetition:
        if not answers:
            raise ValueError("no answers to measure")
        count = len(answers)
        longest = [longest_repeated_ngram(a) for a in answers]
        return cls(
            distinct_2=sum(distinct_n(a, 2) for a in answers) / count,
            distinct_3=sum(distinct_n(a, 3) for a in answers) / count,
            longest_repeat=sum(longest) / count,
            max_longest_repeat=max(longest),
            loop_share=sum(has_loop(a) for a in answers) / count,
        )
