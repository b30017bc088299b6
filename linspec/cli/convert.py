"""``linspec convert SRC OUT``."""

from __future__ import annotations

import argparse
import re

from linspec.config import MAX_LAYERS, PRESETS, LinspecConfig
from linspec.convert import supported_architectures


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,5-7"`` -> ``(0, 5, 6, 7)``; a reversed range or an index past ``MAX_LAYERS`` is refused, not expanded."""
    layers: list[int] = []
    shown = text if len(text) <= 40 else text[:37] + "..."
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_text, dash, hi_text = part.partition("-")
        if not lo_text.strip().isdigit() or (dash and not hi_text.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"expected layer indices like '0,5-7', got {shown!r}")
        lo, hi = int(lo_text), int(hi_text if dash else lo_text)
        if hi < lo:
            raise argparse.ArgumentTypeError(f"layer range {part!r:.30} is reversed; write {hi}-{lo}")
        if hi >= MAX_LAYERS:
            raise argparse.ArgumentTypeError(f"layer index {hi} is past any model (at most {MAX_LAYERS - 1})")
        layers.extend(range(lo, hi + 1))
    if not layers and text.strip():
        raise argparse.ArgumentTypeError(f"expected layer indices like '0,5-7', got {shown!r}")
    return tuple(layers)


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
        help="convert a softmax-attention checkpoint into a linspec model directory",
        description="Swap softmax attention for augmented grouped linear attention (paper preset by default), "
        f"reusing the pretrained q/k/v/o weights. Supported architectures: {', '.join(supported_architectures())}.",
        epilog="example: linspec convert smollm2-135m out/smollm2-linear --group-size 64 --conv-taps 32 "
        "--softmax-layers 0,15",
    )
    parser.add_argument("src", help="HF model dir, hub id, .gguf file, or the demo name 'smollm2-135m'")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="settings preset (default: paper)")
    parser.add_argument("--group-size", type=int, help="tokens per group G (paper: 64)")
    parser.add_argument("--conv-taps", type=int, help="causal depthwise-conv taps P (paper: 32)")
    parser.add_argument("--feature-map", help="φ for q/k: l2norm (paper), elu1, relu")
    parser.add_argument("--local-kernel", help="κ inside groups: relu2 (paper) or identity")
    parser.add_argument("--softmax-layers", type=parse_layers, default=(), help="layers to keep softmax, e.g. 0,5-7")
    parser.add_argument(
        "--dtype", default="float32", help="dtype of the written weights: float32 (default), bfloat16, float16"
    )
    parser.add_argument("--device", default="cpu", help="where the model is loaded while converting (default cpu)")
    parser.add_argument(
        "--max-shard-size", type=parse_shard_size, default="2GB", help="safetensors shard size (default 2GB)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .bin pickles (trusted files only)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from SRC")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linspec.checkpoint import convert_checkpoint
    from linspec.devices import placement

    overrides = {
        name: getattr(args, name)
        for name in ("group_size", "conv_taps", "feature_map", "local_kernel")
        if getattr(args, name) is not None
    }
    device, dtype = placement(args.device, args.dtype)
    settings = LinspecConfig.from_preset(args.preset, softmax_layers=args.softmax_layers, **overrides)
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
    print(
        f"wrote {out} ({settings.feature_map}/{settings.local_kernel}, G={settings.group_size}, "
        f"P={settings.conv_taps}, softmax layers: {list(settings.softmax_layers) or 'none'})"
    )
    return 0
