"""Two CPU processes (gloo, DDP through torchrun) follow the same loss trajectory as one on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from linspec.train.tiny import make_tiny_base


def run_torchrun(tmp_path, recipe, processes: int, name: str) -> list[tuple[str, int, float]]:
    output = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LINSPEC_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", "linspec", "train", str(recipe), f"output={output}",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in records if r["event"] == "step"]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    base = make_tiny_base(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    stage = {"steps": 3, "batch_size": 4, "micro_batch_size": 1}
    recipe.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "conversion": {"group_size": 8, "conv_taps": 4},
                "data": {"train": ["builtin:sample"], "eval": None, "eval_fraction": 0.25, "seq_len": 32},
                "threads": 1,
                "eval": {"baselines": False},
                "stages": [
                    {"kind": "attention_transfer", "optimizer": {"lr": 0.05}, **stage},
                    {"kind": "lora", "lora": {"r": 4, "alpha": 8}, "optimizer": {"lr": 0.01}, **stage},
                ],
            }
        )
    )
    one = run_torchrun(tmp_path, recipe, 1, "one")  # 4 sequences per step: 4 micro batches on one process
    two = run_torchrun(tmp_path, recipe, 2, "two")  # 2 per process, gradients averaged by DDP over gloo
    assert [(s, n) for s, n, _ in one] == [(s, n) for s, n, _ in two] and len(one) == 6
    assert [loss for *_, loss in two] == pytest.approx([loss for *_, loss in one], rel=1e-5)
    assert one[-1][2] != one[3][2]  # the trajectory moves: equal losses are not a frozen model
