"""The one writer of results: ``NAME.json`` (with the machine it ran on) and ``NAME.png`` into a folder, each file
written atomically, and for a benchmark its section of that folder's ``benchmarks.md``.

Evaluations, benchmarks and training runs all record through here, so every result file has the same shape and a
reader never finds one half written. The folder is the caller's choice: by default a fresh ``runs/...`` folder per
run, so repeated runs never overwrite one another; the project's docs/ only when the user asks for it.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from linspec.errors import LinspecError
from linspec.utils.io import atomic_write_bytes, atomic_write_text
from linspec.utils.paths import check_name

BENCHMARKS = "benchmarks.md"


def default_out_dir() -> Path:
    """The name of a fresh folder for one evaluation run, ``runs/eval-<time>``; ``claim_fresh`` takes it when the
    results are written (a command refused before that leaves no folder behind)."""
    return Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")


def bench_out_dir(name: str) -> Path:
    """The name of a fresh folder for one run of benchmark ``name``, ``runs/bench/<name>-<time>``; taken by
    ``claim_fresh`` when the results are written."""
    return Path("runs") / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def claim_fresh(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``, … when that is taken, created here and only here: the time in a
    default name has a resolution of one second, and two runs that write in the same second (two evaluations side
    by side, a script that loops) must not share a folder, where the second would replace the first's results.
    Creating the folder is the claim (``mkdir`` fails on an existing one), so two processes cannot both get it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        candidate = folder if attempt == 1 else folder.with_name(f"{folder.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")  # itertools.count never ends


def refuse_replacing(out: str | Path | None, names: list[str], force: bool) -> None:
    """Refuse, before anything is measured, an ``--out`` folder that is a file or already holds results of one of
    ``names`` (``NAME.json``, ``NAME.png``) unless ``force``, and a ``force`` without ``out`` (nothing it could
    replace): results are kept until the user says to replace them, and a run that would only fail at the end
    (after minutes of evaluation) fails at the start instead."""
    if force and not out:
        raise LinspecError("--force replaces results already in --out; it needs --out DIR")
    if not out:
        return
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise LinspecError(f"--out {folder} exists and is not a folder")
    taken = [folder / f"{name}{suffix}" for name in names for suffix in (".json", ".png")]
    taken = [path for path in taken if path.exists()]
    if taken and not force:
        raise LinspecError(
            f"--out {folder} already holds {taken[0].name} from an earlier run; pass --force to replace it, or "
            "another --out"
        )


def machine_summary() -> dict[str, Any]:
    """Where the numbers came from, stored beside them."""
    import torch

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
    """A Markdown table; floats to three significant digits (thousands and more as whole numbers)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, data: dict[str, Any], figure=None) -> Path:
    """``OUT/<name>.json`` (the machine summary, then ``data``) and ``OUT/<name>.png`` when there is a figure; the
    JSON's path. ``name`` must be a plain file name (``linspec.utils.paths.check_name``)."""
    check_name(name, "result name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps({"machine": machine_summary(), **data}, indent=2) + "\n")
    if figure is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(out / f"{name}.png", buffer.getvalue())
    return out / f"{name}.json"


def record_bench(
    name: str, data: dict[str, Any], section_markdown: str, figure=None, where: str | Path | None = None
) -> Path:
    """Benchmark ``name``'s results as ``<name>.json`` (+ png) in ``where`` (None: a fresh ``runs/bench`` folder,
    claimed), and its section of ``where/benchmarks.md`` replaced (the other benchmarks' sections stay); the JSON's
    path."""
    check_name(name, "benchmark name")  # it becomes <name>.json, <name>.png and a section marker
    folder = Path(where) if where is not None else claim_fresh(bench_out_dir(name))
    path = write_results(folder, name, {"benchmark": name, **data}, figure)
    _replace_section(folder / BENCHMARKS, name, section_markdown, has_plot=figure is not None)
    return path


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
