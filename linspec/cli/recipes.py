"""``linspec recipes``: list the shipped recipes and copy one out to edit."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes",
        description="linspec ships its training recipes; `linspec train NAME` runs one by name, and "
        "`linspec recipes cp NAME DEST` copies it out so you can change it.",
        epilog="example: linspec recipes cp smollm2-135m-demo my-recipe.yaml && linspec train my-recipe.yaml",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser(
        "ls", help="list shipped recipes with their summaries", epilog="example: linspec recipes ls"
    )
    ls.set_defaults(func=run_ls)
    cp = actions.add_parser(
        "cp",
        help="copy a shipped recipe to DEST (a file or a directory)",
        epilog="example: linspec recipes cp qwen2.5-1.5b-gpu my-recipe.yaml",
    )
    cp.add_argument("name", help="a shipped recipe's name (see `linspec recipes ls`)")
    cp.add_argument("dest", help="destination file, or an existing directory")
    cp.add_argument("--force", action="store_true", help="overwrite DEST if it exists (default: refuse)")
    cp.set_defaults(func=run_cp)


def run_ls(args: argparse.Namespace) -> int:
    from linspec.train.catalog import shipped_recipes, summary

    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {summary(path)}")
    return 0


def run_cp(args: argparse.Namespace) -> int:
    from linspec.train.catalog import copy_recipe

    print(copy_recipe(args.name, args.dest, force=args.force))
    return 0
