"""``linspec train RECIPE.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _keys_help() -> str:
    from linspec.train.recipe import describe_keys

    lines = ["recipe keys (override any with key=value; list items by index, e.g. stages.0.steps=10):"]
    for key, kind, comment in describe_keys():
        lines.append(f"  {key:<38} {kind:<28} {comment}" if kind != "section" else f"  {key}: {comment}")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        description="Run a training recipe: load the base checkpoint, convert it, run each stage, and write "
        "a linspec model directory to OUTPUT/model; a last stage of kind drafter trains a drafter for the model "
        "(OUTPUT/drafter; conversion: null trains one for the base as it is). Recipes are YAML files validated "
        "before any work starts; "
        "the shipped ones (linspec recipes ls) run by name and are commented examples (linspec recipes cp NAME "
        "FILE copies one to edit). Several processes: torchrun --nproc-per-node N -m linspec "
        "train RECIPE (DDP; distributed=fsdp shards the model).",
        epilog=_keys_help() + "\n\nexample: linspec train smollm2-135m-demo stages.1.lora.r=16 "
        "output=runs/quick && linspec eval ppl runs/quick/model --data notes.txt --ablations",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe YAML file, or a shipped recipe's name (linspec recipes ls)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. seed=1")
    parser.add_argument("--resume", action="store_true", help="continue OUTPUT's run from its newest checkpoint")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing run in OUTPUT: it is set aside, put back if the new run fails before its "
        "first training step, deleted when the new run ends",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, then run every stage for 2 steps on a tiny random Llama with built-in text (CPU, seconds)",
    )
    parser.add_argument("--check", action="store_true", help="only validate the recipe and print it resolved")
    parser.add_argument(
        "--record-bench",
        metavar="NAME",
        help="after training, write the perplexity table as NAME into OUTPUT/bench/ (benchmarks.md, NAME.json)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="with --record-bench: write into the project's docs/ instead (a source checkout only)",
    )
    parser.set_defaults(func=run, trailing="overrides")  # overrides may also follow the options


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from linspec.bench.report import project_docs_dir
    from linspec.errors import LinspecError
    from linspec.train.recipe import load_recipe
    from linspec.utils.paths import check_name

    if args.resume and args.force:
        raise LinspecError("--resume continues a run and --force discards it; pass one of them")
    if args.record_bench is not None:
        check_name(args.record_bench, "--record-bench")  # it becomes <NAME>.json: checked before training
    if args.update_docs and args.record_bench is None:
        raise LinspecError("--update-docs needs --record-bench NAME (the table to write)")
    docs = project_docs_dir() if args.update_docs else None  # refused up front outside a checkout
    recipe = load_recipe(
        args.recipe, args.overrides, on_note=lambda note: print(f"linspec train: {note}", file=sys.stderr)
    )
    trains_model = recipe.conversion is not None
    if args.record_bench is not None and not trains_model:
        raise LinspecError("--record-bench records held-out perplexity; this recipe only trains a drafter")
    if args.check:
        resolved = dataclasses.asdict(recipe)
        if trains_model:  # the preset's values where the recipe left null
            settings = recipe.conversion.settings().to_dict()
            resolved["conversion"] = {
                k: settings.get(k, v) if v is None else v for k, v in resolved["conversion"].items()
            }
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        return 0
    if args.dry_run:
        from linspec.train.dry_run import dry_run

        summary = dry_run(recipe)
        measured = [f"held-out perplexity: {', '.join(f'{k} {v:.1f}' for k, v in summary['ppl'].items())}"] * bool(
            summary["ppl"]
        )
        measured += [f"{stage} accuracy by depth: {acc}" for stage, acc in summary.get("accuracy_by_depth", {}).items()]
        print(f"dry run passed: {len(recipe.stages)} stage(s) on a tiny model; {'; '.join(measured)}")
        return 0

    from linspec.train.run import TrainingInterrupted, train

    try:
        output = train(recipe, resume=args.resume, force=args.force)
    except TrainingInterrupted as stop:
        again = " ".join(["linspec train", args.recipe, *args.overrides, "--resume"])
        print(f"linspec train: {stop}\ncontinue with: {again}", file=sys.stderr)
        return 130
    print(f"wrote {output}")
    if not trains_model:
        return 0
    from linspec.train.summary import format_table, record_benchmark

    print(format_table(recipe.output))
    if args.record_bench:
        where = docs or Path(recipe.output) / "bench"
        path = record_benchmark(recipe, args.record_bench, args.recipe, overrides=args.overrides, docs_dir=where)
        print(f"recorded {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m linspec.cli.train RECIPE ...``: the same command without the other sub-commands' imports."""
    from linspec.cli import OneLineParser, one_line

    parser = OneLineParser(prog="linspec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"linspec train: error: {one_line(str(error)) or type(error).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
