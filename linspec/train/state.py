"""Training checkpoints (atomic, resumable exactly), the metrics log (JSONL) and its loss-curve PNG.

A checkpoint is ``OUTPUT/checkpoints/<stage>/step-<n>/state.pt``: the trainable tensors, optimiser, scheduler,
every process's RNG states and the step (the data position is a function of the step). Written into a temp
directory and renamed, so a crash while saving leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linspec.io import atomic_directory, atomic_write_bytes


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path, stage: str) -> list[Path]:
    """Complete checkpoints of ``stage``, oldest first."""
    folder = Path(run_dir) / "checkpoints" / stage
    found = [p for p in folder.glob("step-*") if (p / "state.pt").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, stage: str, step: int, state: dict[str, Any], keep: int) -> Path:
    path = Path(run_dir) / "checkpoints" / stage / f"step-{step:07d}"
    with atomic_directory(path, force=True) as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"stage": stage, "step": step}) + "\n")
    for old in checkpoint_dirs(run_dir, stage)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


class MetricsLog:
    """Appends one JSON object per line; on resume, entries past the resume point are dropped first."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, keep) -> None:
        """Keep only the records for which ``keep(record)`` is true (rewritten atomically)."""
        if self.enabled and self.path.exists():
            kept = [r for r in self.records() if keep(r)]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def plot(self, path: Path) -> None:
        """Loss per step for each stage (one panel each: MSE and cross-entropy have different scales)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        stages = list(dict.fromkeys(r["stage"] for r in records if r.get("event") == "step"))
        if not stages:
            return
        figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
        for axis, stage in zip(axes[0], stages, strict=True):
            steps = [r for r in records if r.get("event") == "step" and r["stage"] == stage]
            axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
            axis.set_title(f"{stage} ({steps[0]['loss_name']})")
            axis.set_xlabel("step")
            axis.set_ylabel("loss")
            axis.set_yscale("log")
            axis.grid(alpha=0.3)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        atomic_write_bytes(path, buffer.getvalue())
