"""The before/after perplexity table of a run (original, raw conversion, after each stage), printed after training
and recorded with ``--record-bench`` through ``linspec.utils.results``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from linspec.train.recipe import Recipe
from linspec.utils.results import markdown_table, record_bench

LABELS = {"original": "original (softmax)", "converted": "raw conversion (γ=0, conv=0)"}


def read_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def table_rows(run_dir: str | Path) -> list[list]:
    summary = read_summary(run_dir)
    original = summary["ppl"].get("original")
    rows = []
    for phase, ppl in summary["ppl"].items():
        label = LABELS.get(phase, f"after stage {phase}")
        ratio = f"{ppl / original:.2f}×" if original else "—"
        seconds = summary["train_seconds"].get(phase)
        rows.append([label, round(ppl, 2), ratio, f"{seconds / 60:.1f}" if seconds else "—"])
    return rows


def format_table(run_dir: str | Path) -> str:
    return markdown_table(["model", "held-out ppl", "vs original", "train minutes"], table_rows(run_dir))


def record_benchmark(
    recipe: Recipe,
    name: str,
    recipe_path: str,
    notes: str = "",
    overrides: Sequence[str] = (),
    docs_dir: Path | None = None,
) -> Path:
    """Write the table between ``<!-- bench:NAME:begin/end -->`` in docs/benchmarks.md (+ docs/NAME.json).
    ``overrides`` go into the recorded command: without them a variant's table would claim the plain recipe."""
    summary = read_summary(recipe.output)
    conversion = recipe.conversion.settings()
    layers, heads = conversion.softmax_layers, conversion.softmax_heads
    parts = [f"{len(layers)} softmax layers"] * bool(layers) + [f"{len(heads)} softmax kv heads"] * bool(heads)
    kind = f"hybrid ({', '.join(parts)})" if parts else "all-linear"
    command = " ".join(["linspec train", recipe_path, *overrides, "--record-bench", name])
    body = (
        f"### Recovering quality by training: `{recipe.base}`, {kind}\n\n"
        f"`{command}`. Held-out perplexity on `{recipe.data.eval}` "
        f"({recipe.data.max_eval_sequences} packed sequences of {recipe.data.seq_len} tokens, never trained on); "
        f"quality preset `{recipe.conversion.preset}`, {conversion.grouped_summary}, "
        "softmax layers: "
        f"{list(conversion.softmax_layers) or 'none (all-linear)'}"
        + (f", softmax kv heads (layer:head): {' '.join(f'{a}:{b}' for a, b in heads)}" if heads else "")
        + ".\n\n"
        + format_table(recipe.output)
    )
    if summary.get("run_seconds"):
        minutes = summary["run_seconds"] / 60
        body += f"\n\nWall time of the whole run (loading, data, evaluations, training): {minutes:.1f} min."
    if notes:
        body += "\n\n" + notes.strip()
    return record_bench(
        name, {"summary": summary, "recipe": recipe_path, "overrides": list(overrides)}, body, where=docs_dir
    )
