"""``linspec`` command line: thin parsers that call one library function each and print the result.

Every library error (``LinspecError``, ``OSError``, ``ValueError``) and every command-line mistake becomes one
line on stderr and exit code 2; nothing is half-written because every writer in the library is atomic.
``linspec --help`` and ``--version`` import no command module (``linspec.cli.subcommands``): a command's parser,
and whatever it imports, loads only when that command is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

from linspec.cli.subcommands import LazySubcommands

# (sub-command, module under linspec.cli, one-line help): each module has ``add_parser(subparsers)`` setting ``func``.
COMMANDS = [
    ("convert", "convert", "convert a softmax-attention checkpoint into a linspec model directory"),
    ("generate", "generate", "generate text, optionally with exact speculative decoding"),
    ("chat", "chat", "chat with a model in the terminal (chat template, streamed replies, optional drafter)"),
    ("serve", "serve", "serve a linspec model with vLLM's OpenAI-compatible server (needs linspec[vllm])"),
    ("bench", "bench", "run a benchmark and record its results"),
    ("train", "train", "fine-tune a converted model with a recipe (attention transfer, LoRA, distillation)"),
    ("eval", "evaluate", "evaluate a model: perplexity, ablations of γ and the conv, which layers to keep softmax"),
    ("demo", "demo", "fetch the demo model, convert it, generate, and compare decode speed"),
    ("env", "env", "print versions, the device, and whether the installed versions are the tested (locked) set"),
    ("recipes", "recipes", "list the shipped training recipes, or copy one out to edit"),
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("linspec")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from linspec import __version__

        return __version__


MAX_MESSAGE = 300  # characters of an error line; the rest of a long message is cut


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``linspec CMD: error: ...``), like every other linspec error.

    Sub-command parsers are made from their parent's class, so the whole tree answers the same way.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """The first non-empty line of ``message``, at most ``MAX_MESSAGE`` characters."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="linspec",
        description="Linearize pretrained LLMs (grouped linear attention + causal depthwise conv) and generate fast.",
        epilog="example: linspec convert smollm2-135m out/smollm2-linear && linspec generate out/smollm2-linear "
        "--prompt 'Hello'",
    )
    parser.add_argument("--version", action="version", version=f"linspec {_version()}")
    parser.register("action", "parsers", LazySubcommands)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        subparsers.add_lazy(name, help_text, _module_parser(module_name))
    return parser


def _module_parser(module_name: str):
    """The builder of one command's parser: ``linspec.cli.<module_name>.add_parser``, imported when called."""
    return lambda subparsers: importlib.import_module(f"linspec.cli.{module_name}").add_parser(subparsers)


def _close_open_bars() -> None:
    """Close the progress bars an error left open mid-loop, so the error starts a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    from linspec.cli.quiet import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    trailing = getattr(args, "trailing", None)  # a command's positional list that takes words after its options
    if extra and trailing and not any(word.startswith("-") for word in extra):
        getattr(args, trailing).extend(extra)
        extra = []
    command = _command_name(args)
    if extra:
        print(
            f"{command}: error: unrecognized arguments: {one_line(' '.join(extra))} (see {command} --help)",
            file=sys.stderr,
        )
        return 2
    if sys.stdout is None:  # started with stdout closed (>&-): print() would drop every result without a word
        print(f"{command}: error: stdout is closed; redirect it to a file or /dev/null instead", file=sys.stderr)
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("linspec: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:  # LinspecError is a ValueError
        _close_open_bars()
        print(f"{command}: error: {one_line(str(error)) or type(error).__name__}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{command}: error: out of memory", file=sys.stderr)
        return 2
    return int(result or 0)


def _command_name(args) -> str:
    """``linspec eval heads``, ``linspec bench decode``, ``linspec train``: the command as typed, down to the
    sub-command, the way argparse names it in its own errors."""
    words = [args.command, *(getattr(args, name, None) for name in ("task", "benchmark", "action"))]
    return " ".join(["linspec", *(word for word in words if word)])


if __name__ == "__main__":
    sys.exit(main())
