"""``linspec bench kernels``: the Triton chunked kernels on a GPU vs flash-linear-attention and SDPA (flash).

Ops on the same bf16 ``[B, H, T, D]`` inputs (H = Hkv; GQA does not change the per-head work), chosen by ``--ops``:

* ``linspec``: ``linspec.ops.triton.chunked.chunked_attention`` — the paper preset, G = 64, P = 32 taps.
* ``linspec-window``: the same kernel on the ``window`` preset's grouped term — the memory decayed per head once
  per group and normalised by the decayed token count ("mean"), the conv, no in-group term (the preset's softmax
  window is SDPA's, timed as ``sdpa-flash`` would be on its 512 tokens, not here).
* ``torch-window``: the PyTorch path of that same term (``linspec.ops.chunked``), what runs without the kernels.
* ``fla``: flash-linear-attention's ``chunk_linear_attn`` (chunk 64, no normaliser) — plain causal linear
  attention: the same KV-state recurrence and in-chunk products, no relu², no conv.
* ``fla-simple-gla``: fla's ``chunk_simple_gla`` with a constant per-head decay — the closest op to the window
  preset's memory (a decayed state; fla decays per token where linspec decays per group of 64).
  The fla ops are skipped with a note when fla is not installed.
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

from linspec.bench.report import add_output_arguments, output_dir, results_folder
from linspec.utils.results import markdown_table, record_bench

EXAMPLE = "example: linspec bench kernels --lengths 2048 8192 32768 --batch-heads 1x16 8x32 --head-dims 64 128"
DEFAULT_LENGTHS = [2048, 4096, 8192, 16384, 32768]
DEFAULT_BATCH_HEADS = ["2x16", "8x16", "8x32"]
OPS = ("linspec", "linspec-window", "torch-window", "fla", "fla-simple-gla", "sdpa-flash")
FLA_OPS = ("fla", "fla-simple-gla")
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
        ours = op.startswith(("linspec", "torch"))
        chunk = GROUP_SIZE if ours else FLA_CHUNK
        conv = 2.0 * chunk * d if ours else 0.0  # the window of taps before each group (with in-group taps)
        in_chunk = 2.0 * chunk * d if op.endswith("window") else 4.0 * chunk * d  # no qkᵀ without κ: taps·v only
        flops = tokens * (in_chunk + 4.0 * d * d + conv)  # in-chunk qkᵀ and Av, state build and q·S
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


def _fla_call(function: Callable, **fixed) -> Callable:
    """An fla op on ``[B, H, T, D]`` tensors (fla takes ``[B, T, H, D]``), returning the output only."""
    extra = {"head_first": False} if "head_first" in inspect.signature(function).parameters else {}

    def run(q, k, v, **per_call):
        out = function(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **fixed, **extra, **per_call)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return run


def fla_ops() -> dict[str, Callable]:
    """fla's ops by bench name (``chunk_linear_attn``; ``chunk_simple_gla`` where this fla has it), empty when fla
    is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return {}
    table = {"fla": _fla_call(chunk_linear_attn, scale=1.0, normalize=False)}
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return table
    simple_gla = _fla_call(chunk_simple_gla, scale=1.0)
    if "g_gamma" in inspect.signature(chunk_simple_gla).parameters:  # a constant per-head log decay

        def decayed(q, k, v):
            return simple_gla(q, k, v, g_gamma=window_log_decay(q.shape[1], q.device) / GROUP_SIZE)

    else:  # older fla: the same decay as a per-token log decay [B, T, H]

        def decayed(q, k, v):
            per_token = window_log_decay(q.shape[1], q.device) / GROUP_SIZE
            return simple_gla(q, k, v, g=per_token.expand(q.shape[0], q.shape[2], -1).contiguous())

    table["fla-simple-gla"] = decayed
    return table


def window_log_decay(heads: int, device: torch.device | str) -> torch.Tensor:
    """``log λ`` per head of a fresh ``window`` conversion (``initial_decay_logits``: horizons of 4 to 256 groups),
    fp32: the decay both ``linspec-window`` and ``fla-simple-gla`` apply (fla per token, so divided by G)."""
    from linspec.models.terms.grouped import initial_decay_logits

    return F.logsigmoid(initial_decay_logits(heads)).float().to(device)


def ops(fla: dict[str, Callable]) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from linspec.ops.chunked import chunked_attention as torch_chunked
    from linspec.ops.memory import GlobalMemory
    from linspec.ops.triton.chunked import chunked_attention

    def linspec_op(q, k, v, conv_weight, gamma):
        return chunked_attention(q, k, v, conv_weight, gamma, GROUP_SIZE)

    def window_memory(q) -> GlobalMemory:
        return GlobalMemory(log_decay=window_log_decay(q.shape[1], q.device), norm="mean")

    def linspec_window(q, k, v, conv_weight, gamma):
        return chunked_attention(q, k, v, conv_weight, gamma, GROUP_SIZE, "none", window_memory(q))

    def torch_window(q, k, v, conv_weight, gamma):
        return torch_chunked(q, k, v, conv_weight, gamma, GROUP_SIZE, "none", window_memory(q))

    def sdpa_op(q, k, v, conv_weight, gamma):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    table = {"linspec": linspec_op, "linspec-window": linspec_window, "torch-window": torch_window}
    table |= {name: (lambda q, k, v, conv_weight, gamma, fn=fn: fn(q, k, v)) for name, fn in fla.items()}
    table["sdpa-flash"] = sdpa_op
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


def speedups(results: list[KernelResult], ours: str, theirs: str) -> list[float]:
    """``theirs.ms / ours.ms`` for every case both ops were timed on (above 1: ours is faster)."""

    def case(r: KernelResult) -> tuple:
        return r.mode, r.batch, r.heads, r.length, r.head_dim

    timed = {case(r): r.ms for r in results if r.op == theirs}
    return [timed[case(r)] / r.ms for r in results if r.op == ours and case(r) in timed]


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
    parser.add_argument(
        "--ops", nargs="+", default=list(OPS), choices=OPS, help="ops to time (default: all; fla's when installed)"
    )
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
    fla = fla_ops()
    table = {name: fn for name, fn in ops(fla).items() if name in args.ops}
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
    comparisons = [
        ("linspec vs SDPA flash", "linspec", "sdpa-flash"),
        ("window preset's memory: kernels vs its PyTorch path", "linspec-window", "torch-window"),
        ("window preset's memory vs fla chunk_simple_gla", "linspec-window", "fla-simple-gla"),
    ]
    summary = [
        f"- {label}, median speed-up over all cases: **{statistics.median(ratios):.2f}×**"
        for label, ours, theirs in comparisons
        if (ratios := speedups(results, ours, theirs))
    ]
    text = (
        f"## Triton kernels vs fla and SDPA flash (`linspec bench kernels`, {device}, bf16)\n\n"
        f"Measured ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceilings['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s."
        f"{'' if fla else ' flash-linear-attention is not installed: no fla rows.'}\n\n"
        f"{markdown_table(headers, rows)}\n\n" + "".join(line + "\n" for line in summary) + default_preset_routes()
    )
    print(text)
    if out_dir is not None:
        payload = {"device": device, "ceilings": ceilings, "fla_installed": bool(fla)}
        path = record_bench(
            "kernels",
            {**payload, "results": [asdict(r) for r in results]},
            text,
            plot(results),
            results_folder(args, out_dir),
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
