"""Training checkpoints (atomic, resumable exactly, data only), the metrics log (JSONL) and its loss-curve PNG.

A checkpoint is ``OUTPUT/checkpoints/<stage>/step-<n>/``: ``state.safetensors`` (the trainable tensors, the
optimiser's moments, the RNG state tensors), ``state.json`` (everything else: step, scheduler, optimiser settings,
Python/NumPy RNG states; see :mod:`linspec.train.state_codec`) and ``meta.json`` (format, stage, step), written
into a temporary directory and renamed, so a crash while saving leaves the previous checkpoint as it was. Loading
never unpickles: a damaged, foreign or crafted checkpoint is one ``LinspecError``.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linspec.errors import LinspecError
from linspec.train.state_codec import decode, encode
from linspec.utils.io import atomic_directory, atomic_write_bytes
from linspec.utils.paths import child_path

CHECKPOINT_FORMAT = {"format": "linspec-checkpoint", "version": 1}
_STEP_DIR = re.compile(r"step-(\d{1,12})")


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


def stage_checkpoints_dir(run_dir: Path, stage: str) -> Path:
    return child_path(Path(run_dir) / "checkpoints", stage, "stage name")


def checkpoint_dirs(run_dir: Path, stage: str) -> list[Path]:
    """Finished checkpoints of ``stage`` (those with ``meta.json``, written last), oldest first."""
    folder = stage_checkpoints_dir(run_dir, stage)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, stage: str, step: int, state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file

    path = stage_checkpoints_dir(run_dir, stage) / f"step-{step:07d}"
    skeleton, tensors = encode(state)
    with atomic_directory(path, force=True, markers=("meta.json",)) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton) + "\n")
        (tmp / "meta.json").write_text(json.dumps({**CHECKPOINT_FORMAT, "stage": stage, "step": step}) + "\n")
    for old in checkpoint_dirs(run_dir, stage)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in checkpoint directory ``path``; anything wrong with it is one ``LinspecError``."""
    path = Path(path)
    try:
        return _read_checkpoint(path)
    except LinspecError as error:
        raise LinspecError(f"checkpoint {path} is damaged or not a linspec checkpoint: {error}") from None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from linspec.sources.loading import check_safetensors

    if (path / "state.pt").exists() and not (path / "state.json").exists():
        raise LinspecError("it is a pickle (state.pt), which linspec never loads; start over with --force")
    meta = _read_json(path / "meta.json")
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in CHECKPOINT_FORMAT.items()):
        raise LinspecError(f"meta.json does not say {CHECKPOINT_FORMAT}")
    check_safetensors(path / "state.safetensors")
    try:
        tensors = load_file(str(path / "state.safetensors"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LinspecError(f"state.safetensors: {str(error).splitlines()[0] if str(error) else error!r}") from None
    state = decode(_read_json(path / "state.json"), tensors)
    if not isinstance(state, dict) or not {"step", "trainable", "optimizer", "scheduler", "rng"} <= set(state):
        raise LinspecError("state.json lacks the step, trainable, optimizer, scheduler or rng entry")
    if not isinstance(state["step"], int) or state["step"] != meta.get("step"):
        raise LinspecError("the step in state.json does not match meta.json")
    return state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LinspecError(f"{path.name} is missing") from None
    except (OSError, ValueError, RecursionError) as error:
        raise LinspecError(f"{path.name} is not valid JSON ({str(error).splitlines()[0][:80]})") from None


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
        """Every record; a torn last line (a process killed mid-write) is skipped, damage elsewhere refused."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if number == len(lines):
                    break
                raise LinspecError(f"{self.path} line {number} is damaged; remove that line or start over with --force")
            records.append(record)
        return records

    def repair(self) -> None:
        """Rewrite the log without a torn last line, so that the next append starts on a line of its own."""
        if self.enabled and self.path.exists():
            text = self.path.read_bytes()
            if text and not text.endswith(b"\n"):
                self.truncate(lambda record: True)

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
            if all(r["loss"] > 0 for r in steps):  # a loss of 0 (a window longer than the sequences) has no log
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        atomic_write_bytes(path, buffer.getvalue())
