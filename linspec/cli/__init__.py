"""``linspec`` command line: thin parsers that call one library function each and print the result.

Every library error (``LinspecError``, ``OSError``, ``ValueError``) becomes one line on stderr and exit code 2;
nothing is half-written because every writer in the library is atomic.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (sub-command, module under linspec.cli): each module has ``add_parser(subparsers)`` setting ``func``.
COMMANDS = [
    ("convert", "convert"),
    ("generate", "generate"),
    ("bench", "bench"),
    ("train", "train"),
    ("eval", "evaluate"),
    ("demo", "demo"),
    ("env", "env"),
    ("recipes", "recipes"),
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("linspec")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from linspec import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linspec",
        description="Linearize pretrained LLMs (grouped linear attention + causal depthwise conv) and generate fast.",
        epilog="example: linspec convert smollm2-135m out/smollm2-linear && linspec generate out/smollm2-linear "
        "--prompt 'Hello'",
    )
    parser.add_argument("--version", action="version", version=f"linspec {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, module_name in COMMANDS:
        importlib.import_module(f"linspec.cli.{module_name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("linspec: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:  # LinspecError is a ValueError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"linspec {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
