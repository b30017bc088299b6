"""``linspec bench kernels``: the Triton chunked kernels on a GPU vs flash-linear-attention and SDPA (flash).

Three ops on the same bf16 ``[B, H, T, D]`` inputs (H = Hkv; GQA does not change the per-head work):

* ``linspec``: ``linspec.ops.triton.chunked.chunked_attention`` — the paper preset, G = 64, P = 32 taps.
* ``fla``: flash-linear-attention's ``chunk_linear_attn`` (chunk 64, no normaliser) — plain causal linear
  attention, the closest operation fla ships: the same KV-state recurrence and in-chunk products, no relu², no
  conv. Skipped with a note when fla is not installed.
* ``sdpa-flash``: ``scaled_dot_product_attention(is_causal=True)`` restricted to the flash backend.

Median time from ``triton.testing.do_bench``; achieved TB/s and TFLOP/s come from the analytic byte and FLOP
counts below (what the op must move and compute, recomputation not counted; backward counted as 2× forward
FLOPs) and are set against this card's *measured* ceilings: a large device-to-device copy and a large bf16 matmul.
The report ends with where each op of the default preset runs on this card (``linspec.ops.plan``), since the
kernels measured here serve only the presets whose settings they implement.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from linspec.bench.report import add_output_arguments, output_dir
from linspec.utils.results import markdown_table, record_bench

EXAMPLE = "example: linspec bench kernels --lengths 2048 8192 32768 --batch-heads 1x16 8x32 --head-dims 64 128"
DEFAULT_LENGTHS = [2048, 4096, 8192, 16384, 32768]
DEFAULT_BATCH_HEADS = ["2x16", "8x16", "8x32"]
GROUP_SIZE, TAPS, FLA_CHUNK = 64, 32, 64
ELEMENT = 2  # bytes per bf16 value


@dataclass
class KernelResult:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    batch: int
    heads: int
    length: int
    head_dim: int
    ms: float
    tb_per_s: float
    tflop_per_s: float
    copy_fraction: float
    matmul_fraction: float


def cost(op: str, mode: str, batch_heads: int, length: int, head_dim: int) -> tuple[float, float]:
    """``(bytes, flops)`` the op must move and compute; a model, stated here so the fractions can be checked."""
    tokens, d = batch_heads * length, head_dim
    if op == "sdpa-flash":
        flops = 2.0 * batch_heads * length * length * d  # QKᵀ and PV over the causal half: 2 · 2·T²/2 · d
        io = ELEMENT * tokens * 4 * d  # q, k, v in, o out
        states = 0.0
    else:
        chunk = GROUP_SIZE if op == "linspec" else FLA_CHUNK
        conv = 2.0 * chunk * d if op == "linspec" else 0.0  # the window of taps before each group
        flops = tokens * (4.0 * chunk * d + 4.0 * d * d + conv)  # in-chunk qkᵀ and Av, state build and q·S
        io = ELEMENT * tokens * 4 * d
        states = 2.0 * 4 * batch_heads * (-(-length // chunk)) * d * d  # fp32 S per chunk, written then read
    if mode == "fwd+bwd":
        return 2 * io + ELEMENT * tokens * 3 * d + 2 * states, 3 * flops  # + do in, dq/dk/dv out
    return io + states, flops


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    result = do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def measure_ceilings() -> dict[str, float]:
    """This card's copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s), measured, not quoted."""
    source = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    target = torch.empty_like(source)
    copy_s = median_ms(lambda: target.copy_(source)) / 1e3
    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    matmul_s = median_ms(lambda: a @ b) / 1e3
    return {"copy_bytes_per_s": 2 * source.numel() * ELEMENT / copy_s, "matmul_flop_per_s": 2 * n**3 / matmul_s}


def fla_linear_attention() -> Callable | None:
    """fla's chunked linear attention taking ``[B, H, T, D]``, or ``None`` when fla is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

    def run(q, k, v):
        out = chunk_linear_attn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0, normalize=False, **extra
        )
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return run


def ops(fla: Callable | None) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from linspec.ops.triton.chunked import chunked_attention

    def linspec_op(q, k, v, conv_weight, gamma):
        return chunked_attention(q, k, v, conv_weight, gamma, GROUP_SIZE)

    def sdpa_op(q, k, v, conv_weight, gamma):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    table = {"linspec": linspec_op, "sdpa-flash": sdpa_op}
    if fla is not None:
        table["fla"] = lambda q, k, v, conv_weight, gamma: fla(q, k, v)
    return table


def measure_one(op: str, fn: Callable, mode: str, batch: int, heads: int, length: int, head_dim: int, ceilings):
    gen = torch.Generator(device="cuda").manual_seed(length + head_dim)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q = F.normalize(randn(batch, heads, length, head_dim), dim=-1)
    k = F.normalize(randn(batch, heads, length, head_dim), dim=-1)
    v = randn(batch, heads, length, head_dim)
    conv_weight = 0.1 * torch.randn(heads, TAPS, device="cuda")
    gamma = torch.tensor(0.5, device="cuda")
    tensors = [q, k, v, conv_weight, gamma]
    if mode == "fwd":
        with torch.no_grad():
            ms = median_ms(lambda: fn(*tensors))
    else:
        tensors = [t.requires_grad_() for t in tensors]
        grad = torch.randn_like(v)

        def step():
            fn(*tensors).backward(grad)
            for t in tensors:
                t.grad = None

        ms = median_ms(step)
    nbytes, flops = cost(op, mode, batch * heads, length, head_dim)
    bytes_per_s, flop_per_s = nbytes / (ms / 1e3), flops / (ms / 1e3)
    return KernelResult(
        op,
        mode,
        batch,
        heads,
        length,
        head_dim,
        ms,
        bytes_per_s / 1e12,
        flop_per_s / 1e12,
        bytes_per_s / ceilings["copy_bytes_per_s"],
        flop_per_s / ceilings["matmul_flop_per_s"],
    )


def default_preset_routes() -> str:
    """Markdown lines: which side runs each op of the default preset on CUDA, and why."""
    from linspec.config import DEFAULT_PRESET, LinspecConfig
    from linspec.ops import plan

    routes = plan(LinspecConfig.from_preset(DEFAULT_PRESET), "cuda")
    return "\n".join([f"- the `{DEFAULT_PRESET}` preset on this card:", *(f"  - {route}" for route in routes)])


def parse_batch_heads(text: str) -> tuple[int, int]:
    batch, _, heads = text.lower().partition("x")
    if not (batch.isdigit() and heads.isdigit()) or int(batch) <= 0 or int(heads) <= 0:
        raise argparse.ArgumentTypeError(f"expected BATCHxHEADS such as 4x16, got {text!r}")
    return int(batch), int(heads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="sequence lengths")
    parser.add_argument(
        "--batch-heads",
        type=parse_batch_heads,
        nargs="+",
        default=[parse_batch_heads(x) for x in DEFAULT_BATCH_HEADS],
        help="BATCHxHEADS pairs (default: 2x16 8x16 8x32)",
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims (default 64 128)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from linspec.errors import LinspecError

    if any(not 0 < n <= 1 << 20 for n in args.lengths) or any(not 0 < d <= 512 for d in args.head_dims):
        raise LinspecError("--lengths must be in 1..1048576 and --head-dims in 1..512")
    out_dir = output_dir(args, "kernels")
    if not torch.cuda.is_available():
        raise LinspecError(
            "linspec bench kernels needs a CUDA GPU and none is visible (for CPU: linspec bench prefill)"
        )
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise LinspecError("linspec bench kernels needs triton: pip install 'linspec[gpu]'") from error
    ceilings = measure_ceilings()
    fla = fla_linear_attention()
    table = ops(fla)
    from itertools import product

    from linspec.utils.progress import progress_bar, show_item

    cases = list(product(args.modes, args.head_dims, args.batch_heads, sorted(args.lengths), table.items()))
    results = []
    with progress_bar(len(cases), "kernel benchmark", unit="case") as bar:
        for mode, head_dim, (batch, heads), length, (name, fn) in cases:
            show_item(bar, f"{name} {mode} T={length} d={head_dim}")
            results.append(measure_one(name, fn, mode, batch, heads, length, head_dim, ceilings))
            torch.cuda.empty_cache()
            bar.update()
    rows = [
        [r.op, r.mode, f"{r.batch}×{r.heads}", r.length, r.head_dim, r.ms, r.tb_per_s, f"{r.copy_fraction:.0%}",
         r.tflop_per_s, f"{r.matmul_fraction:.0%}"]
        for r in results
    ]  # fmt: skip
    headers = ["op", "mode", "B×H", "T", "d", "median ms", "TB/s", "of copy", "TFLOP/s", "of matmul"]
    device = torch.cuda.get_device_name(0)
    speedups = [
        r_sdpa.ms / r.ms
        for r in results
        if r.op == "linspec"
        for r_sdpa in results
        if r_sdpa.op == "sdpa-flash"
        and (r_sdpa.mode, r_sdpa.batch, r_sdpa.heads, r_sdpa.length, r_sdpa.head_dim)
        == (r.mode, r.batch, r.heads, r.length, r.head_dim)
    ]
    text = (
        f"## Triton kernels vs fla and SDPA flash (`linspec bench kernels`, {device}, bf16)\n\n"
        f"Measured ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s."
        f"{'' if fla else ' flash-linear-attention is not installed: no fla rows.'}\n\n"
        f"{markdown_table(headers, rows)}\n\n"
        f"- linspec vs SDPA flash, median speed-up over all cases: **{statistics.median(speedups):.2f}×**\n"
        f"{default_preset_routes()}"
    )
    print(text)
    if out_dir is not None:
        payload = {"device": device, "ceilings": ceilings, "fla_installed": fla is not None}
        path = record_bench(
            "kernels", {**payload, "results": [asdict(r) for r in results]}, text, plot(results), out_dir
        )
        print(f"wrote {path}")
    return 0


def plot(results: list[KernelResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r.mode for r in results})
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        largest = max((r.batch * r.heads, r.batch, r.heads) for r in results)[1:]
        for op in sorted({r.op for r in results}):
            for head_dim, style in zip(sorted({r.head_dim for r in results}), ("-", "--", ":", "-."), strict=False):
                rows = sorted(
                    (
                        r
                        for r in results
                        if (r.op, r.mode, r.head_dim, (r.batch, r.heads)) == (op, mode, head_dim, largest)
                    ),
                    key=lambda r: r.length,
                )
                ax.plot([r.length for r in rows], [r.ms for r in rows], "o" + style, label=f"{op}, d={head_dim}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"{mode}, B×H = {largest[0]}×{largest[1]}: median ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
