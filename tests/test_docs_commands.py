"""Every ``linspec`` command the README and the docs show is one the CLI accepts, with flags that exist.

Docs rot silently when a flag is renamed; here each documented command line goes through the real argument
parser, recipes are named as a pip install knows them (``linspec train NAME``, not a checkout path), and the
files the docs point at exist. The commands that are cheap enough run end to end in their own tests
(``test_cli.py``, ``test_generate_cli.py``, ``test_readme.py``, ``.ci/wheel``); this test keeps the rest honest.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from linspec.cli import build_parser
from linspec.train.catalog import shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|console)\n(.*?)```", flags=re.S)


def documented_commands() -> list[tuple[str, str]]:
    """``(document name, command)`` for each ``linspec ...`` command in a shell block, continuations joined."""
    found = []
    for document in DOCUMENTS:
        for block in SHELL_BLOCK.findall(document.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|\|\||;", line):
                    words = _words(part)
                    if words and words[0].endswith("linspec") and not words[0].endswith(".py"):
                        found.append((document.name, shlex.join(words)))
    return found


def _words(part: str) -> list[str]:
    """A shell fragment's words, without its comment, a pipe's tail or a redirection."""
    part = part.split(" | ")[0]
    try:
        words = shlex.split(part, comments=True)
    except ValueError:  # an unbalanced quote inside a comment
        words = shlex.split(part.split(" #")[0])
    return [word for word in words if not word.startswith((">", "<", "2>"))]


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30
    assert {name for name, _ in COMMANDS} >= {"README.md"}


@pytest.mark.parametrize(("document", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_every_documented_command_parses(document, command, capsys):
    words = shlex.split(command)[1:]
    if words in (["--version"], ["--help"]) or words[-1:] == ["--help"]:
        return  # argparse answers these by exiting 0; they are run in test_cli
    try:
        args = build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"{document}: `{command}` is refused by the CLI: {capsys.readouterr().err.strip()}")
    assert callable(args.func)
    if args.command == "train":
        recipe = getattr(args, "recipe", None)
        assert recipe in shipped_recipes(), (
            f"{document}: `{command}` names no shipped recipe (a pip install knows recipes by name)"
        )


def test_recipes_are_named_not_pathed():
    pathed = [
        f"{document.name}: {match}"
        for document in DOCUMENTS
        for match in re.findall(r"recipes/[\w.-]+\.yaml", document.read_text(encoding="utf-8"))
    ]
    assert not pathed, "recipes are shipped inside the package; name them (linspec train NAME): " + ", ".join(pathed)


def test_the_files_the_docs_point_at_exist():
    missing = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for path in re.findall(r"`((?:docs|linspec|tests|\.ci)/[\w./-]+\.(?:md|py|json|png|txt|yaml))`", text):
            if not re.search(r"\b[A-Z]{3,}\b", path) and not (ROOT / path).exists():  # NAME: a placeholder
                missing.append(f"{document.name}: {path}")
    assert not missing, "the docs point at files that do not exist: " + ", ".join(missing)
