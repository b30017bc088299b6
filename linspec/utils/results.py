"""Where evaluation results go: a run directory (JSON + PNG) and, with ``--record-bench``, a benchmark section.

Results never go into the project's docs/ unless ``--update-docs`` asks for it (in a source checkout); by default
each run gets its own ``runs/eval-<timestamp>`` directory, so repeated runs never overwrite one another.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from linspec.utils.io import atomic_write_bytes, atomic_write_text


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")


def write_results(out_dir: str | Path, name: str, data: dict[str, Any], figure=None) -> Path:
    """``OUT/<name>.json`` (with the machine summary) and ``OUT/<name>.png`` when there is a figure."""
    from linspec.bench.report import machine_summary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps({"machine": machine_summary(), **data}, indent=2) + "\n")
    if figure is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(out / f"{name}.png", buffer.getvalue())
    return out / f"{name}.json"


def record_bench(
    name: str, data: dict[str, Any], section_markdown: str, figure=None, where: Path | None = None
) -> Path:
    """The same results as ``NAME.json`` (+ png) and a section of ``where/benchmarks.md``
    (``linspec.bench.report.record``; ``where`` is the project's docs/ only when the user asked for it)."""
    from linspec.bench.report import record

    return record(name, data, section_markdown, figure, where)
