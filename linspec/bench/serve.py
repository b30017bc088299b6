"""``linspec bench serve``: vLLM serving throughput, per-request latency and memory per request, original vs converted.

Both models are served by vLLM's offline engine (``vllm.LLM``), which runs the same scheduler, continuous batching
and model runner as vLLM's OpenAI server, without HTTP and text processing competing with the model for the CPU,
and which hands back each request's timestamps (arrival, scheduled, first and last token). Each model's engine
runs in a process of its own (``python -m linspec.bench.serve``), started with its memory settings in the
environment, so neither engine's pages, threads or peak memory are inherited by the other, and vLLM is imported
only there: the command itself imports no vLLM.

For every context length and concurrency ``k``, ``k`` prompts of random token ids (the same ids for both models)
are submitted at once and each generates ``--tokens`` greedy tokens (EOS ignored, so every request produces the
same number). Memory per request is the bytes vLLM keeps for it: for the original its paged KV at that length
(2 × layers × kv heads × head dim × element size per token, from the model config), for the converted model its
constant-size state (each layer's declared state tensors), with the bytes per page vLLM itself allocated beside
them. Greedy parity: the converted model's tokens from vLLM for the first prompts of the shortest context equal
linspec's own greedy generation (``speculative_generate`` without a drafter, what ``linspec generate`` runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from linspec.bench.report import add_output_arguments, output_dir, results_folder
from linspec.config import PRESETS
from linspec.errors import LinspecError
from linspec.utils.progress import progress_bar, show_item
from linspec.utils.results import markdown_table, record_bench
from linspec.utils.validation import MAX_LENGTH, MAX_NEW_TOKENS, check_count, count_arg

EXAMPLE = "example: linspec bench serve --contexts 256 4096 --concurrency 1 8 16 --tokens 64"
NAME = "serving-bench"
DEFAULT_CONTEXTS = [256, 4096]
DEFAULT_CONCURRENCY = [1, 8, 16]
MAX_CONCURRENCY = 1024
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # element bytes of the weights and of the original's KV
GiB = 1 << 30
LOWEST_PROMPT_ID = 100  # prompts draw ids above the tokenizer's special tokens
TARGET_CONTEXT, TARGET_CONCURRENCY, TARGET_SPEEDUP = 4096, 16, 1.5  # the target


@dataclass
class ServeResult:
    """One batch of ``concurrency`` requests of ``context`` prompt tokens each, served by one model."""

    model: str
    context: int
    concurrency: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float  # output tokens of the batch / its wall time (prefill included)
    latency_mean_s: float  # per request: arrival to last token
    latency_p50_s: float
    latency_p90_s: float
    ttft_mean_s: float  # arrival to first token
    prefill_mean_s: float  # scheduled to first token (the prompt's forward passes, shared with other requests)
    decode_mean_s: float  # first to last token
    queued_mean_s: float  # arrival in the scheduler to being scheduled
    bytes_per_request: int  # KV (original, at context + tokens) or state (converted) one request needs
    vllm_bytes_per_request: int  # what vLLM allocated for it: whole blocks of pages


# ---------------------------------------------------------------- memory per request, from the models themselves


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """Bytes of paged KV one token costs a softmax model in vLLM: keys and values of every layer's kv heads."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * DTYPES[dtype]


def state_bytes_per_request(model, dtype: str) -> int:
    """Bytes of constant-size state one request costs the converted model in vLLM: every layer's declared state
    tensors (the layout the plugin declares to vLLM)."""
    import torch

    from linspec.models import hf
    from linspec.serving.state import compute_dtype, state_layout

    total = 0
    for layer in hf.decoder_layers(model):
        attention = hf.attention_of(layer)
        if not hasattr(attention, "empty_state"):  # a softmax layer of a hybrid: its KV grows, counted by vLLM
            continue
        shapes, dtypes = state_layout(attention, compute_dtype(getattr(torch, dtype)))
        total += sum(math.prod(shape) * kind.itemsize for shape, kind in zip(shapes, dtypes, strict=True))
    return total


def cache_space_gib(peak_request_bytes: int, concurrency: int) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) that holds ``concurrency`` requests of the larger model with room for
    vLLM's block rounding, so no measured batch is preempted or queued for lack of pages."""
    return max(1, math.ceil(1.25 * concurrency * peak_request_bytes / GiB))


# ---------------------------------------------------------------- the engine worker (runs where vLLM is installed)


def prompt_ids(vocab: int, context: int, count: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``context`` random token ids, the same for every model and every call."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + context * 1_009 + count)
    return torch.randint(LOWEST_PROMPT_ID, vocab, (count, context), generator=generator).tolist()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def batch_result(
    model: str, context: int, outputs, wall_s: float, bytes_per_request: int, allocated: int
) -> ServeResult:
    """A ``ServeResult`` from vLLM's ``RequestOutput``s of one batch (their ``metrics`` timestamps)."""
    stats = [output.metrics for output in outputs]
    if any(s is None or not s.first_token_ts for s in stats):
        raise RuntimeError("vLLM returned no request timestamps (the engine must run with disable_log_stats=False)")
    decode = [s.last_token_ts - s.first_token_ts for s in stats]
    latency = [s.first_token_latency + d for s, d in zip(stats, decode, strict=True)]
    produced = sum(len(output.outputs[0].token_ids) for output in outputs)
    return ServeResult(
        model=model,
        context=context,
        concurrency=len(outputs),
        output_tokens=produced,
        wall_s=wall_s,
        tokens_per_s=produced / wall_s,
        latency_mean_s=statistics.fmean(latency),
        latency_p50_s=_percentile(latency, 0.5),
        latency_p90_s=_percentile(latency, 0.9),
        ttft_mean_s=statistics.fmean(s.first_token_latency for s in stats),
        prefill_mean_s=statistics.fmean(s.first_token_ts - s.scheduled_ts for s in stats),
        decode_mean_s=statistics.fmean(decode),
        queued_mean_s=statistics.fmean(s.scheduled_ts - s.queued_ts for s in stats),
        bytes_per_request=bytes_per_request,
        vllm_bytes_per_request=allocated,
    )


def serve_model(spec: dict) -> dict:
    """Run every (context, concurrency) batch of ``spec`` through one vLLM engine in this process.

    ``spec``: ``label``, ``path``, ``dtype``, ``contexts``, ``concurrency``, ``tokens``, ``seed``, ``vocab``,
    ``bytes_per_token`` / ``bytes_per_request`` (the original's KV per token, the converted model's state) and
    ``parity`` (how many of the shortest context's largest batch to return tokens of); ``result_path`` is where
    the worker writes what this returns.
    """
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from linspec.serving.registration import register

    register()  # the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): no entry point needed
    contexts, concurrency, tokens = spec["contexts"], spec["concurrency"], spec["tokens"]
    llm = LLM(
        model=spec["path"],
        dtype=spec["dtype"],
        max_model_len=max(contexts) + tokens,
        max_num_seqs=max(concurrency),
        enforce_eager=True,
        enable_prefix_caching=False,  # every prompt is new anyway; state layers do not take prefix caching
        disable_log_stats=False,  # per-request timestamps in RequestOutput.metrics
        seed=spec["seed"],
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    warmup = prompt_ids(spec["vocab"], 16, max(concurrency), spec["seed"] + 1)
    llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in warmup], params, use_tqdm=False)  # first-call costs
    block_bytes, block_tokens = page_bytes(llm)
    results, parity = [], []
    for context in contexts:
        for count in concurrency:
            batch = prompt_ids(spec["vocab"], context, count, spec["seed"])
            start = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params, use_tqdm=False)
            wall = time.perf_counter() - start
            per_request = spec["bytes_per_request"] or spec["bytes_per_token"] * (context + tokens)
            allocated = block_bytes * math.ceil((context + tokens) / block_tokens)
            results.append(asdict(batch_result(spec["label"], context, outputs, wall, per_request, allocated)))
            if context == contexts[0] and count == concurrency[-1]:
                parity = [list(output.outputs[0].token_ids) for output in outputs[: spec["parity"]]]
    return {
        "results": results,
        "parity_tokens": parity,
        "vllm_cache_bytes": llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes,
        "vllm_block_bytes": block_bytes,
        "vllm_block_tokens": block_tokens,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "torch_threads": torch.get_num_threads(),  # as vLLM's CPU worker bound them
    }


def page_bytes(llm) -> tuple[int, int]:
    """``(bytes, tokens)`` of one block of vLLM's cache over all layers, as its scheduler allocates them: a block
    of paged KV for softmax layers, one request's whole state (one block as long as the model) for state layers.
    Read from the engine core, which runs in this process."""
    config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    total, tokens = 0, set()
    for group in config.kv_cache_groups:
        total += len(group.layer_names) * group.kv_cache_spec.page_size_bytes
        tokens.add(group.kv_cache_spec.block_size)
    if len(tokens) != 1:
        raise RuntimeError(f"vLLM's cache groups have different block sizes {sorted(tokens)}")
    return total, tokens.pop()


def run_worker(spec: dict, cache_gib: int) -> dict:
    """``serve_model(spec)`` in a fresh process with vLLM's CPU settings in its environment."""
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in the worker itself, where the plugin registered
        "VLLM_CPU_KVCACHE_SPACE": str(cache_gib),
    }
    command = [sys.executable, "-m", "linspec.bench.serve", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0 or not Path(spec["result_path"]).is_file():
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise LinspecError(f"the vLLM engine for the {spec['label']} model failed: {tail[0][-300:]}")
    return json.loads(Path(spec["result_path"]).read_text())


# ---------------------------------------------------------------- the command (no vLLM import here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="original model: a demo name or a plain HF directory vLLM loads"
    )
    parser.add_argument(
        "--converted", help="the converted model's saved directory (default: convert --model with --preset)"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="window", help="preset of the default conversion (window)"
    )
    parser.add_argument("--contexts", type=count_arg(1, MAX_LENGTH), nargs="+", default=DEFAULT_CONTEXTS,
                        help="prompt lengths in tokens (default 256 4096)")  # fmt: skip
    parser.add_argument("--concurrency", type=count_arg(1, MAX_CONCURRENCY), nargs="+", default=DEFAULT_CONCURRENCY,
                        help="requests submitted at once (default 1 8 16)")  # fmt: skip
    parser.add_argument("--tokens", type=count_arg(1, MAX_NEW_TOKENS), default=64,
                        help="greedy tokens each request generates (default 64)")  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights (default float32)")
    parity_help = "converted-model requests checked against linspec's greedy tokens (default 2)"
    parser.add_argument("--parity-prompts", type=count_arg(1), default=2, help=parity_help)
    parser.add_argument("--seed", type=count_arg(0, 2**32 - 1), default=0, help="prompt seed (default 0)")
    add_output_arguments(parser)


def check_vllm_installed() -> None:
    """Refuse in one line where vLLM is missing (linspec's own environment does not hold it)."""
    if importlib.util.find_spec("vllm") is None:
        raise LinspecError(
            "linspec bench serve needs vLLM in this environment: pip install 'linspec[vllm]' (docs/serving.md)"
        )


def original_directory(source: str) -> Path:
    """The original model as a plain Hugging Face directory vLLM loads natively (the demo model: its cached copy)."""
    from linspec.sources.demo_models import DEMO_MODELS, demo_model_dir

    if source in DEMO_MODELS:
        return demo_model_dir(source)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise LinspecError(f"--model {source} is neither a demo name nor a model directory with a config.json")
    return path


def linspec_greedy(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """linspec's greedy tokens for each prompt, one at a time, EOS not stopping them (as vLLM ran them)."""
    import torch

    from linspec.speculative.generate import speculative_generate

    out = []
    for ids in prompts:
        with torch.inference_mode():
            sequences = speculative_generate(model, None, torch.tensor([ids]), tokens).sequences
        out.append(sequences[0, len(ids) :].tolist())
    return out


def summarise(results: list[ServeResult]) -> dict:
    """Converted over original tokens/s per (context, concurrency), and the issue's target cell."""
    by = {(r.model, r.context, r.concurrency): r for r in results}
    speedup = {
        f"{context}x{count}": by["converted", context, count].tokens_per_s / by["original", context, count].tokens_per_s
        for _, context, count in sorted(key for key in by if key[0] == "original")
        if ("converted", context, count) in by
    }
    target = speedup.get(f"{TARGET_CONTEXT}x{TARGET_CONCURRENCY}")
    return {"speedup": speedup, "target_speedup": target, "target_met": None if target is None else target >= 1.5}


def plot(results: list[ServeResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r.context for r in results})
    figure, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 3.8), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        for name, style in (("original", "o-"), ("converted", "s-")):
            rows = sorted((r for r in results if r.model == name and r.context == context), key=lambda r: r.concurrency)
            ax.plot([r.concurrency for r in rows], [r.tokens_per_s for r in rows], style, label=name)
        ax.set_title(f"{context}-token prompts")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s (total)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    return figure


def run(args: argparse.Namespace) -> int:
    check_vllm_installed()
    check_count(args.parity_prompts, "--parity-prompts", 1, max(args.concurrency))
    out_dir = output_dir(args, NAME)
    contexts, concurrency = sorted(set(args.contexts)), sorted(set(args.concurrency))
    original = original_directory(args.model)
    config = json.loads((original / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="linspec-bench-serve-") as scratch:
        converted_dir = Path(args.converted) if args.converted else convert_for_bench(args, scratch)
        converted = load_converted(converted_dir, args.dtype)
        per_token = kv_bytes_per_token(config, args.dtype)
        state = state_bytes_per_request(converted, args.dtype)
        cache_gib = cache_space_gib(max(per_token * (max(contexts) + args.tokens), state), max(concurrency))
        base = {"contexts": contexts, "concurrency": concurrency, "tokens": args.tokens, "dtype": args.dtype,
                "seed": args.seed, "vocab": config["vocab_size"], "parity": args.parity_prompts}  # fmt: skip
        specs = [
            {**base, "label": label, "path": str(path), "bytes_per_token": token_bytes, "bytes_per_request": fixed,
             "result_path": str(Path(scratch) / f"{label}.json")}
            for label, path, token_bytes, fixed in (("original", original, per_token, 0),
                                                    ("converted", converted_dir, 0, state))
        ]  # fmt: skip
        engines = {}
        with progress_bar(len(specs), "serving benchmark", unit="engine") as bar:
            for spec in specs:
                show_item(bar, f"{spec['label']} in vLLM")
                engines[spec["label"]] = run_worker(spec, cache_gib)
                bar.update()
        prompts = prompt_ids(config["vocab_size"], contexts[0], concurrency[-1], args.seed)[: args.parity_prompts]
        reference = linspec_greedy(converted, prompts, args.tokens)
    results = [ServeResult(**row) for engine in engines.values() for row in engine["results"]]
    parity = engines["converted"]["parity_tokens"] == reference
    summary = summarise(results)
    text = section(args, results, summary, engines, parity, cache_gib)
    print(text)
    if out_dir is not None:
        payload = {
            "model": args.model, "converted": args.converted or f"linspec convert {args.model} (preset {args.preset})",
            "contexts": contexts, "concurrency": concurrency, "tokens": args.tokens, "dtype": args.dtype,
            "seed": args.seed, "vllm_cpu_kvcache_space_gib": cache_gib, "parity": parity,
            "parity_prompts": args.parity_prompts,
            "engines": {label: {k: v for k, v in e.items() if k not in ("results", "parity_tokens")}
                        for label, e in engines.items()},
        }  # fmt: skip
        path = record_bench(NAME, {**payload, "results": [asdict(r) for r in results], **summary}, text,
                            plot(results), results_folder(args, out_dir))  # fmt: skip
        print(f"wrote {path}")
    if not parity:
        print("greedy parity failed: the converted model's tokens from vLLM differ from linspec's", file=sys.stderr)
    return 0 if parity else 1


def convert_for_bench(args: argparse.Namespace, scratch: str) -> Path:
    """``linspec convert MODEL OUT`` with ``--preset``, into the scratch folder (deleted after the run)."""
    import torch

    from linspec.config import LinspecConfig
    from linspec.conversion.checkpoint import convert_checkpoint

    settings = LinspecConfig.from_preset(args.preset)
    return convert_checkpoint(args.model, Path(scratch) / "converted", settings, dtype=getattr(torch, args.dtype))


def load_converted(path: Path, dtype: str):
    """The converted model through linspec (what ``linspec generate`` loads), for the parity check and its state
    layout."""
    import torch

    from linspec.sources.loading import load_source

    model, _ = load_source(str(path), dtype=getattr(torch, dtype), progress=False)
    return model


def section(args, results: list[ServeResult], summary: dict, engines: dict, parity: bool, cache_gib: int) -> str:
    """The benchmarks.md section: the command's settings, the table, the target and the parity check."""
    rows = [
        [r.context, r.concurrency, r.model, r.tokens_per_s, r.latency_mean_s, r.latency_p50_s, r.latency_p90_s,
         r.ttft_mean_s, r.prefill_mean_s, r.decode_mean_s, r.bytes_per_request / 2**20,
         r.vllm_bytes_per_request / 2**20]
        for r in sorted(results, key=lambda r: (r.context, r.concurrency, r.model != "original"))
    ]  # fmt: skip
    headers = ["context", "requests", "model", "tokens/s", "latency mean s", "p50 s", "p90 s", "TTFT s",
               "prefill s", "decode s", "MiB / request", "vLLM MiB"]  # fmt: skip
    speedups = ", ".join(f"{key.replace('x', ' tokens × ')}: {value:.2f}×" for key, value in summary["speedup"].items())
    target = summary["target_speedup"]
    target_line = (
        f"{target:.2f}× ({'met' if summary['target_met'] else 'not met'})"
        if target is not None
        else f"not measured (needs --contexts {TARGET_CONTEXT} and --concurrency {TARGET_CONCURRENCY})"
    )
    return (
        f"## Serving in vLLM, original vs converted ({args.model}, `linspec bench serve`)\n\n"
        f"vLLM's offline engine (CPU build), {args.dtype}, eager mode, prefix caching off, "
        f"`VLLM_CPU_KVCACHE_SPACE={cache_gib}`; each request generates {args.tokens} greedy tokens (EOS ignored) "
        "after a prompt of *context* random tokens, and *requests* are submitted at once. *tokens/s* is the batch's "
        "output tokens over its wall time (prefill included); latency is per request from arrival to its last "
        "token; *prefill s* runs from being scheduled to the first token, *decode s* from the first to the last. "
        "*MiB / request* is what vLLM keeps for one request: the original's paged KV at context + tokens, the "
        "converted model's constant-size state; *vLLM MiB* what vLLM allocated for it (whole blocks of pages).\n\n"
        f"{markdown_table(headers, rows)}\n\n"
        f"- converted / original tokens/s: {speedups}\n"
        f"- target (converted ≥ {TARGET_SPEEDUP}× the original at {TARGET_CONTEXT} tokens × "
        f"{TARGET_CONCURRENCY} requests): {target_line}\n"
        f"- vLLM's pages over all layers: original {engines['original']['vllm_block_bytes']:,} bytes per block "
        f"of {engines['original']['vllm_block_tokens']} tokens, converted "
        f"{engines['converted']['vllm_block_bytes']:,} bytes per request at any length\n"
        f"- greedy parity (converted model in vLLM vs linspec's generation, {args.parity_prompts} prompts of "
        f"{min(args.contexts)} tokens × {args.tokens} tokens): **{'exact' if parity else 'DIFFERENT'}**"
    )


if __name__ == "__main__":  # worker: python -m linspec.bench.serve SPEC_JSON (see serve_model)
    _spec = json.loads(sys.argv[1])
    # a file, not stdout: vLLM logs to stdout, and may after the last line this process prints
    Path(_spec["result_path"]).write_text(json.dumps(serve_model(_spec)))
