"""The drafter-recipe branch of ``linspec train``: same flags (overrides, --check, --resume, --force)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def run_drafter_recipe(args: argparse.Namespace) -> int:
    import yaml

    from linspec.drafting.recipe import load_drafter_recipe
    from linspec.errors import LinspecError

    if args.resume and args.force:
        raise LinspecError("--resume continues a run and --force discards it; pass one of them")
    for flag in ("dry_run", "record_bench", "update_docs"):
        if getattr(args, flag):
            raise LinspecError(f"--{flag.replace('_', '-')} does not apply to a drafter recipe")
    recipe = load_drafter_recipe(args.recipe, args.overrides)
    if args.check:
        print(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False), end="")
        return 0
    from linspec.drafting.train import DrafterTrainingInterrupted, train_drafter

    try:
        path = train_drafter(recipe, resume=args.resume, force=args.force)
    except DrafterTrainingInterrupted as stop:
        again = " ".join(["linspec train", args.recipe, *args.overrides, "--resume"])
        print(f"linspec train: {stop}\ncontinue with: {again}", file=sys.stderr)
        return 130
    print(f"wrote {path}")
    return 0
