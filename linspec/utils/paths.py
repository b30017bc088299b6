"""Paths linspec chooses: the cache root, and one validator for every name a recipe, an override or a flag turns
into a path.

Everything linspec caches (demo models, corpora, chat answers, drafting data) lives under :func:`cache_root`, so
``LINSPEC_CACHE`` moves all of it at once.

A stage name, a benchmark name or a checkpoint label is joined onto a directory linspec owns
(``OUTPUT/stages/<name>``, ``docs/<name>.json``). ``Path("run") / "/etc"`` is ``/etc`` and ``"../x"`` climbs out,
so such a name is refused up front unless it is one plain, portable file name; :func:`child_path` then checks the
joined path again, so a name that slipped past validation still cannot leave its directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from linspec.errors import LinspecError

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def cache_root() -> Path:
    """Root of linspec's cache: ``$LINSPEC_CACHE`` if set, else the platform's user cache directory."""
    env = os.environ.get("LINSPEC_CACHE")
    if env:
        root = Path(env).expanduser()
        if root.exists() and not root.is_dir():  # else every cache write fails with "Not a directory: .../models"
            raise LinspecError(f"LINSPEC_CACHE={env} is a file; point it at a folder (or unset it)")
        return root
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("linspec"))


def check_name(name: object, what: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise naming ``what`` (e.g. ``stages[1].name``).

    Safe: 1..64 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit — so no
    separators, no ``..``, no hidden or absolute names, no control characters, the same on every file system.
    """
    if not isinstance(name, str):
        raise LinspecError(f"{what}: expected a name, got {type(name).__name__} {name!r:.40}")
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise LinspecError(
            f"{what}: {shown!r} is not a plain name (letters, digits, '.', '_', '-'; starting with a letter or "
            f"digit; at most {MAX_NAME_LENGTH} characters)"
        )
    return name


def child_path(parent: str | os.PathLike, name: str, what: str) -> Path:
    """``parent / name`` for a validated ``name``, checked to resolve inside ``parent`` (symlinks included)."""
    check_name(name, what)
    parent = Path(parent)
    child = parent / name
    resolved_parent = parent.resolve()
    if resolved_parent not in child.resolve().parents:
        raise LinspecError(f"{what}: {name!r} leads outside {parent} (a symbolic link?)")
    return child


def refuse_output_over_source(output: str | os.PathLike, source: str | os.PathLike, what: str) -> None:
    """Refuse an ``output`` directory that is ``source`` or holds it: writing the output (and replacing it, with
    ``--force``) would destroy the input it is made from. ``source`` may be a local path or any other name (a
    hub id, a demo name), which cannot be under ``output``."""
    source_path = Path(source)
    if not source_path.exists():
        return
    held, out = source_path.resolve(), Path(output).resolve()
    if held == out or out in held.parents:
        raise LinspecError(f"{what}: {output} would overwrite {source} that it is made from; choose another output")
