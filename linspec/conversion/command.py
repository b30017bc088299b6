"""The ``linspec convert`` command line that rebuilds a conversion, for its card: derived from the settings applied.

A card that only lists settings leaves the reader to guess the flags, and one that prints the command the user
typed loses what a Python caller passed; so the flags are derived from the ``LinspecConfig`` the conversion
actually used, choosing the preset that needs the fewest of them.
"""

from __future__ import annotations

import dataclasses

import torch

from linspec.config import PRESETS, LinspecConfig

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
