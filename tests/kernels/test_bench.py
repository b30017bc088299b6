"""The kernel and prefill benchmarks: the GPU one refuses CPU in one line, the CPU one runs end to end."""

from __future__ import annotations

import argparse
import json

import pytest

from linspec.bench import kernels as kernels_bench
from linspec.bench import prefill as prefill_bench
from linspec.errors import LinspecError


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_kernel_benchmark_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(kernels_bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(LinspecError, match="needs a CUDA GPU") as error:
        kernels_bench.run(parse(kernels_bench, ["--lengths", "2048"]))
    assert "\n" not in str(error.value)


def test_kernel_benchmark_cost_model_orders_the_ops():
    """At 32k tokens softmax attention must move no more bytes but do far more FLOPs than the linear ops."""
    sdpa_bytes, sdpa_flops = kernels_bench.cost("sdpa-flash", "fwd", 16, 32768, 128)
    linspec_bytes, linspec_flops = kernels_bench.cost("linspec", "fwd", 16, 32768, 128)
    fla_bytes, fla_flops = kernels_bench.cost("fla", "fwd", 16, 32768, 128)
    assert sdpa_flops > 20 * linspec_flops > 20 * fla_flops
    assert linspec_bytes >= sdpa_bytes and fla_bytes >= sdpa_bytes
    assert kernels_bench.cost("linspec", "fwd+bwd", 16, 32768, 128)[1] == 3 * linspec_flops
    with pytest.raises(argparse.ArgumentTypeError):
        kernels_bench.parse_batch_heads("16")


def test_prefill_benchmark_runs_and_records(tmp_path, capsys):
    args = parse(prefill_bench, ["--lengths", "64", "128", "--repeats", "1", "--shapes", "smollm2-135m",
                                 "--out", str(tmp_path)])  # fmt: skip
    assert prefill_bench.run(args) == 0
    assert "chunked ÷ SDPA" in capsys.readouterr().out
    data = json.loads((tmp_path / "prefill.json").read_text())
    results = data["results"]
    assert data["benchmark"] == "prefill" and [r["length"] for r in results] == [64, 128]
    assert all(r["chunked_tokens_per_s"] > 0 and r["speedup"] > 0 for r in results)
    assert (tmp_path / "prefill.png").stat().st_size > 0 and "bench:prefill:begin" in (
        tmp_path / "benchmarks.md"
    ).read_text()
