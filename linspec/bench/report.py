"""Recording benchmark results: docs/<name>.json, docs/<name>.png and a section of docs/benchmarks.md."""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from linspec.io import atomic_write_bytes, atomic_write_text

DOCS = Path(__file__).resolve().parents[2] / "docs"


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
    """Write ``<name>.json`` (+ ``<name>.png``) and replace this benchmark's section in ``benchmarks.md``."""
    from linspec.paths import check_name

    check_name(name, "benchmark name")  # it becomes <name>.json, <name>.png and a section marker
    docs_dir = Path(docs_dir or DOCS)
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
