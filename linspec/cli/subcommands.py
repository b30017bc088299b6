"""Sub-commands whose parsers are built only when chosen, so ``linspec --help`` lists them without importing them.

A command module may import torch-heavy code to describe its flags; ``linspec --help``, ``linspec --version`` and
``linspec OTHER ...`` should not pay for that. Each sub-command is registered with its name, its one-line help and
a function that adds its real parser; the real parser replaces the placeholder the moment argparse selects it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# A function that adds the command's real parser to the given sub-parsers action (``add_parser(subparsers)``).
ParserBuilder = Callable[[argparse._SubParsersAction], None]


class LazySubcommands(argparse._SubParsersAction):
    """``add_subparsers(action=LazySubcommands)``; then ``add_lazy(name, help, build)`` per sub-command."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._builders: dict[str, ParserBuilder] = {}

    def add_lazy(self, name: str, help: str, build: ParserBuilder) -> None:
        self.add_parser(name, help=help)  # a placeholder: its name and help are all that --help lists
        self._builders[name] = build

    def add_parser(self, name: str, **kwargs):
        if name in self._builders:  # the real parser takes the placeholder's place (and keeps its help line)
            kwargs.setdefault("help", next(a.help for a in self._choices_actions if a.dest == name))
            del self._name_parser_map[name]
            self._choices_actions = [action for action in self._choices_actions if action.dest != name]
            del self._builders[name]
        return super().add_parser(name, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        build = self._builders.get(values[0])
        if build is not None:
            build(self)
        super().__call__(parser, namespace, values, option_string)
