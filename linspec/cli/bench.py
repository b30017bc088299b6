"""``linspec bench NAME``: benchmarks that write JSON + PNG under docs/ and a table into docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib

# (name, module under linspec.bench, one-line help): each module has ``add_arguments(parser)`` and ``run(args)``.
BENCHMARKS = [
    ("decode", "decode", "decode tokens/s, cache bytes and peak RSS vs context length, original vs converted"),
    ("prefill", "prefill", "CPU prefill tokens/s of the PyTorch chunked path vs softmax SDPA, T = 512…8192"),
    ("kernels", "kernels", "GPU: Triton kernels vs flash-linear-attention and SDPA flash, time, TB/s, TFLOP/s"),
    ("speculative", "speculative", "speculative vs plain decoding and HF assisted generation, per drafter, chain/tree"),
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and record it under docs/",
        description="Benchmarks compare ratios within one run; results go to docs/<name>.json, docs/<name>.png "
        "and a table in docs/benchmarks.md.",
        epilog="example: linspec bench decode --contexts 128 1024 8192",
    )
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name, help_text in BENCHMARKS:
        module = importlib.import_module(f"linspec.bench.{module_name}")
        sub = names.add_parser(name, help=help_text, description=help_text, epilog=getattr(module, "EXAMPLE", None))
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
