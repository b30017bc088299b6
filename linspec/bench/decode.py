"""``linspec bench decode``: per-token decode time, cache bytes and peak RSS vs context, original vs converted.

Both models see the same random prompt of each context length, are prefilled on a fresh cache, then decode
``--steps`` greedy tokens one forward at a time; the median step time is reported. Each (model, context) pair
runs in its own process, so its peak RSS is its own and not the high-water mark of earlier pairs. The converted
model keeps γ = 0 and conv = 0 from conversion, which costs the same as trained values.

With ``--batch B`` the one prefilled row's cache is repeated to ``B`` rows (a step's cost depends on the state's
size, not on what it holds, and prefilling ``B`` prompts would take ``B`` times as long) and every step advances
all of them: a server's view, where the weights are read once per step for every row while each row reads its
own cache — a growing KV cache for the original, a constant state for the converted model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from linspec.bench.report import add_output_arguments, output_dir, results_folder
from linspec.config import PRESETS, LinspecConfig
from linspec.models import hf
from linspec.models.cache import cache_nbytes, new_cache_for
from linspec.utils.devices import add_placement_arguments, placement
from linspec.utils.progress import progress_bar, show_item
from linspec.utils.results import markdown_table, record_bench

EXAMPLE = "example: linspec bench decode --model smollm2-135m --contexts 128 1024 8192 --steps 32"
MAX_STEPS = 10_000
MAX_BATCH = 1024
DEFAULT_CONTEXTS = [128, 512, 1024, 2048, 4096, 8192]


@dataclass
class DecodeResult:
    model: str
    context: int
    prefill_s: float
    ms_per_token: float
    tokens_per_s: float
    cache_bytes: int
    peak_rss_bytes: int
    batch: int = 1
    ms_per_step: float | None = None  # one forward that advances every row by a token (ms_per_token × batch)


@torch.inference_mode()
def time_decode(
    model, prompt: torch.Tensor, steps: int, warmup: int = 2, batch: int = 1
) -> tuple[float, list[float], int]:
    """``(prefill seconds, per-step seconds, cache bytes after the last step)`` on a fresh cache; with ``batch``
    > 1 the prefilled cache (of one row) is repeated to ``batch`` rows before decoding."""
    cache = new_cache_for(model)
    start = time.perf_counter()
    logits = model(prompt, **hf.cache_kwargs(cache), use_cache=True).logits
    _synchronize(logits)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
        token = token.repeat_interleave(batch, dim=0)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        logits = model(token, **hf.cache_kwargs(cache), use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _synchronize(token)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return prefill, times, cache_nbytes(cache)


def _synchronize(tensor: torch.Tensor) -> None:
    """Wait for queued GPU work, so a timer reads the work's end rather than its launch."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def measure_one(
    source: str,
    which: str,
    context: int,
    steps: int,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    preset: str = "window",
    sparse_cache: int = 0,
    batch: int = 1,
) -> DecodeResult:
    """One (model, context) measurement in this process: load, prefill, decode; peak RSS of the process."""
    import linspec
    from linspec.sources.loading import load_source

    target, weights = placement(device, dtype)
    model, _ = load_source(source, progress=False, dtype=weights)
    if which == "converted":
        model = linspec.convert(model, linspec.LinspecConfig.from_preset(preset, sparse_cache=sparse_cache))
    model = model.to(target)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(target)
    time_decode(model, prompt[:, :16], steps=2, warmup=0)  # first-call costs (allocator, kernels) stay out
    prefill, times, nbytes = time_decode(model, prompt, steps, batch=batch)
    median = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    per_token = median / batch
    return DecodeResult(which, context, prefill, 1e3 * per_token, 1 / per_token, nbytes, peak, batch, 1e3 * median)


def measure(
    source: str,
    contexts: list[int],
    steps: int,
    device: str = "cpu",
    dtype: str = "float32",
    preset: str = "window",
    sparse_cache: int = 0,
    batch: int = 1,
) -> list[DecodeResult]:
    """Every (context, model) pair in a fresh process, so each peak RSS is that pair's own."""
    results = []
    pairs = [(context, which) for context in contexts for which in ("original", "converted")]
    with progress_bar(len(pairs), "decode benchmark", unit="run") as bar:
        for context, which in pairs:
            show_item(bar, f"{which} @ {context} tokens")
            command = [
                sys.executable,
                "-m",
                "linspec.bench.decode",
                source,
                which,
                str(context),
                str(steps),
                device,
                dtype,
                preset,
                str(sparse_cache),
                str(batch),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"decode worker failed ({which} @ {context}): {done.stderr.strip()[-300:]}")
            results.append(DecodeResult(**json.loads(done.stdout.strip().splitlines()[-1])))
            bar.update()
    return results


def summarise(results: list[DecodeResult]) -> dict:
    """Ratios that answer the two questions: is linspec flat in context, and does it beat softmax when long."""
    by = {(r.model, r.context): r for r in results}
    contexts = sorted({r.context for r in results})
    lo, hi = contexts[0], contexts[-1]
    summary = {
        "converted_flatness": by["converted", hi].ms_per_token / by["converted", lo].ms_per_token,
        "original_growth": by["original", hi].ms_per_token / by["original", lo].ms_per_token,
        "speedup_by_context": {c: by["original", c].ms_per_token / by["converted", c].ms_per_token for c in contexts},
        "cache_ratio_longest": by["original", hi].cache_bytes / by["converted", hi].cache_bytes,
        "prefill_ratio_longest": by["original", hi].prefill_s / by["converted", hi].prefill_s,
    }
    return summary


def plot(results: list[DecodeResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, style in (("original", "o-"), ("converted", "s-")):
        rows = sorted((r for r in results if r.model == name), key=lambda r: r.context)
        x = [r.context for r in rows]
        axes[0].plot(x, [r.ms_per_token for r in rows], style, label=name)
        axes[1].plot(x, [r.cache_bytes / 2**20 for r in rows], style, label=name)
        axes[2].plot(x, [r.peak_rss_bytes / 2**20 for r in rows], style, label=name)
    for ax, title in zip(axes, ("decode ms / token", "cache MiB", "peak RSS MiB"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model source (default: the demo model)")
    parser.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS, help="context lengths")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per context (default 64)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="window", help="the converted model's preset (default window)"
    )
    parser.add_argument(
        "--sparse-cache",
        type=int,
        default=0,
        metavar="K",
        help="the converted model keeps K evicted tokens per kv head exactly (recall-error; default 0: none)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="B",
        help="rows decoded together, each with its own cache of the context (default 1); ms/token is a step's "
        "time over B",
    )
    add_placement_arguments(parser)
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from linspec.errors import LinspecError
    from linspec.evaluation.lengths import check_within_positions
    from linspec.sources.loading import load_source

    if not 0 < args.steps <= MAX_STEPS or any(c <= 0 for c in args.contexts):
        raise LinspecError(f"--steps and --contexts must be positive (and --steps at most {MAX_STEPS})")
    if not 0 < args.batch <= MAX_BATCH:
        raise LinspecError(f"--batch must be between 1 and {MAX_BATCH}, not {args.batch}")
    settings = LinspecConfig.from_preset(args.preset, sparse_cache=args.sparse_cache)  # a bad K: refused here
    out_dir = output_dir(args, "decode")
    device, dtype = placement(args.device, args.dtype)
    model, _ = load_source(args.model)  # fetch/check once here, so workers start from the cache
    check_within_positions(model, max(args.contexts), f"--contexts up to {max(args.contexts)}")
    del model
    weights = str(dtype).removeprefix("torch.")
    results = measure(
        args.model,
        sorted(args.contexts),
        args.steps,
        str(device),
        weights,
        args.preset,
        settings.sparse_cache,
        args.batch,
    )
    summary = summarise(results)
    step = [] if args.batch == 1 else ["ms/step"]
    rows = [
        [r.context, r.model, *([] if args.batch == 1 else [r.ms_per_step]), r.ms_per_token, r.tokens_per_s,
         r.cache_bytes / 2**20, r.peak_rss_bytes / 2**20, r.prefill_s]
        for r in results
    ]  # fmt: skip
    headers = ["context", "model", *step, "ms/token", "tokens/s", "cache MiB", "peak RSS MiB", "prefill s"]
    table = markdown_table(headers, rows)
    lo, hi = min(args.contexts), max(args.contexts)
    speedups = ", ".join(f"{c}: {s:.2f}×" for c, s in summary["speedup_by_context"].items())
    cache = f", sparse cache {settings.sparse_cache_summary}" if settings.sparse_cache else ""
    batched = (
        ""
        if args.batch == 1
        else f" (one prefilled row's cache repeated to {args.batch} rows; a step advances them all, *ms/token* is "
        f"its time over {args.batch}, *cache MiB* covers every row)"
    )
    text = (
        f"## Decode speed vs context ({args.model}, `linspec bench decode`)\n\n"
        f"*converted* is the raw conversion with the `{args.preset}` preset{cache} (untrained): this table measures "
        f"speed, which does not depend on the weights; the quality behind it at each length is in the quality tables. "
        f"{device}, {str(dtype).removeprefix('torch.')}, batch {args.batch}{batched}; *prefill s* is the whole "
        f"model's prefill of the context (one row).\n\n{table}\n\n"
        + (
            f"- converted per-token time at {hi} vs {lo} tokens: **{summary['converted_flatness']:.3f}×** "
            f"(original: {summary['original_growth']:.2f}×)\n"
            if hi != lo
            else ""
        )
        + f"- converted speed-up over the original by context: {speedups}\n"
        f"- cache at {hi} tokens: original / converted = {summary['cache_ratio_longest']:.1f}×\n"
        f"- whole-model prefill at {hi} tokens: original / converted = {summary['prefill_ratio_longest']:.2f}×"
    )
    print(text)
    if out_dir is not None:
        payload = {
            "model": args.model,
            "steps": args.steps,
            "batch": args.batch,
            "device": str(device),
            "dtype": str(dtype),
        }
        path = record_bench(
            "decode",
            {**payload, "results": [asdict(r) for r in results], **summary},
            text,
            plot(results),
            results_folder(args, out_dir),
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # worker: python -m linspec.bench.decode SOURCE WHICH CONTEXT STEPS DEVICE DTYPE PRESET K B
    source, which, context, steps, device, dtype, preset, sparse, batch = sys.argv[1:10]
    result = measure_one(
        source,
        which,
        int(context),
        int(steps),
        device,
        dtype,
        preset=preset,
        sparse_cache=int(sparse),
        batch=int(batch),
    )
    print(json.dumps(asdict(result)))
