"""Where a benchmark's results go, from its flags: ``<name>.json``, ``<name>.png`` and a section of ``benchmarks.md``
in one folder, written by ``linspec.utils.results.record_bench``.

The folder is the user's: ``--out DIR``, else a fresh ``runs/bench/<name>-<time>`` under the working directory.
The project's own recorded tables (``docs/`` of a source checkout) change only with ``--update-docs``; an
installed linspec has no such folder and refuses that flag. Results already in an ``--out`` folder are replaced
only with ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from linspec.errors import LinspecError
from linspec.utils.results import bench_out_dir, claim_fresh, refuse_replacing

_CHECKOUT = Path(__file__).resolve().parents[2]


def project_docs_dir() -> Path:
    """``docs/`` of the source checkout linspec runs from; refused for an installed package."""
    docs = _CHECKOUT / "docs"
    pyproject = _CHECKOUT / "pyproject.toml"
    if (
        not (docs / "benchmarks.md").is_file()
        or not pyproject.is_file()
        or 'name = "linspec"' not in pyproject.read_text()
    ):
        raise LinspecError(
            "--update-docs rewrites the project's docs/ and needs a linspec source checkout; use --out DIR"
        )
    return docs


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a benchmark's results go: the same three flags on every ``linspec bench`` command."""
    parser.add_argument("--out", help="folder for the JSON, the PNG and benchmarks.md (default: runs/bench/NAME-TIME)")
    parser.add_argument("--update-docs", action="store_true", help="update the project's docs/ (a source checkout)")
    parser.add_argument("--no-record", action="store_true", help="print only; write nothing")
    parser.add_argument("--force", action="store_true", help="replace this benchmark's results already in --out")


def output_dir(args: argparse.Namespace, name: str) -> Path | None:
    """The folder ``args`` ask for (None: record nothing), checked before any measuring starts; without ``--out``
    or ``--update-docs`` only the name of a fresh one, which ``results_folder`` claims once there are results."""
    if args.no_record and (args.out or args.update_docs):
        raise LinspecError("--no-record writes nothing; drop --out / --update-docs, or drop --no-record")
    if args.out and args.update_docs:
        raise LinspecError("--out and --update-docs name two places; pass one of them")
    refuse_replacing(args.out, [name], args.force)
    if args.no_record:
        return None
    if args.update_docs:
        return project_docs_dir()
    return Path(args.out) if args.out else bench_out_dir(name)


def results_folder(args: argparse.Namespace, folder: Path) -> Path:
    """Where to write now that the results exist: the folder the user named (``--out``, ``--update-docs``), else
    the fresh one ``output_dir`` named, claimed (``linspec.utils.results.claim_fresh``)."""
    return folder if args.out or args.update_docs else claim_fresh(folder)
