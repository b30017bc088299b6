"""Recording benchmark results: ``<name>.json``, ``<name>.png`` and a section of ``benchmarks.md`` in one folder.

The folder is the user's: ``--out DIR``, else a fresh ``runs/bench/<name>-<time>`` under the working directory.
The project's own recorded tables (``docs/`` of a source checkout) change only with ``--update-docs``; an
installed linspec has no such folder and refuses that flag.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from linspec.errors import LinspecError
from linspec.utils.io import atomic_write_bytes, atomic_write_text

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


def default_out_dir(name: str) -> Path:
    return Path("runs") / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a benchmark's results go: the same three flags on every ``linspec bench`` command."""
    parser.add_argument("--out", help="folder for the JSON, the PNG and benchmarks.md (default: runs/bench/NAME-TIME)")
    parser.add_argument("--update-docs", action="store_true", help="update the project's docs/ (a source checkout)")
    parser.add_argument("--no-record", action="store_true", help="print only; write nothing")


def output_dir(args: argparse.Namespace, name: str) -> Path | None:
    """The folder ``args`` ask for (None: record nothing), checked before any measuring starts."""
    if args.no_record and (args.out or args.update_docs):
        raise LinspecError("--no-record writes nothing; drop --out / --update-docs, or drop --no-record")
    if args.out and args.update_docs:
        raise LinspecError("--out and --update-docs name two places; pass one of them")
    if args.no_record:
        return None
    if args.update_docs:
        return project_docs_dir()
    folder = Path(args.out) if args.out else default_out_dir(name)
    if folder.exists() and not folder.is_dir():
        raise LinspecError(f"--out {folder} exists and is not a folder")
    return folder


def machine_summary() -> dict[str, Any]:
    """Where the numbers came from, stored beside them."""
    import os

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(),
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record(name: str, data: dict[str, Any], section_markdown: str, figure=None, docs_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (+ ``<name>.png``) into ``docs_dir`` (None: a fresh run folder) and replace this
    benchmark's section in that folder's ``benchmarks.md``."""
    from linspec.utils.paths import check_name

    check_name(name, "benchmark name")  # it becomes <name>.json, <name>.png and a section marker
    docs_dir = Path(docs_dir) if docs_dir is not None else default_out_dir(name)
    docs_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_summary(), **data}
    atomic_write_text(docs_dir / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    if figure is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(docs_dir / f"{name}.png", buffer.getvalue())
    _replace_section(docs_dir / "benchmarks.md", name, section_markdown, has_plot=figure is not None)
    return docs_dir / f"{name}.json"


def _replace_section(path: Path, name: str, body: str, has_plot: bool) -> None:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table below is written by `linspec bench`.\n"
    plot = f"\n\n![{name}]({name}.png)" if has_plot else ""
    section = f"{begin}\n{body.strip()}{plot}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(path, text)
