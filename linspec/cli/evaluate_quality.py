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
    parser.add_argument("--force", action="store_true", help="replace results of the same name already in --out")


def check_output(args: argparse.Namespace, name: str) -> None:
    """Refuse the output flags of a task writing ``name`` before any model is loaded: a bad --record-bench name, an
    --update-docs with nothing to record or outside a checkout, an --out already holding these results (without
    --force) — each of which would otherwise fail, or overwrite, only after the whole evaluation."""
    from linspec.bench.report import project_docs_dir
    from linspec.errors import LinspecError
    from linspec.utils.paths import check_name
    from linspec.utils.results import refuse_replacing

    if args.update_docs and not args.record_bench:
        raise LinspecError("--update-docs writes the table --record-bench NAME records; add --record-bench NAME")
    if args.record_bench:
        check_name(args.record_bench, "--record-bench")
    if args.update_docs:
        project_docs_dir()
    recorded_here = [args.record_bench] if args.record_bench and not args.update_docs else []
    refuse_replacing(args.out, [name, *recorded_here], args.force)


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
    curve.add_argument(
        "--no-baselines",
        action="store_true",
        help="leave out the window-only curve drawn by default for a linspec model with a softmax window (the "
        "same window and sinks with the global memory and conv off: what the memory is measured against)",
    )
    add_output_options(ppl)
    ppl.epilog = (
        f"{ppl.epilog}; a curve against the original: linspec eval ppl out/smollm2-linear --data "
        "builtin:wiki-en-eval --lengths 256 1024 2048 4096 --reference smollm2-135m"
    )
    ppl.set_defaults(func=functools.partial(ppl_or_curve, ppl.get_default("func")))

    passkey = tasks.add_parser(
        "passkey",
        help="passkey retrieval vs context length, or on a depth × length grid (--depths)",
        description="A 5-digit key hidden in filler text, asked for at the end (inside the chat template when the "
        "tokenizer has one). Without --depths: keys at random depths, answered greedily (12 tokens); prints the "
        "exact-match rate per length and per depth bucket. With --depths: --trials keys exactly at each depth of "
        "each length, scored in one forward per prompt by the teacher-forced log-probability of the key and by "
        "greedy accuracy (every key token the argmax); a depth × length heat map per model. Deterministic given "
        "--seed. Several models answer the same prompts (e.g. the original, all-linear and hybrids).",
        epilog="example: linspec eval passkey smollm2-135m out/smollm2-linear --lengths 256 1024 2048 --trials 12; "
        "the grid: linspec eval passkey smollm2-135m --depths 0.1 0.5 0.9 --lengths 512 1024 --trials 4",
    )
    add_models(passkey)
    passkey.add_argument(
        "--lengths", type=length, nargs="+", default=[256, 1024, 2048], help="prompt lengths (default 256 1024 2048)"
    )
    passkey.add_argument(
        "--depths",
        type=depth_arg,
        nargs="+",
        metavar="D",
        help="the depth × length grid: depths of the key in the filler, fractions in 0..1 (0: the start)",
    )
    passkey.add_argument(
        "--trials", type=count_arg(1, MAX_TRIALS), help="prompts per length (default 12), per grid cell (default 4)"
    )
    add_seed_and_chunk(passkey, "keys and depths")
    add_output_options(passkey)
    add_placement_arguments(passkey)
    passkey.set_defaults(func=run_passkey)
    add_retrieval_tasks(tasks)

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


def depth_arg(text: str) -> float:
    """An argparse ``type``: a depth in the filler, a fraction in 0..1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in 0..1, got {text!r:.40}") from None
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a fraction in 0..1 (0: the start of the filler), got {text!r:.40}")
    return value


def add_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model directories, .gguf files or demo names")


def add_seed_and_chunk(parser: argparse.ArgumentParser, seeded: str) -> None:
    parser.add_argument("--seed", type=seed_arg(), default=0, help=f"seed of {seeded} (default 0)")
    parser.add_argument("--chunk", type=length, default=512, help="prefill chunk in tokens (default 512)")


def add_retrieval_tasks(tasks: argparse._SubParsersAction) -> None:
    """The ``needle`` and ``recall`` tasks: retrieval scored in one forward per prompt, like ``passkey --depths``."""
    from linspec.evaluation.retrieval import MAX_KEYS

    needle = tasks.add_parser(
        "needle",
        help="multi-key needle retrieval: several named keys in the filler, the question asks for one",
        description="--keys named 5-digit pass keys ('The pass key of the lantern is 41825.') at random depths in "
        "filler text; the question asks for one of them, the others are distractors. Scored in one forward per "
        "prompt: the teacher-forced log-probability of the asked key and greedy accuracy (every key token the "
        "argmax). Deterministic given --seed; several models answer the same prompts.",
        epilog="example: linspec eval needle smollm2-135m out/smollm2-window --lengths 1024 2048 --keys 4 --trials 8",
    )
    add_models(needle)
    needle.add_argument(
        "--lengths", type=length, nargs="+", default=[1024, 2048], help="prompt lengths (default 1024 2048)"
    )
    needle.add_argument(
        "--keys", type=count_arg(1, MAX_KEYS), default=4, help=f"keys per prompt, 1..{MAX_KEYS} (default 4)"
    )
    needle.add_argument("--trials", type=count_arg(1, MAX_TRIALS), default=8, help="prompts per length (default 8)")
    add_seed_and_chunk(needle, "names, keys and depths")
    add_output_options(needle)
    add_placement_arguments(needle)
    needle.set_defaults(func=run_needle)

    recall = tasks.add_parser(
        "recall",
        help="associative recall: name–number pairs stated more than W tokens before the question",
        description="A list of --pairs name–number pairs ('lantern: 41825'), then at least W tokens of filler, then "
        "a question for one name's number: every pair is beyond a window of W tokens, so only a memory can answer. "
        "W is --window, else the largest local span of the models (a linspec model directory's softmax window, or "
        "its group for in-group kernels). Scored in one forward per prompt: the teacher-forced log-probability "
        "of the number and greedy accuracy. Deterministic given --seed; several models answer the same prompts.",
        epilog="example: linspec eval recall smollm2-135m out/smollm2-window --pairs 1 2 4 8 --trials 8",
    )
    add_models(recall)
    recall.add_argument(
        "--pairs", type=count_arg(1, MAX_KEYS), nargs="+", default=[1, 2, 4, 8], help="list sizes (default 1 2 4 8)"
    )
    recall.add_argument("--window", type=length, help="W: filler tokens between the list and the question")
    recall.add_argument("--trials", type=count_arg(1, MAX_TRIALS), default=8, help="prompts per list size (default 8)")
    add_seed_and_chunk(recall, "names, numbers and the question")
    add_output_options(recall)
    add_placement_arguments(recall)
    recall.set_defaults(func=run_recall)


def _load(name: str, args: argparse.Namespace):
    from linspec.errors import LinspecError
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement

    device, dtype = placement(args.device, args.dtype)
    model, tokenizer = load_source(name, dtype=dtype, device=device)
    if tokenizer is None:
        raise LinspecError(f"{name} has no tokenizer")
    return model, tokenizer


def finish(args: argparse.Namespace, name: str, data: dict, section: str, figure=None) -> None:
    """Write ``OUT/name.json`` (+ png), print the table, and record it when --record-bench asks."""
    from linspec.bench.report import project_docs_dir
    from linspec.utils.results import claim_fresh, default_out_dir, record_bench, write_results

    print(section)
    out = Path(args.out) if args.out else claim_fresh(default_out_dir())
    path = write_results(out, name, data, figure)
    print(f"wrote {path}")
    if args.record_bench:
        where = project_docs_dir() if args.update_docs else out
        print(f"recorded {record_bench(args.record_bench, data, section, figure, where)}")


CURVE_VARIANT_OPTIONS = ("ablate", "ablations", "no_baselines")
# The options each task's recorded command repeats (with their values), after its positional arguments.
COMMAND_OPTIONS = {
    "ppl": ("data", "lengths", "reference", "max_windows", "score_tokens", "max_tokens", *CURVE_VARIANT_OPTIONS),
    "ppl-window": ("data", "window", "stride", "max_tokens", "ablate", "ablations"),
    "passkey": ("lengths", "depths", "trials", "seed"),
    "needle": ("lengths", "keys", "trials", "seed"),
    "recall": ("pairs", "window", "trials", "seed"),
    "agreement": ("reference", "prompts", "num_prompts", "max_new_tokens", "seed"),
    "harness": ("tasks", "include_path", "limit", "num_fewshot", "max_length"),
}


def rerun_command(args: argparse.Namespace) -> str:
    """The command that reproduces these results, rebuilt from the parsed arguments (not from ``sys.argv``,
    which is another program's when the CLI is called from Python)."""
    import shlex

    positional = args.models if hasattr(args, "models") else [args.model]
    parts = ["linspec", "eval", args.task, *positional]
    options = "ppl-window" if args.task == "ppl" and not args.lengths else args.task
    for name in COMMAND_OPTIONS[options]:
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value is True:
            parts.append(flag)
        elif value is not None and value is not False:
            parts += [flag, *map(str, value if isinstance(value, list) else [value])]
    if args.record_bench:
        parts += ["--record-bench", args.record_bench]
    return " ".join(shlex.quote(part) for part in parts)


def curve_ablations(args: argparse.Namespace, model) -> list[tuple[str, ...]]:
    """The ablated variants of the model drawn beside it: those --ablate/--ablations name, and for a model with a
    softmax window its window-only variant unless --no-baselines — the curve the memory has to beat."""
    from linspec.evaluation.perplexity import ABLATIONS, ablation_components, ablation_variants, has_softmax_window

    if args.ablations:
        chosen = [components for components in ablation_variants(model) if components]
    else:
        chosen = [ablation_components(args.ablate, model)] if args.ablate else []
    if not args.no_baselines and has_softmax_window(model) and ABLATIONS["local-only"] not in chosen:
        chosen.append(ABLATIONS["local-only"])
    return chosen


def run_ppl_curve(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from linspec.errors import LinspecError
    from linspec.evaluation.lengths import perplexity_by_length, plot_length_curves
    from linspec.evaluation.perplexity import ablated, read_text_ids, variant_name
    from linspec.utils.results import markdown_table

    if args.ablate and args.ablations:
        raise LinspecError("--ablate picks one variant and --ablations runs all four; pass one of them")
    check_output(args, "ppl-length")
    curves, variants = {}, {}
    for label, name in [("model", args.model), ("reference", args.reference)]:
        if name is None:
            continue
        model, tokenizer = _load(name, args)
        ids = read_text_ids(tokenizer, args.data, args.text_field)[: args.max_tokens]
        for components in [(), *(curve_ablations(args, model) if label == "model" else [])]:
            variant = variant_name(model, components) if components else label
            with ablated(model, components):
                curves[f"{name} ({variant})"] = perplexity_by_length(
                    model, ids, args.lengths, args.max_windows, args.score_tokens, args.chunk, label=variant
                )
            variants[f"{name} ({variant})"] = variant
        del model
    lengths = [p.length for p in next(iter(curves.values()))]
    headers = ["model", *[f"ppl @ {n}" for n in lengths]]
    rows = [[label, *[round(p.ppl, 2) for p in points]] for label, points in curves.items()]
    first = next(iter(curves.values()))[0]
    ablations = sorted({v for v in variants.values() if v not in ("model", "reference")})
    explained = (
        f" Ablated variants of the model ({', '.join(ablations)}) turn components off in every linear layer: "
        "no-gamma the global memory (γ = 0), no-conv the conv, no-far-memory the window's far memory and sparse "
        "cache, no-memory-readout the far memory's own share (the sparse cache kept as the memory chooses it), "
        "window-only / local-only both — the same window and sinks with the memory off."
        if ablations
        else ""
    )
    section = (
        f"### Perplexity vs context length\n\n`{rerun_command(args)}`. The same {first.tokens} tokens of `{args.data}` "
        f"({first.windows} windows × {first.tokens // first.windows} scored tokens) at every length; only the "
        f"context before them grows.{explained}\n\n" + markdown_table(headers, rows)
    )
    data = {
        "command": rerun_command(args),
        "data": args.data,
        "variants": variants,
        "curves": {k: [asdict(p) for p in v] for k, v in curves.items()},
    }
    dashed = {key for key, variant in variants.items() if variant not in ("model", "reference")}
    finish(args, "ppl-length", data, section, plot_length_curves(curves, dashed=dashed))
    return 0


def run_passkey(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    if args.depths:
        return run_passkey_grid(args)
    check_output(args, "passkey")
    args.trials = args.trials or 12

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
        f"### Passkey retrieval\n\n`{rerun_command(args)}`. Exact-match rate of greedy answers, {args.trials} trials "
        f"per length (seed {args.seed}), overall and by the key's depth in the filler.\n\n"
        + markdown_table(["model", "length", "accuracy", *[f"depth {b}" for b in DEPTH_BUCKETS]], rows)
    )
    data = {"command": rerun_command(args), "curves": {k: [asdict(r) for r in v] for k, v in curves.items()}}
    finish(args, "passkey", data, section, plot_passkey(curves))
    return 0


def _score_models(
    args: argparse.Namespace, build: Callable, by: tuple[str, ...], what: str, longest: int
) -> dict[str, dict]:
    """``{model: {"cells": summary by ``by``, "trials": one row per prompt}}``: every model answers the prompts
    ``build(tokenizer)`` makes with its own tokenizer, one model loaded at a time. ``longest`` (the prompts' least
    length bound) is checked against each model's positions before any prompt is built."""
    from linspec.evaluation.lengths import check_lengths
    from linspec.evaluation.retrieval import score_probes, summarize

    results = {}
    for name in args.models:
        model, tokenizer = _load(name, args)
        check_lengths(model, [longest])
        rows = score_probes(model, build(tokenizer), args.chunk, desc=f"{what} {name}")
        results[name] = {"cells": summarize(rows, by), "trials": rows}
        del model
    return results


SCORED = (
    "Scored in one forward per prompt: *accuracy* is greedy (every answer token is the argmax given the prompt and "
    "the answer's earlier tokens, i.e. greedy decoding starts with the answer), *log p* the mean teacher-forced "
    "log-probability of the whole answer in nats (0 is certain)."
)


def run_passkey_grid(args: argparse.Namespace) -> int:
    from linspec.evaluation.retrieval import check_depths, passkey_grid_probes, plot_passkey_grid
    from linspec.utils.results import markdown_table

    check_output(args, "passkey-grid")
    args.trials = args.trials or 4
    depths = check_depths(args.depths)

    def build(tokenizer):
        return passkey_grid_probes(tokenizer, args.lengths, depths, args.trials, args.seed)

    results = _score_models(args, build, ("length", "depth"), "passkey grid", max(args.lengths))
    rows = []
    for name, result in results.items():
        at = {(c["length"], c["depth"]): c for c in result["cells"]}
        for size in sorted({c["length"] for c in result["cells"]}):
            rows.append(
                [name, size, *[f"{at[(size, d)]['accuracy']:.2f} ({at[(size, d)]['logprob']:.2f})" for d in depths]]
            )
    section = (
        f"### Passkey by depth and length\n\n`{rerun_command(args)}`. {args.trials} keys per cell (seed {args.seed}), "
        f"each exactly at its depth of the filler. {SCORED} Cells: accuracy (log p).\n\n"
        + markdown_table(["model", "length", *[f"depth {d:g}" for d in depths]], rows)
    )
    data = {"command": rerun_command(args), "depths": depths, "models": results}
    finish(args, "passkey-grid", data, section, plot_passkey_grid({k: v["cells"] for k, v in results.items()}))
    return 0


def run_needle(args: argparse.Namespace) -> int:
    from linspec.evaluation.retrieval import needle_probes, plot_retrieval
    from linspec.utils.results import markdown_table

    check_output(args, "needle")

    def build(tokenizer):
        return needle_probes(tokenizer, sorted(set(args.lengths)), args.keys, args.trials, args.seed)

    results = _score_models(args, build, ("length", "keys"), "needle", max(args.lengths))
    rows = [
        [name, c["length"], c["keys"], f"{c['accuracy']:.2f}", f"{c['logprob']:.2f}", f"{c['nll_per_token']:.3f}"]
        for name, result in results.items()
        for c in result["cells"]
    ]
    section = (
        f"### Multi-key needle retrieval\n\n`{rerun_command(args)}`. {args.keys} named keys at random depths per "
        f"prompt, the question asks for one; {args.trials} prompts per length (seed {args.seed}). {SCORED}\n\n"
        + markdown_table(["model", "length", "keys", "accuracy", "log p", "NLL / key token"], rows)
    )
    curves = {name: result["cells"] for name, result in results.items()}
    figure = plot_retrieval(curves, "length", "prompt length (tokens)", f"needle retrieval, {args.keys} keys")
    finish(args, "needle", {"command": rerun_command(args), "models": results}, section, figure)
    return 0


def declared_local_span(source: str) -> int | None:
    """The tokens a linspec model directory's linear layers see exactly — its softmax window, or one group for
    in-group kernels — read from its ``config.json`` without loading it; None for anything else."""
    from linspec.config import LinspecConfig
    from linspec.conversion.softmax_heads import local_span
    from linspec.sources.loading import read_config_json

    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return None
    settings = read_config_json(config).get("linspec")
    return local_span(LinspecConfig.from_dict(settings))[0] if isinstance(settings, dict) else None


def recall_window(args: argparse.Namespace) -> int:
    """W: ``--window``, else the largest local span among the models; one clear error when none has one."""
    from linspec.errors import LinspecError

    if args.window is not None:
        return args.window
    spans = [span for span in map(declared_local_span, args.models) if span is not None]
    if not spans:
        raise LinspecError(
            "give --window W: none of the models is a linspec model directory with a local window to recall beyond"
        )
    return max(spans)


def run_recall(args: argparse.Namespace) -> int:
    from linspec.evaluation.retrieval import plot_retrieval, recall_probes
    from linspec.utils.results import markdown_table

    check_output(args, "recall")
    args.window = recall_window(args)

    def build(tokenizer):
        return recall_probes(tokenizer, sorted(set(args.pairs)), args.window, args.trials, args.seed)

    results = _score_models(args, build, ("pairs", "gap"), "recall", args.window + 1)
    rows = [
        [name, c["pairs"], f"{c['accuracy']:.2f}", f"{c['logprob']:.2f}", f"{c['nll_per_token']:.3f}"]
        for name, result in results.items()
        for c in result["cells"]
    ]
    section = (
        f"### Associative recall beyond {args.window} tokens\n\n`{rerun_command(args)}`. A list of name–number pairs, "
        f"then at least {args.window} tokens of filler, then a question for one number; {args.trials} prompts per "
        f"list size (seed {args.seed}). {SCORED}\n\n"
        + markdown_table(["model", "pairs", "accuracy", "log p", "NLL / number token"], rows)
    )
    curves = {name: result["cells"] for name, result in results.items()}
    figure = plot_retrieval(curves, "pairs", "pairs in the list", f"recall beyond {args.window} tokens")
    data = {"command": rerun_command(args), "window": args.window, "models": results}
    finish(args, "recall", data, section, figure)
    return 0


def run_agreement(args: argparse.Namespace) -> int:
    from linspec.data.prompts import load_prompts
    from linspec.evaluation.agreement import Agreement, greedy_answers
    from linspec.utils.results import markdown_table

    check_output(args, "agreement")
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
        f"### Greedy answers vs the original\n\n`{rerun_command(args)}`. {len(prompts)} prompts from `{args.prompts}`, "
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
    data = {"command": rerun_command(args), "agreement": result.to_dict(), "answers": samples}
    finish(args, "agreement", data, section)
    return 0


def run_harness(args: argparse.Namespace) -> int:
    import json

    from linspec.errors import LinspecError
    from linspec.utils.results import markdown_table

    check_output(args, "harness")
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
    section = f"### lm-evaluation-harness\n\n`{rerun_command(args)}`.\n\n" + markdown_table(
        ["task", "metric", "value"], rows
    )
    data = {"command": rerun_command(args), "results": json.loads(json.dumps(results["results"], default=str))}
    finish(args, "harness", data, section)
    return 0
