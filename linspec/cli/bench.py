"""``linspec bench NAME``: benchmarks that write JSON, a PNG and a benchmarks.md section into a results folder."""

from __future__ import annotations

import argparse
import importlib

from linspec.cli.subcommands import LazySubcommands

# (name, module under linspec.bench, one-line help): each module has ``add_arguments(parser)`` and ``run(args)``.
BENCHMARKS = [
    ("decode", "decode", "decode tokens/s, cache bytes and peak RSS vs context length, original vs converted"),
    ("prefill", "prefill", "CPU prefill tokens/s of the PyTorch chunked path vs softmax SDPA, T = 512…8192"),
    ("kernels", "kernels", "GPU: Triton kernels vs flash-linear-attention and SDPA flash, time, TB/s, TFLOP/s"),
    ("speculative", "speculative", "speculative vs plain decoding and HF assisted generation, per drafter, chain/tree"),
    ("serve", "serve", "vLLM serving tokens/s, latency and memory per request at 1-16 requests, original vs converted"),
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        description="Benchmarks compare ratios within one run; results go to NAME.json, NAME.png and a section of "
        "benchmarks.md in runs/bench/NAME-TIME (--out DIR elsewhere, --update-docs into a checkout's docs/, "
        "--no-record nowhere).",
        epilog="example: linspec bench decode --contexts 128 1024 8192",
    )
    parser.register("action", "parsers", LazySubcommands)
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name, help_text in BENCHMARKS:
        names.add_lazy(name, help_text, _benchmark_parser(name, module_name, help_text))


def _benchmark_parser(name: str, module_name: str, help_text: str):
    """The builder of one benchmark's parser (its module, imported when the benchmark is chosen)."""

    def build(names: argparse._SubParsersAction) -> None:
        module = importlib.import_module(f"linspec.bench.{module_name}")
        sub = names.add_parser(name, description=help_text, epilog=getattr(module, "EXAMPLE", None))
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)

    return build
