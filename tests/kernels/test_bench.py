"""The kernel and prefill benchmarks: the GPU one refuses CPU in one line, the CPU one runs end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

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


def test_the_window_ops_of_the_kernel_benchmark_time_one_and_the_same_term():
    """``linspec-window`` (the kernels) and ``torch-window`` (the PyTorch path) are the window preset's grouped term
    with the same decays; run here through the interpreter on small CPU tensors, they agree, and differ from the
    paper's op. The cost model counts no in-group scores for them."""
    table = kernels_bench.ops({})
    assert [name for name in kernels_bench.OPS if name in table] == ["linspec", "linspec-window", "torch-window",
                                                                     "sdpa-flash"]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 4, 150, 16, generator=gen), dim=-1) for _ in range(2))
    v, conv_weight = torch.randn(1, 4, 150, 16, generator=gen), 0.1 * torch.randn(4, 32, generator=gen)
    inputs = (q, k, v, conv_weight, torch.tensor(0.5))
    kernel, reference = table["linspec-window"](*inputs), table["torch-window"](*inputs)
    assert (kernel - reference).abs().max() < 1e-5
    assert (table["linspec"](*inputs) - reference).abs().max() > 1e-2
    window_flops = kernels_bench.cost("linspec-window", "fwd", 16, 8192, 128)[1]
    assert window_flops < kernels_bench.cost("linspec", "fwd", 16, 8192, 128)[1]
    assert window_flops == kernels_bench.cost("torch-window", "fwd", 16, 8192, 128)[1]


def test_speedups_pair_the_same_cases_only():
    def result(op, length, ms):
        return kernels_bench.KernelResult(op, "fwd", 1, 16, length, 64, ms, 0.0, 0.0, 0.0, 0.0)

    results = [result("linspec-window", 2048, 1.0), result("fla-simple-gla", 2048, 1.5),
               result("linspec-window", 4096, 2.0)]  # fmt: skip
    assert kernels_bench.speedups(results, "linspec-window", "fla-simple-gla") == [1.5]
    assert kernels_bench.speedups(results, "linspec-window", "sdpa-flash") == []


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
