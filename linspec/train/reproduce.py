"""The ``linspec`` command lines that rebuild a model, for its card: rebuilt from the settings a run actually used.

A card that only lists settings leaves the reader to guess the flags; one that prints the command the user typed
loses what a Python caller passed, and a ``recipes/*.yaml`` path exists only in a source checkout. So the
commands are derived from the result: ``linspec convert`` flags from the ``LinspecConfig`` that was applied, and
``linspec train NAME key=value...`` from the difference between the resolved recipe and the shipped recipe it is
closest to. Each command is checked to rebuild exactly those settings before a card prints it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch
import yaml

from linspec.config import PRESETS, LinspecConfig
from linspec.errors import LinspecError

# Settings ``linspec convert`` has no flag for: only a preset sets them, so the preset is chosen to match them.
PRESET_ONLY = ("global_decay", "global_norm")
# Settings with a flag of their own syntax; every other ``LinspecConfig`` field is ``--field-name VALUE``.
LIST_FLAGS = ("softmax_layers", "softmax_heads")
DEFAULT_SHARD_SIZE = "2GB"


def convert_argv(
    src: str,
    out: str,
    settings: LinspecConfig,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> list[str] | None:
    """``["convert", SRC, OUT, "--preset", ...]``: the arguments of ``linspec`` that convert ``src`` into these
    ``settings`` (the preset needing the fewest flags), or None when no preset has their global memory."""
    candidates = [preset_flags(name, settings) for name in PRESETS]
    usable = [flags for flags in candidates if flags is not None]
    if not usable:
        return None
    argv = ["convert", src, out, *min(usable, key=len)]
    if settings.softmax_layers:
        argv += ["--softmax-layers", ",".join(map(str, settings.softmax_layers))]
    if settings.softmax_heads:
        argv += ["--softmax-heads", ",".join(f"{layer}:{head}" for layer, head in settings.softmax_heads)]
    written = str(dtype).removeprefix("torch.")
    if written != "float32":
        argv += ["--dtype", written]
    if max_shard_size != DEFAULT_SHARD_SIZE:
        argv += ["--max-shard-size", max_shard_size]
    argv += ["--allow-pickle"] * allow_pickle + ["--trust-remote-code"] * trust_remote_code
    return argv


def preset_flags(preset: str, settings: LinspecConfig) -> list[str] | None:
    """``["--preset", NAME, "--group-size", "32", ...]``: the preset and the flags that turn it into ``settings``
    (softmax layers and heads aside); None when the preset's global memory differs (no flag changes it)."""
    base = LinspecConfig.from_preset(preset)
    if any(getattr(base, name) != getattr(settings, name) for name in PRESET_ONLY):
        return None
    flags = ["--preset", preset]
    for field in dataclasses.fields(LinspecConfig):
        name = field.name
        if name in PRESET_ONLY or name in LIST_FLAGS or getattr(base, name) == getattr(settings, name):
            continue
        flags += [f"--{name.replace('_', '-')}", str(getattr(settings, name))]
    return flags


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
