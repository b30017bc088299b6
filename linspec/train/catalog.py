"""The recipes shipped with linspec (installed as ``linspec.recipes``), by name.

``linspec train NAME`` accepts a shipped recipe's name as well as a path, so an installed linspec trains without a
source checkout; ``linspec recipes cp NAME DEST`` copies one out to edit.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from linspec.errors import LinspecError
from linspec.utils.io import atomic_write_bytes


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of every shipped recipe (the file name without ``.yaml``), sorted by name."""
    folder = resources.files("linspec.recipes")
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                found[entry.name[: -len(".yaml")]] = Path(path)
    return dict(sorted(found.items()))


def summary(path: Path) -> str:
    """A recipe's summary: the first sentence of its first comment paragraph after the command line."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            if words:
                break
            continue
        words.append(text)
    paragraph = " ".join(words)
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def resolve_recipe(name_or_path: str) -> Path:
    """An existing file as given, else a shipped recipe of that name (``.yaml`` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = shipped_recipes()
    name = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    if name in recipes and "/" not in name_or_path:
        return recipes[name]
    raise LinspecError(
        f"recipe not found: {name_or_path} is neither a file nor a shipped recipe ({', '.join(recipes)}; "
        "linspec recipes ls)"
    )


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy shipped recipe ``name`` to ``dest`` (a file, or a directory to put ``NAME.yaml`` in)."""
    recipes = shipped_recipes()
    if name not in recipes:
        raise LinspecError(f"no shipped recipe {name!r}; shipped: {', '.join(recipes)}")
    if not str(dest):
        raise LinspecError("the destination is empty; give a file name or a directory")
    if str(dest) == "-":  # the usual name of stdout, not a file to leave in the working directory
        raise LinspecError(f"'-' is not a file name here; `linspec train {name} --check` prints the recipe")
    target = Path(dest)
    if target.is_dir():
        target = target / f"{name}.yaml"
    elif str(dest).endswith(("/", os.sep)):  # Path() drops the slash that says "a directory"
        raise LinspecError(f"{dest} is not a directory")
    if target.is_symlink():  # writing "through" it would change a file elsewhere; replacing it would surprise
        raise LinspecError(f"{target} is a symbolic link; copy to a plain file name instead")
    if target.exists() and not force:
        raise LinspecError(f"{target} exists; pass --force to overwrite it")
    if target.exists() and not target.is_file():
        raise LinspecError(f"{target} exists and is not a file")
    if not target.parent.is_dir():
        raise LinspecError(f"{target.parent} is not a directory")
    atomic_write_bytes(target, recipes[name].read_bytes())  # a fresh temporary beside it, renamed over it
    return target
