"""``linspec convert SRC OUT``."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from linspec.config import BASE_MODEL_TYPES, DEFAULT_PRESET, PRESETS, LinspecConfig
from linspec.conversion.choice import Auto, parse_softmax_heads, parse_softmax_layers
from linspec.errors import LinspecError


def choice_arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` for ``--softmax-layers``/``--softmax-heads``: a list or ``auto:N`` (chosen by
    measurement on --data), refused by the parser in one line otherwise."""

    def read(text: str) -> Any:
        try:
            return parse(text)
        except LinspecError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    read.__name__ = parse.__name__
    return read


_SIZE = re.compile(r"([1-9][0-9]{0,6})([KMG])(i?)B", re.IGNORECASE)


def parse_shard_size(text: str) -> str:
    """``2GB``, ``500MB``, ``1GiB``: what ``save_pretrained(max_shard_size=...)`` understands (its lower-case
    ``b`` means bits, so the unit is normalised to bytes)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1GiB, got {text!r:.40}")
    number, prefix, binary = match.groups()
    return f"{number}{prefix.upper()}{'iB' if binary else 'B'}"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        description=f"Swap softmax attention for augmented grouped linear attention ({DEFAULT_PRESET} preset by "
        "default: the pretrained softmax over a sliding window, linear attention beyond it; --preset paper for the "
        "paper's layer), reusing the pretrained q/k/v/o weights. Supported architectures: "
        f"{', '.join(sorted(BASE_MODEL_TYPES))}.",
        epilog="example: linspec convert smollm2-135m out/smollm2-linear --group-size 64 --conv-taps 32 "
        "--softmax-layers 0,15; a hybrid chosen by measurement: linspec convert smollm2-135m out/smollm2-hybrid "
        "--softmax-layers auto:2 --data builtin:wiki-en-eval",
    )
    parser.add_argument("src", help="HF model dir, hub id, .gguf file, or the demo name 'smollm2-135m'")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help=f"settings preset (default: {DEFAULT_PRESET})"
    )
    parser.add_argument("--group-size", type=int, help="tokens per group G (paper: 64)")
    parser.add_argument("--conv-taps", type=int, help="causal depthwise-conv taps P (paper: 32)")
    parser.add_argument("--feature-map", help="φ for q/k: l2norm (paper), elu1, relu")
    parser.add_argument(
        "--local-kernel", help="local term: relu2 (paper) or identity inside groups, or softmax over a sliding window"
    )
    parser.add_argument("--local-window", type=int, help="tokens the softmax window covers (window preset: 512)")
    parser.add_argument("--sink-tokens", type=int, help="first tokens the softmax window always sees (window: 4)")
    parser.add_argument(
        "--sink-positions",
        help="adjacent (window preset): sinks outside the window are scored as if they sat right before it, so "
        "quality cannot drift with context; absolute (window-hedgehog): their true distance, as the tokens a far "
        "memory or sparse cache reads",
    )
    parser.add_argument(
        "--memory-distance-decay",
        action="store_true",
        default=None,
        help="with a far memory (window-hedgehog): weigh its far tokens as if by (distance / window)^-α per head, α "
        "learnt by training (0 at conversion), so the memory's weight can follow the context length",
    )
    parser.add_argument(
        "--sparse-cache",
        type=int,
        help="K evicted tokens per kv head the softmax window keeps exactly (LoLA; default 0: none); a K-entry "
        "decode state per kv head and layer, constant in context length",
    )
    parser.add_argument(
        "--sparse-cache-policy",
        help="which evicted tokens --sparse-cache keeps: recall-error (default: those the far memory recalls worst), "
        "recency or random",
    )
    parser.add_argument(
        "--softmax-layers",
        type=choice_arg(parse_softmax_layers),
        default=(),
        help="layers to keep softmax, e.g. 0,5-7; auto:N keeps the N layers that measure best on --data "
        "(linspec eval layers' ranking of the raw all-linear conversion)",
    )
    parser.add_argument(
        "--softmax-heads",
        type=choice_arg(parse_softmax_heads),
        default=(),
        help="kv heads of linear layers to keep softmax, as layer:head pairs, e.g. 4:1,7:0; auto:N keeps the N that "
        "the softmax model attends outside the local window with most, measured on --data (linspec eval heads)",
    )
    parser.add_argument("--data", help="held-out text for auto:N layers or heads (.txt/.jsonl/.parquet, builtin:NAME)")
    parser.add_argument("--text-field", help="text column of jsonl/parquet --data (default: text)")
    parser.add_argument("--dtype", default="float32", help="written weights: float32 (default), bfloat16, float16")
    parser.add_argument("--device", default="cpu", help="where the model is loaded while converting (default cpu)")
    parser.add_argument(
        "--max-shard-size", type=parse_shard_size, default="2GB", help="safetensors shard size (default 2GB)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin pickles (trusted files only)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from SRC")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linspec.conversion.checkpoint import convert_checkpoint
    from linspec.utils.devices import placement

    overrides = {
        name: getattr(args, name)
        for name in (
            "group_size",
            "conv_taps",
            "feature_map",
            "local_kernel",
            "local_window",
            "sink_tokens",
            "sink_positions",
            "memory_distance_decay",
            "sparse_cache",
            "sparse_cache_policy",
        )
        if getattr(args, name) is not None
    }
    device, dtype = placement(args.device, args.dtype)
    auto = args.softmax_layers if isinstance(args.softmax_layers, Auto) else None
    auto_heads = args.softmax_heads if isinstance(args.softmax_heads, Auto) else None
    if args.text_field is not None and args.data is None:
        raise LinspecError("--text-field names a column of --data; give --data too")
    if args.data is not None and not (auto or auto_heads):
        raise LinspecError(
            "--data is the text auto:N layers or heads are measured on; add --softmax-layers auto:N or "
            "--softmax-heads auto:N, or drop --data"
        )
    settings = LinspecConfig.from_preset(
        args.preset,
        softmax_layers=() if auto else args.softmax_layers,
        softmax_heads=() if auto_heads else args.softmax_heads,
        **overrides,
    )
    if auto or auto_heads:
        settings = choose_by_measurement(args, settings, auto, auto_heads)
    out = convert_checkpoint(
        args.src,
        args.out,
        settings,
        force=args.force,
        dtype=dtype,
        device=device,
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    maps = f"{settings.feature_map}/{settings.local_kernel}" if settings.grouped_term else settings.local_kernel
    window = f", window {settings.window_summary}" if settings.softmax_window else ""
    window += f", far memory {settings.memory_feature_map}" if settings.far_memory else ""
    window += f", sparse cache {settings.sparse_cache_summary}" if settings.sparse_cache else ""
    print(
        f"wrote {out} ({maps}{window}, {settings.grouped_summary}, "
        f"softmax layers: {list(settings.softmax_layers) or 'none'}{heads_summary(settings)})"
    )
    return 0


def format_heads(heads) -> str:
    """``"4:1,7:0"``: softmax heads as ``--softmax-heads`` takes them."""
    return ",".join(f"{layer}:{head}" for layer, head in heads)


def heads_summary(settings: LinspecConfig) -> str:
    """``", softmax heads: 4:1,7:0"`` for a summary line; empty without softmax heads."""
    return f", softmax heads: {format_heads(settings.softmax_heads)}" if settings.softmax_heads else ""


def choose_by_measurement(
    args: argparse.Namespace, settings: LinspecConfig, auto: Auto | None, auto_heads: Auto | None
) -> LinspecConfig:
    """``auto:N`` layers (the raw all-linear conversion's layers ranked on --data) and/or ``auto:N`` heads (the
    softmax model's heads ranked by attention outside the local span, on --data sequences twice that span)."""
    from linspec.conversion.choice import text_sequences
    from linspec.conversion.softmax_heads import choose_softmax_heads, ranking_sequences
    from linspec.conversion.softmax_layers import resolve_softmax_layers
    from linspec.evaluation.perplexity import read_text_ids
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement
    from linspec.utils.io import check_output_dir

    if not args.data:
        what = f"--softmax-layers {auto}" if auto else f"--softmax-heads {auto_heads}"
        raise LinspecError(f"{what} needs --data (held-out text to measure on)")
    check_output_dir(args.out, args.force)
    device, dtype = placement(args.device, args.dtype)
    base, tokenizer = load_source(
        args.src,
        dtype=dtype,
        device=device,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    if tokenizer is None:
        raise LinspecError(f"{args.src} has no tokenizer, so --data cannot be tokenised for auto:N")
    ids = read_text_ids(tokenizer, args.data, args.text_field or "text")
    if auto:
        sequences = text_sequences(ids, seq_len=256, max_sequences=8)
        settings = resolve_softmax_layers(base, settings, auto, sequences)
        print(f"{auto}: measured on {args.data}, keeping layers {list(settings.softmax_layers)} softmax")
    if auto_heads:
        heads = choose_softmax_heads(base.eval(), settings, ranking_sequences(ids, settings, 2), auto_heads.count)
        settings = replace(settings, softmax_heads=heads)
        print(f"{auto_heads}: measured on {args.data}, keeping heads {format_heads(heads)} softmax")
    return settings
