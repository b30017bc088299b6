"""``linspec bench prefill``: CPU prefill throughput of the PyTorch chunked path vs softmax SDPA, as ratios.

One attention layer's core op at real head shapes, batch 1, fp32 (bf16 prefill is far slower on CPU): linspec's
``chunked_attention`` (local + γ·global + conv, paper preset G = 64, P = 32) on L2-normalised q̂/k̂ against
``scaled_dot_product_attention(is_causal=True)`` on the same q/k/v with grouped kv heads. Projections, RoPE and
φ cost the same on both sides and are left out, so the ratio is the attention op's own. The two are timed
alternately within each repeat, so load from other processes on a shared machine hits both alike; the median
of the repeats after a warm-up is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from linspec.bench.report import add_output_arguments, output_dir, results_folder
from linspec.utils.results import markdown_table, record_bench

EXAMPLE = "example: linspec bench prefill --lengths 512 2048 8192 --repeats 5 --threads 2"
DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192]
# name -> (query heads, kv heads, head dim): SmolLM2-135M and a Llama-3.2-1B-sized layer.
SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.2-1b": (32, 8, 64)}


@dataclass
class PrefillResult:
    shape: str
    length: int
    chunked_s: float
    sdpa_s: float
    chunked_tokens_per_s: float
    sdpa_tokens_per_s: float
    speedup: float  # chunked tokens/s ÷ SDPA tokens/s


def inputs(heads: int, kv_heads: int, head_dim: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, heads, length, head_dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, kv_heads, length, head_dim, generator=gen), dim=-1)
    v = torch.randn(1, kv_heads, length, head_dim, generator=gen)
    conv_weight = 0.1 * torch.randn(heads, 32, generator=gen)
    return q, k, v, conv_weight, torch.tensor(0.5)


def median_times(functions: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each function, timed in alternation within every repeat."""
    times: list[list[float]] = [[] for _ in functions]
    for step in range(warmup + repeats):
        for fn, bucket in zip(functions, times, strict=True):
            start = time.perf_counter()
            fn()
            if step >= warmup:
                bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


@torch.inference_mode()
def measure(shape: str, length: int, repeats: int, group_size: int = 64) -> PrefillResult:
    from linspec.ops import chunked_attention
    from linspec.ops.backend import backend

    heads, kv_heads, head_dim = SHAPES[shape]
    q, k, v, conv_weight, gamma = inputs(heads, kv_heads, head_dim, length)

    def chunked():
        with backend("torch"):
            return chunked_attention(q, k, v, conv_weight, gamma, group_size)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    chunked_s, sdpa_s = median_times([chunked, sdpa], repeats)
    return PrefillResult(shape, length, chunked_s, sdpa_s, length / chunked_s, length / sdpa_s, sdpa_s / chunked_s)


def plot(results: list[PrefillResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, shape in enumerate(sorted({r.shape for r in results})):
        rows = sorted((r for r in results if r.shape == shape), key=lambda r: r.length)
        x, color = [r.length for r in rows], f"C{index}"
        axes[0].plot(x, [r.chunked_tokens_per_s for r in rows], "s-", color=color, label=f"chunked, {shape}")
        axes[0].plot(x, [r.sdpa_tokens_per_s for r in rows], "o--", color=color, label=f"SDPA, {shape}")
        axes[1].plot(x, [r.speedup for r in rows], "s-", color=color, label=shape)
    axes[0].set_yscale("log")
    axes[0].set_title("prefill tokens/s (one layer's attention, fp32)")
    axes[1].axhline(1.0, color="grey", lw=1)
    axes[1].set_title("chunked ÷ SDPA tokens/s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


MAX_LENGTH = 1 << 17


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="sequence lengths")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="head layouts")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per length (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from linspec.errors import LinspecError

    if not 0 < args.repeats <= 1000 or any(not 0 < length <= MAX_LENGTH for length in args.lengths):
        raise LinspecError(f"--repeats must be in 1..1000 and --lengths in 1..{MAX_LENGTH}")
    if args.threads is not None and not 0 < args.threads <= 1024:
        raise LinspecError(f"--threads must be in 1..1024, got {args.threads}")
    out_dir = output_dir(args, "prefill")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from linspec.utils.progress import progress_bar, show_item

    cases = [(shape, length) for shape in args.shapes for length in sorted(args.lengths)]
    results = []
    with progress_bar(len(cases), "prefill benchmark", unit="case") as bar:
        for shape, length in cases:
            show_item(bar, f"{shape} @ {length} tokens")
            results.append(measure(shape, length, args.repeats))
            bar.update()
    rows = [[r.shape, r.length, r.chunked_tokens_per_s, r.sdpa_tokens_per_s, f"{r.speedup:.2f}×"] for r in results]
    table = markdown_table(["heads", "tokens", "chunked tokens/s", "SDPA tokens/s", "chunked ÷ SDPA"], rows)
    from_2k = [r for r in results if r.length >= 2048]
    verdict = "yes" if from_2k and all(r.speedup > 1 for r in from_2k) else "no"
    layouts = ", ".join(f"{name} = H {h} / Hkv {kv} / d {d}" for name, (h, kv, d) in SHAPES.items())
    text = (
        f"## Prefill throughput, PyTorch chunked path vs softmax SDPA (`linspec bench prefill`)\n\n"
        f"One layer's attention op, batch 1, fp32, {torch.get_num_threads()} CPU thread(s), G = 64, P = 32, "
        f"median of {args.repeats} alternating repeats; {layouts}.\n\n{table}\n\n"
        f"- chunked faster than SDPA at every length from 2k tokens: **{verdict}**"
    )
    print(text)
    if out_dir is not None:
        payload = {"repeats": args.repeats, "threads": torch.get_num_threads(), "shapes": SHAPES}
        path = record_bench(
            "prefill",
            {**payload, "results": [asdict(r) for r in results]},
            text,
            plot(results),
            results_folder(args, out_dir),
        )
        print(f"wrote {path}")
    return 0
