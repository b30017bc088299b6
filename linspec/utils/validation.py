"""Bounded numbers from users: one check for every count, size and seed linspec reads from a flag, a recipe or an
API call, so each is refused up front in one line, before a model loads or a file is written.

An unbounded count is a denial of service on the user's own machine (``--trials 100000000`` runs for days, a
seed past 64 bits fails only when it reaches torch, after a run directory was made), so every count has an upper
bound far above any useful value, and the message says the range.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from linspec.errors import LinspecError

# Seeds reach ``torch.manual_seed``, ``numpy`` and arithmetic such as ``seed * 1_000_003 + step``: 32 bits keep
# every one of them exact, and are more seeds than anyone needs.
MAX_SEED = 2**32 - 1
# Evaluation counts: each bound is far above a useful run (the shipped docs use 12 trials, 16 prompts, 64 new
# tokens, 4 windows) and far below one that would run for days on a CPU.
MAX_LENGTH = 1 << 20  # tokens of a context, a window, a chunk or a scored span
MAX_TRIALS = 1 << 12  # passkey prompts per length
MAX_WINDOWS = 1 << 12  # blocks of text per perplexity curve
MAX_PROMPTS = 1 << 14  # prompts answered per model
MAX_NEW_TOKENS = 1 << 14  # tokens generated per answer
MAX_DOCUMENTS = 1 << 24  # harness documents per task
MAX_FEWSHOT = 1 << 10  # harness few-shot examples


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_count(value: Any, low: int = 1, high: int | None = None) -> bool:
    """Whether ``value`` is an integer in ``low..high`` (``high`` None: no upper bound). Booleans are not counts:
    ``True`` is an ``int`` to Python, never to a user. For lists whose bad entries are named together."""
    return not isinstance(value, bool) and isinstance(value, int) and low <= value and (high is None or value <= high)


def check_count(value: Any, name: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an integer in ``low..high`` (``high`` None: no upper bound), else one ``LinspecError`` naming
    ``name`` and the range."""
    if not is_count(value, low, high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise LinspecError(f"{name} must be an integer {bound}, got {_shown(value)}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in ``0..MAX_SEED``."""
    return check_count(value, name, 0, MAX_SEED)


def check_number(value: Any, name: str, *, allow_zero: bool = False, limit: float | None = None) -> None:
    """A finite number > 0 (``allow_zero``: >= 0), at most ``limit``; None passes (an optional setting left out).

    The messages read ``NAME: must be > 0, got ...`` so that a recipe key reads as the key's own complaint."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LinspecError(f"{name}: must be a finite number, got {_shown(value)}")
    if value < 0 or (value == 0 and not allow_zero):
        raise LinspecError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {_shown(value)}")
    if limit is not None and value > limit:
        raise LinspecError(f"{name}: must be at most {limit}, got {_shown(value)}")


def count_arg(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``low..high``, refused by the parser in one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r:.40}") from None
        try:
            return check_count(value, "the value", low, high)
        except LinspecError as error:
            raise argparse.ArgumentTypeError(str(error).replace("the value ", "")) from None

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


def text_arg(text: str) -> str:
    """An argparse ``type`` for a name or address that must hold something (``--name ""`` is a slip, not a choice)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def seed_arg() -> Callable[[str], int]:
    """An argparse ``type`` for ``--seed``: ``0..MAX_SEED``."""
    return count_arg(0, MAX_SEED)
