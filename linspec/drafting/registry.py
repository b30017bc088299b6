"""Every drafter kind in one table: its name, whether it needs a trained drafter directory, its settings.

The command line, the benchmarks and the training recipes read the list of kinds from here, so a kind is added
in one place.
"""

from __future__ import annotations

from linspec.drafting.store import KINDS as TRAINED_MODULES

TRAINED_KINDS: tuple[str, ...] = tuple(TRAINED_MODULES)  # trained from the target with linspec train, loaded from a dir
KINDS: tuple[str, ...] = ("none", "lookup", "early-exit", "model", *TRAINED_KINDS)


def needs_trained_drafter(kind: str) -> bool:
    """Whether ``kind`` drafts with a module trained for the target (``--drafter DIR``)."""
    return kind in TRAINED_KINDS
