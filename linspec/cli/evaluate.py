"""``linspec eval ppl MODEL --data FILE``: sliding-window perplexity, with component ablations."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (perplexity, with ablations of γ and the conv)",
        description="Evaluate a linspec model or any causal LM linspec can load.",
        epilog="example: linspec eval ppl runs/smollm2-135m-demo/model --data builtin:wiki-en-eval --ablations",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    ppl = tasks.add_parser(
        "ppl",
        help="sliding-window perplexity on a text file",
        description="Perplexity over the text: windows of --window tokens every --stride tokens; each window "
        "scores only tokens the previous one did not. --ablate zeroes γ (the global path) and/or the conv in "
        "every linear layer; --ablations runs all four variants so each component's contribution shows.",
        epilog="example: linspec eval ppl runs/smollm2-135m-demo/model --data notes.txt --window 256 --ablations",
    )
    ppl.add_argument("model", help="model directory, .gguf file, hub id or demo name")
    ppl.add_argument(
        "--data", required=True, help=".txt/.jsonl/.parquet file or builtin:NAME (e.g. builtin:wiki-en-eval)"
    )
    ppl.add_argument("--text-field", default="text", help="text column of jsonl/parquet data (default: text)")
    ppl.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: --window, no overlap)")
    ppl.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    ppl.add_argument("--ablate", choices=["gamma", "conv", "both"], help="zero γ, the conv, or both")
    ppl.add_argument("--ablations", action="store_true", help="run full, no-gamma, no-conv and local-only")
    ppl.add_argument("--dtype", default="float32", help="float32 (default; use it on CPU), bfloat16, float16")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from linspec.bench.report import markdown_table
    from linspec.checkpoint import parse_dtype
    from linspec.errors import LinspecError
    from linspec.evaluate import ABLATIONS, ablated, perplexity_of_ids, read_text_ids
    from linspec.sources import load_source

    model, tokenizer = load_source(args.model, dtype=parse_dtype(args.dtype))
    if tokenizer is None:
        raise LinspecError(f"{args.model} has no tokenizer")
    ids = read_text_ids(tokenizer, args.data, args.text_field)[: args.max_tokens]
    if args.ablations:
        variants = list(ABLATIONS.items())
    else:
        chosen = {None: (), "gamma": ("gamma",), "conv": ("conv",), "both": ("gamma", "conv")}[args.ablate]
        variants = [(next(k for k, v in ABLATIONS.items() if v == chosen), chosen)]
    rows = []
    for name, components in variants:
        with ablated(model, components):
            result = perplexity_of_ids(model.eval(), ids, args.window, args.stride)
        rows.append([name, round(result.ppl, 3), result.tokens, round(result.tokens_per_s)])
    print(markdown_table(["variant", "perplexity", "tokens", "tokens/s"], rows))
    return 0
