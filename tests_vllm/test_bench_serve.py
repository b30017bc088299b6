"""``linspec bench serve`` at tiny sizes, end to end in vLLM: both models served, every field a real measurement,
memory per request growing with the context for the original and constant for the converted model, and the
converted model's greedy tokens from vLLM equal to linspec's own."""

from __future__ import annotations

import json
import math
import subprocess
import sys

CONTEXTS = (32, 64)
CONCURRENCY = (1, 2)
TOKENS = 4


def test_bench_serve_measures_both_models_and_checks_parity(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "linspec", "bench", "serve", "--tokens", str(TOKENS), "--out", str(out),
               "--contexts", *map(str, CONTEXTS), "--concurrency", *map(str, CONCURRENCY)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["benchmarks.md", "serving-bench.json", "serving-bench.png"]
    data = json.loads((out / "serving-bench.json").read_text())
    assert data["parity"] is True
    rows = data["results"]
    cells = sorted((r["model"], r["context"], r["concurrency"]) for r in rows)
    assert cells == sorted((m, c, k) for m in ("original", "converted") for c in CONTEXTS for k in CONCURRENCY)
    for row in rows:
        assert row["output_tokens"] == row["concurrency"] * TOKENS
        assert row["tokens_per_s"] == row["output_tokens"] / row["wall_s"] > 0
        assert 0 < row["ttft_mean_s"] <= row["latency_mean_s"] <= row["wall_s"]
        assert 0 < row["latency_p50_s"] <= row["latency_p90_s"] <= row["wall_s"]
        assert row["prefill_mean_s"] > 0 and row["decode_mean_s"] > 0 and row["queued_mean_s"] >= 0

    config = json.loads((_original_dir() / "config.json").read_text())
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4  # float32
    original = {r["context"]: r for r in rows if r["model"] == "original"}
    converted = {r["context"]: r for r in rows if r["model"] == "converted"}
    for context, row in original.items():
        assert row["bytes_per_request"] == per_token * (context + TOKENS)
        block = data["engines"]["original"]["vllm_block_tokens"]
        assert row["vllm_bytes_per_request"] == per_token * block * math.ceil((context + TOKENS) / block)
    assert len({r["bytes_per_request"] for r in converted.values()}) == 1, "the state does not grow with context"
    state = converted[CONTEXTS[0]]
    assert 0 < state["bytes_per_request"] <= state["vllm_bytes_per_request"]
    assert state["vllm_bytes_per_request"] == data["engines"]["converted"]["vllm_block_bytes"]
    assert "greedy parity" in done.stdout and "**exact**" in done.stdout


def _original_dir():
    from linspec.sources.demo_models import demo_model_dir

    return demo_model_dir("smollm2-135m", progress=False)
