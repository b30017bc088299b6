"""The ``linspec`` command lines that rebuild a model, for its card: rebuilt from the settings a run actually used.

A card that only lists settings leaves the reader to guess the flags; one that prints the command the user typed
loses what a Python caller passed, and a recipe file's path exists only on the machine that ran it. So the
commands are derived from the result: ``linspec train NAME key=value...`` from the difference between the resolved
recipe and the shipped recipe it is closest to (the ``linspec convert`` flags of a conversion are
``linspec.conversion.command``'s). Each command is checked to rebuild exactly those settings before a card prints it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import yaml

from linspec.errors import LinspecError


def train_argv(recipe: Any) -> list[str] | None:
    """``["train", NAME, "key=value", ...]`` for a training ``Recipe``: see :func:`recipe_argv`."""
    from linspec.train.recipe import load_recipe

    return recipe_argv(dataclasses.asdict(recipe), load_recipe)


def drafter_train_argv(resolved: dict) -> list[str] | None:
    """The same for the recipe a drafter directory records (``drafter.json``), given as its mapping."""
    from linspec.train.recipe import load_recipe

    return recipe_argv(resolved, load_recipe)


def recipe_argv(resolved: dict, load: Callable[..., Any]) -> list[str] | None:
    """``["train", NAME, "key=value", ...]``: the shipped recipe closest to ``resolved`` (the shortest overrides)
    and the overrides that turn it into ``resolved`` exactly (checked by loading them with ``load``), or None when
    no shipped recipe can (none of that kind, or a difference the overrides cannot express)."""
    from linspec.train.catalog import shipped_recipes

    wanted = _plain(resolved)
    best: tuple[str, list[str]] | None = None
    for name in shipped_recipes():
        try:
            shipped = _plain(dataclasses.asdict(load(name)))
        except LinspecError:  # a recipe of another kind, or one this installation cannot load
            continue
        overrides = recipe_overrides(shipped, wanted)
        if best is None or len(" ".join(overrides)) < len(" ".join(best[1])):  # the shortest command line
            best = (name, overrides)
    if best is None:
        return None
    name, overrides = best
    try:
        if _plain(dataclasses.asdict(load(name, overrides))) != wanted:
            return None
    except LinspecError:
        return None
    return ["train", name, *overrides]


def _plain(data: Any) -> Any:
    """``data`` as JSON would give it back (tuples as lists), so a recorded recipe compares with a loaded one."""
    return json.loads(json.dumps(data))


def recipe_overrides(shipped: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``key=value`` assignments (``linspec train``'s override syntax) that turn the mapping ``shipped`` into
    ``wanted``: the smallest keys that differ, list items by index where the lengths agree."""
    if shipped == wanted:
        return []
    if isinstance(shipped, dict) and isinstance(wanted, dict) and set(shipped) == set(wanted):
        return [item for key in wanted for item in recipe_overrides(shipped[key], wanted[key], f"{prefix}{key}.")]
    if isinstance(shipped, list) and isinstance(wanted, list) and len(shipped) == len(wanted):
        pairs = zip(shipped, wanted, strict=True)
        return [item for i, (a, b) in enumerate(pairs) for item in recipe_overrides(a, b, f"{prefix}{i}.")]
    return [f"{prefix.rstrip('.')}={yaml_value(wanted)}"]


def yaml_value(value: Any) -> str:
    """``value`` on one line as YAML (what an override's right-hand side is parsed as)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("\n...\n").strip()
