"""The quality-curve tasks of ``linspec eval``: perplexity vs length (``ppl --lengths``), ``passkey``,
``agreement`` and ``harness``. Thin: parse, call one library function per model, write, print."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

from linspec.utils.devices import add_placement_arguments
from linspec.utils.validation import (
    MAX_DOCUMENTS,
    MAX_FEWSHOT,
    MAX_LENGTH,
    MAX_NEW_TOKENS,
    MAX_PROMPTS,
    MAX_TRIALS,
    MAX_WINDOWS,
    count_arg,
    seed_arg,
)

length = count_arg(1, MAX_LENGTH)  # tokens: lengths, windows, chunks


def ppl_or_curve(plain: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``linspec eval ppl``: the perplexity curve with --lengths, else the plain sliding-window run."""
    return run_ppl_curve(args) if args.lengths else plain(args)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="directory for the JSON and PNG results (default: runs/eval-<timestamp>)")
    parser.add_argument(
        "--record-bench",
        metavar="NAME",
        help="also write the table as NAME (NAME.json, NAME.png, a section of benchmarks.md) into the results dir",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="with --record-bench: write into the project's docs/ instead (a source checkout only)",
    )


def add_quality_tasks(tasks: argparse._SubParsersAction, ppl: argparse.ArgumentParser) -> None:
    """Add ``--lengths`` (and its options) to ``ppl`` and the ``passkey``, ``agreement``, ``harness`` tasks."""
    curve = ppl.add_argument_group("perplexity vs context length (with --lengths)")
    curve.add_argument(
        "--lengths",
        type=length,
        nargs="+",
        metavar="L",
        help="context lengths to compare, e.g. 256 1024 2048 4096 8192: every length scores the same tokens "
        "(the last --score-tokens of each block of max(L) tokens) after L − score-tokens.. tokens of context",
    )
    curve.add_argument("--reference", help="the original model, measured on the same windows (one curve each)")
    curve.add_argument(
        "--max-windows", type=count_arg(1, MAX_WINDOWS), default=4, help="blocks of max(L) tokens (default 4)"
    )
    curve.add_argument("--score-tokens", type=length, help="tokens scored per window (default: half the shortest L)")
    curve.add_argument("--chunk", type=length, default=512, help="prefill chunk in tokens (default 512)")
    add_output_options(curve)
    ppl.epilog = (
        f"{ppl.epilog}; a curve against the original: linspec eval ppl out/smollm2-linear --data "
        "builtin:wiki-en-eval --lengths 256 1024 2048 4096 --reference smollm2-135m"
    )
    ppl.set_defaults(func=functools.partial(ppl_or_curve, ppl.get_default("func")))

    passkey = tasks.add_parser(
        "passkey",
        help="passkey retrieval accuracy vs context length (one curve per model)",
        description="A 5-digit key hidden at a random depth in filler text, asked for at the end (inside the chat "
        "template when the tokenizer has one), answered greedily. Prints the exact-match rate per length and per "
        "depth bucket; deterministic given --seed. Several models give one curve each (e.g. all-linear and hybrids).",
        epilog="example: linspec eval passkey smollm2-135m out/smollm2-linear --lengths 256 1024 2048 --trials 12",
    )
    passkey.add_argument("models", nargs="+", metavar="MODEL", help="model directories, .gguf files or demo names")
    passkey.add_argument(
        "--lengths", type=length, nargs="+", default=[256, 1024, 2048], help="prompt lengths (default 256 1024 2048)"
    )
    passkey.add_argument("--trials", type=count_arg(1, MAX_TRIALS), default=12, help="prompts per length (default 12)")
    passkey.add_argument("--seed", type=seed_arg(), default=0, help="seed of keys and depths (default 0)")
    passkey.add_argument("--chunk", type=length, default=512, help="prefill chunk in tokens (default 512)")
    add_output_options(passkey)
    add_placement_arguments(passkey)
    passkey.set_defaults(func=run_passkey)

    agreement = tasks.add_parser(
        "agreement",
        help="greedy answers of a converted model vs the original's, and repetition of both",
        description="Both models answer the same held-out instruction prompts greedily (prompts built "
        "reproducibly from a corpus: summarise, continue, main topic, facts, question; or read from a file). "
        "Reports prefix agreement (share of the original's answer matched before the first differing token), "
        "exact-match rate, and for both models distinct-2/3, the longest repeated n-gram and the share of "
        "answers that loop.",
        epilog="example: linspec eval agreement runs/smollm2-135m-demo/model --reference smollm2-135m "
        "--prompts builtin:wiki-en-eval --num-prompts 16 --max-new-tokens 64",
    )
    agreement.add_argument("model", help="the converted model")
    agreement.add_argument("--reference", required=True, help="the original model")
    agreement.add_argument(
        "--prompts",
        default="builtin:wiki-en-eval",
        help="builtin:NAME or a corpus file to build prompts from, or a .txt (one prompt per line) / .jsonl "
        "('prompt' field) of prompts (default builtin:wiki-en-eval)",
    )
    agreement.add_argument("--num-prompts", type=count_arg(1, MAX_PROMPTS), default=16, help="prompts (default 16)")
    agreement.add_argument(
        "--max-new-tokens", type=count_arg(1, MAX_NEW_TOKENS), default=64, help="answer length (default 64)"
    )
    agreement.add_argument("--seed", type=seed_arg(), default=0, help="seed of the prompt choice (default 0)")
    agreement.add_argument("--text-field", default="text", help="text column of a jsonl/parquet corpus (default: text)")
    add_output_options(agreement)
    add_placement_arguments(agreement)
    agreement.set_defaults(func=run_agreement)

    harness = tasks.add_parser(
        "harness",
        help="lm-evaluation-harness tasks on a linspec model (needs: pip install lm-eval)",
        description="Runs lm-evaluation-harness tasks through linspec's harness model (linspec.evaluation.harness: "
        "scoring chunk-wise through the cache, greedy generation). --include-path adds a folder of task YAML "
        "files, so local tasks run offline. The harness CLI itself: python -m linspec.evaluation.harness run "
        "--model linspec --model_args pretrained=DIR ...",
        epilog="example: linspec eval harness out/smollm2-linear --tasks my_task --include-path tasks/ --limit 50",
    )
    harness.add_argument("model", help="model directory, .gguf file, hub id or demo name")
    harness.add_argument("--tasks", nargs="+", required=True, help="task names (built-in or under --include-path)")
    harness.add_argument("--include-path", help="folder of task YAML files")
    harness.add_argument("--limit", type=count_arg(1, MAX_DOCUMENTS), help="documents per task (default: all)")
    harness.add_argument(
        "--num-fewshot", type=count_arg(0, MAX_FEWSHOT), help="few-shot examples (default: the task's)"
    )
    harness.add_argument("--max-length", type=length, help="longest scored window (default: model positions)")
    harness.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the chat template")
    add_output_options(harness)
    add_placement_arguments(harness)
    harness.set_defaults(func=run_harness)


def _load(name: str, args: argparse.Namespace):
    from linspec.errors import LinspecError
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement

    device, dtype = placement(args.device, args.dtype)
    model, tokenizer = load_source(name, dtype=dtype, device=device)
    if tokenizer is None:
        raise LinspecError(f"{name} has no tokenizer")
    return model, tokenizer


def _finish(args: argparse.Namespace, name: str, data: dict, section: str, figure=None) -> None:
    """Write ``OUT/name.json`` (+ png), print the table, and record it when --record-bench asks."""
    from linspec.bench.report import project_docs_dir
    from linspec.utils.results import default_out_dir, record_bench, write_results

    print(section)
    out = Path(args.out) if args.out else default_out_dir()
    path = write_results(out, name, data, figure)
    print(f"wrote {path}")
    if args.record_bench:
        where = project_docs_dir() if args.update_docs else out
        print(f"recorded {record_bench(args.record_bench, data, section, figure, where)}")


# The options each task's recorded command repeats (with their values), after its positional arguments.
COMMAND_OPTIONS = {
    "ppl": ("data", "lengths", "reference", "max_windows", "score_tokens", "max_tokens"),
    "passkey": ("lengths", "trials", "seed"),
    "agreement": ("reference", "prompts", "num_prompts", "max_new_tokens", "seed"),
    "harness": ("tasks", "include_path", "limit", "num_fewshot", "max_length"),
}


def _command(args: argparse.Namespace) -> str:
    """The command that reproduces these results, rebuilt from the parsed arguments (not from ``sys.argv``,
    which is another program's when the CLI is called from Python)."""
    import shlex

    positional = args.models if args.task == "passkey" else [args.model]
    parts = ["linspec", "eval", args.task, *positional]
    for name in COMMAND_OPTIONS[args.task]:
        value = getattr(args, name)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    if args.record_bench:
        parts += ["--record-bench", args.record_bench]
    return " ".join(shlex.quote(part) for part in parts)


def run_ppl_curve(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from linspec.errors import LinspecError
    from linspec.evaluation.lengths import perplexity_by_length, plot_length_curves
    from linspec.evaluation.perplexity import read_text_ids
    from linspec.utils.results import markdown_table

    if args.ablate or args.ablations:
        raise LinspecError("--lengths compares context lengths; run --ablate/--ablations without it")
    curves = {}
    for label, name in [("model", args.model), ("reference", args.reference)]:
        if name is None:
            continue
        model, tokenizer = _load(name, args)
        ids = read_text_ids(tokenizer, args.data, args.text_field)[: args.max_tokens]
        curves[f"{name} ({label})"] = perplexity_by_length(
            model, ids, args.lengths, args.max_windows, args.score_tokens, args.chunk, label=label
        )
        del model
    lengths = [p.length for p in next(iter(curves.values()))]
    headers = ["model", *[f"ppl @ {n}" for n in lengths]]
    rows = [[label, *[round(p.ppl, 2) for p in points]] for label, points in curves.items()]
    first = next(iter(curves.values()))[0]
    section = (
        f"### Perplexity vs context length\n\n`{_command(args)}`. The same {first.tokens} tokens of `{args.data}` "
        f"({first.windows} windows × {first.tokens // first.windows} scored tokens) at every length; only the "
        f"context before them grows.\n\n" + markdown_table(headers, rows)
    )
    data = {
        "command": _command(args),
        "data": args.data,
        "curves": {k: [asdict(p) for p in v] for k, v in curves.items()},
    }
    _finish(args, "ppl-length", data, section, plot_length_curves(curves))
    return 0


def run_passkey(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from linspec.evaluation.passkey import DEPTH_BUCKETS, passkey_accuracy, plot_passkey
    from linspec.utils.results import markdown_table

    curves = {}
    for name in args.models:
        model, tokenizer = _load(name, args)
        curves[name] = passkey_accuracy(model, tokenizer, args.lengths, args.trials, args.seed, args.chunk)
        del model
    rows = [
        [name, r.length, f"{r.accuracy:.2f}", *[f"{r.by_depth.get(b, float('nan')):.2f}" for b in DEPTH_BUCKETS]]
        for name, results in curves.items()
        for r in results
    ]
    section = (
        f"### Passkey retrieval\n\n`{_command(args)}`. Exact-match rate of greedy answers, {args.trials} trials per "
        f"length (seed {args.seed}), overall and by the key's depth in the filler.\n\n"
        + markdown_table(["model", "length", "accuracy", *[f"depth {b}" for b in DEPTH_BUCKETS]], rows)
    )
    data = {"command": _command(args), "curves": {k: [asdict(r) for r in v] for k, v in curves.items()}}
    _finish(args, "passkey", data, section, plot_passkey(curves))
    return 0


def run_agreement(args: argparse.Namespace) -> int:
    from linspec.data.prompts import load_prompts
    from linspec.evaluation.agreement import Agreement, greedy_answers
    from linspec.utils.results import markdown_table

    prompts = load_prompts(args.prompts, args.num_prompts, args.seed, args.text_field)
    answers, texts = {}, {}
    for label, name in [("model", args.model), ("reference", args.reference)]:
        model, tokenizer = _load(name, args)
        answers[label] = greedy_answers(model, tokenizer, prompts, args.max_new_tokens, label=label)
        texts[label] = [tokenizer.decode(a, skip_special_tokens=True) for a in answers[label]]
        del model
    result = Agreement.of(answers["model"], answers["reference"])
    rows = [
        [f"{name} ({label})", f"{rep.distinct_2:.3f}", f"{rep.distinct_3:.3f}", f"{rep.longest_repeat:.1f}",
         rep.max_longest_repeat, f"{rep.loop_share:.2f}"]
        for label, name, rep in [("model", args.model, result.model), ("reference", args.reference, result.reference)]
    ]  # fmt: skip
    section = (
        f"### Greedy answers vs the original\n\n`{_command(args)}`. {len(prompts)} prompts from `{args.prompts}`, "
        f"{args.max_new_tokens} new tokens. Prefix agreement {result.prefix_agreement:.3f} (share of the "
        f"original's answer matched before the first differing token; first difference at token "
        f"{result.first_divergence:.1f} on average), exact match {result.exact_match:.2f}.\n\n"
        + markdown_table(
            ["model", "distinct-2", "distinct-3", "longest repeat (mean)", "longest repeat (max)", "answers looping"],
            rows,
        )
    )
    samples = [
        {"kind": p.kind, "prompt": p.text, "model": m, "reference": r}
        for p, m, r in zip(prompts, texts["model"], texts["reference"], strict=True)
    ]
    data = {"command": _command(args), "agreement": result.to_dict(), "answers": samples}
    _finish(args, "agreement", data, section)
    return 0


def run_harness(args: argparse.Namespace) -> int:
    import json

    from linspec.errors import LinspecError
    from linspec.utils.results import markdown_table

    if args.include_path and not Path(args.include_path).is_dir():
        raise LinspecError(f"--include-path {args.include_path}: no such directory")
    try:
        from linspec.evaluation.harness import run_tasks
    except ImportError as error:
        raise LinspecError(f"lm-evaluation-harness is not installed ({error}); pip install 'lm-eval>=0.4.13'") from None
    from linspec.cli.quiet import quiet_git_lookups
    from linspec.utils.devices import placement

    quiet_git_lookups()

    device, dtype = placement(args.device, args.dtype)
    options = {"max_length": args.max_length} if args.max_length else {}
    options |= {"device": str(device), "dtype": dtype}
    results = run_tasks(
        args.model, args.tasks, args.include_path, args.limit, args.num_fewshot, args.apply_chat_template, **options
    )
    rows = [
        [task, metric.split(",")[0], round(value, 4)]
        for task, metrics in results["results"].items()
        for metric, value in metrics.items()
        if isinstance(value, float) and "_stderr" not in metric
    ]
    section = f"### lm-evaluation-harness\n\n`{_command(args)}`.\n\n" + markdown_table(
        ["task", "metric", "value"], rows
    )
    data = {"command": _command(args), "results": json.loads(json.dumps(results["results"], default=str))}
    _finish(args, "harness", data, section)
    return 0
