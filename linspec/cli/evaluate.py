"""``linspec eval ppl MODEL --data FILE``: sliding-window perplexity, with component ablations."""

from __future__ import annotations

import argparse

from linspec.cli.evaluate_quality import add_quality_tasks, check_output, finish, rerun_command
from linspec.utils.devices import add_placement_arguments
from linspec.utils.validation import MAX_LENGTH, MAX_TRIALS, count_arg


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        description="Evaluate a linspec model or any causal LM linspec can load.",
        epilog="example: linspec eval ppl runs/smollm2-135m-demo/model --data builtin:wiki-en-eval --ablations",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    ppl = tasks.add_parser(
        "ppl",
        help="sliding-window perplexity on a text file",
        description="Perplexity over the text: windows of --window tokens every --stride tokens; each window "
        "scores only tokens the previous one did not. --ablate zeroes γ (the global path) and/or the conv in "
        "every linear layer; --ablations runs all four variants so each component's contribution shows. With "
        "--lengths (perplexity vs context length), a model with a softmax window also gets its window-only curve "
        "(same window and sinks, memory and conv off) unless --no-baselines; --ablate/--ablations add curves.",
        epilog="example: linspec eval ppl runs/smollm2-135m-demo/model --data notes.txt --window 256 --ablations",
    )
    add_model_and_data(ppl, "model directory, .gguf file, hub id or demo name")
    ppl.add_argument("--window", type=count_arg(2, MAX_LENGTH), default=256, help="tokens per window (default 256)")
    ppl.add_argument(
        "--stride", type=count_arg(1, MAX_LENGTH), help="tokens between window starts (default: --window, no overlap)"
    )
    ppl.add_argument("--max-tokens", type=count_arg(2, 1 << 40), help="score only the first N tokens of the text")
    ppl.add_argument(
        "--ablate",
        choices=["gamma", "conv", "far-memory", "memory-readout", "both", "window-only"],
        help="zero γ, the conv, or both, or stop the window reading its far memory and sparse cache (far-memory) or "
        "only the memory's share, the cache kept as the memory chooses it (memory-readout); both and window-only "
        "turn off every memory and the conv (window-only on a model with a softmax window); with --lengths, one "
        "more curve",
    )
    ppl.add_argument(
        "--ablations",
        action="store_true",
        help="run full, no-gamma, no-conv and local-only (window-only on a windowed model; a model without the "
        "grouped term has only full and window-only); with --lengths, a curve each",
    )
    add_placement_arguments(ppl)
    ppl.set_defaults(func=run_ppl)

    layers = tasks.add_parser(
        "layers",
        help="rank linear layers by the perplexity (or passkey loss) left when each runs as softmax (for a hybrid)",
        description="For a converted (ideally attention-transferred) linspec model: run each linear layer alone "
        "as softmax attention with its current weights and rank layers by the perplexity of --data that leaves "
        "(--by ppl) or by the loss of the key in passkey prompts (--by passkey: which layers retrieval needs); "
        "then measure the best 1..--top together (--search single) or add, one at a time, the layer that helps "
        "most together with those already chosen (--search greedy). The sets printed are candidates for "
        "conversion.softmax_layers.",
        epilog="example: linspec eval layers runs/demo/stages/transfer --data builtin:wiki-en-eval --top 8; "
        "linspec eval layers out/smollm2-window --by passkey --search greedy --pool 12 --top 4",
    )
    add_model_and_data(layers, "linspec model directory", data_required=False)
    layers.add_argument("--by", choices=["ppl", "passkey"], default="ppl", help="what to rank by (default ppl)")
    layers.add_argument(
        "--passkey-length", type=count_arg(1, MAX_LENGTH), default=1024, help="--by passkey: prompt tokens (1024)"
    )
    layers.add_argument(
        "--trials", type=count_arg(1, MAX_TRIALS), default=4, help="--by passkey: prompts per variant (default 4)"
    )
    layers.add_argument(
        "--seq-len", type=count_arg(2, MAX_LENGTH), default=256, help="tokens per scored sequence (default 256)"
    )
    layers.add_argument(
        "--max-sequences", type=count_arg(1, 1 << 16), default=8, help="sequences scored per variant (default 8)"
    )
    layers.add_argument(
        "--top", type=count_arg(1, 4096), default=8, help="largest set of layers measured together (default 8)"
    )
    layers.add_argument(
        "--search",
        choices=["single", "greedy"],
        default="single",
        help="sets of k layers: the best k alone (single, default) or forward selection (greedy)",
    )
    layers.add_argument(
        "--pool", type=count_arg(1, 4096), help="--search greedy: only the N best single layers are candidates"
    )
    add_placement_arguments(layers)
    layers.set_defaults(func=run_layers)
    heads = tasks.add_parser(
        "heads",
        help="rank the kv heads of a softmax model by the attention a linear layer would lose (for softmax_heads)",
        description="For a softmax model (what linspec convert takes): the share of each kv head's attention, on "
        "--data sequences twice the local span, that falls outside the span a linear layer keeps exactly (the "
        "softmax window and its sinks, or one group). The heads that lose the most are the candidates for "
        "conversion.softmax_heads (linspec convert --softmax-heads auto:N picks the same ones).",
        epilog="example: linspec eval heads smollm2-135m --data builtin:wiki-en-eval --preset window "
        "--local-window 1024 --top 12",
    )
    add_model_and_data(heads, "softmax model directory, .gguf file, hub id or demo name")
    heads.add_argument("--preset", default="window", help="conversion preset whose local span counts (default window)")
    heads.add_argument(
        "--local-window", type=count_arg(1, MAX_LENGTH), help="softmax window of the conversion (window preset: 512)"
    )
    heads.add_argument("--max-sequences", type=count_arg(1, 1 << 10), default=2, help="sequences measured (default 2)")
    heads.add_argument("--top", type=count_arg(1, 1 << 12), default=12, help="heads listed and kept (default 12)")
    add_placement_arguments(heads)
    heads.set_defaults(func=run_heads)
    add_quality_tasks(tasks, ppl)


def run_heads(args: argparse.Namespace) -> int:
    from linspec.config import LinspecConfig
    from linspec.conversion.softmax_heads import far_attention_mass, largest_heads, local_span, ranking_sequences
    from linspec.errors import LinspecError
    from linspec.evaluation.lengths import max_positions
    from linspec.evaluation.perplexity import read_text_ids
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement
    from linspec.utils.results import markdown_table

    overrides = {} if args.local_window is None else {"local_window": args.local_window}
    settings = LinspecConfig.from_preset(args.preset, **overrides)
    check_data(args.data)
    device, dtype = placement(args.device, args.dtype)
    model, tokenizer = load_source(args.model, dtype=dtype, device=device)
    if getattr(model.config, "linspec", None) is not None:
        raise LinspecError(f"{args.model} is a linspec model; rank the heads of its softmax parent")
    if tokenizer is None:
        raise LinspecError(f"{args.model} has no tokenizer")
    span = local_span(settings)[0]
    limit = max_positions(model)
    if limit is not None and 2 * span > limit:
        raise LinspecError(
            f"heads are ranked on sequences of twice the local span ({2 * span} tokens), past {args.model}'s {limit} "
            "positions; give a smaller --local-window"
        )
    sequences = ranking_sequences(read_text_ids(tokenizer, args.data, args.text_field), settings, args.max_sequences)
    mass = far_attention_mass(model.eval(), settings, sequences)
    chosen = largest_heads(mass, min(args.top, mass.numel()))
    print(
        f"attention outside the {span}-token local span, {len(sequences)} sequences of {sequences.shape[1]} tokens "
        f"(summed over the query heads of each kv head)"
    )
    rows = [[f"{layer}:{head}", round(float(mass[layer, head]), 3)] for layer, head in chosen]
    print(markdown_table(["layer:kv head", "outside mass"], rows))
    print(f"\n--softmax-heads {','.join(f'{layer}:{head}' for layer, head in sorted(chosen))}")
    return 0


def add_model_and_data(parser: argparse.ArgumentParser, model_help: str, data_required: bool = True) -> None:
    """The model and the text every evaluation task scores."""
    parser.add_argument("model", help=model_help)
    parser.add_argument(
        "--data", required=data_required, help=".txt/.jsonl/.parquet file or builtin:NAME (e.g. builtin:wiki-en-eval)"
    )
    parser.add_argument("--text-field", default="text", help="text column of jsonl/parquet data (default: text)")


def check_data(source: str) -> None:
    """Refuse missing, empty, binary or unknown data before the model is loaded."""
    from linspec.data.documents import local_files
    from linspec.errors import LinspecError

    if source.startswith("hub:"):
        if not source[4:]:
            raise LinspecError("--data hub: needs a dataset name")
        return
    local_files(source)


def run_ppl(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from linspec.errors import LinspecError
    from linspec.evaluation.perplexity import (
        ablated,
        ablation_components,
        ablation_variants,
        perplexity_of_ids,
        read_text_ids,
        variant_name,
    )
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement
    from linspec.utils.results import markdown_table

    if args.stride is not None and args.stride > args.window:
        raise LinspecError(f"--stride must be in 1..--window ({args.window}), got {args.stride}")
    if args.ablate and args.ablations:
        raise LinspecError("--ablate picks one variant and --ablations runs all four; pass one of them")
    check_output(args, "ppl")
    device, dtype = placement(args.device, args.dtype)
    check_data(args.data)
    model, tokenizer = load_source(args.model, dtype=dtype, device=device)
    if tokenizer is None:
        raise LinspecError(f"{args.model} has no tokenizer")
    ids = read_text_ids(tokenizer, args.data, args.text_field)[: args.max_tokens]
    if len(ids) < 2:
        raise LinspecError(f"{args.data} holds fewer than two tokens of text; nothing to score")
    if args.ablations:
        variants = ablation_variants(model)
    else:
        variants = [ablation_components(args.ablate, model) if args.ablate else ()]
    rows, results = [], {}
    for components in variants:
        name = variant_name(model, components)
        with ablated(model, components):
            results[name] = perplexity_of_ids(model.eval(), ids, args.window, args.stride)
        rows.append([name, round(results[name].ppl, 3), results[name].tokens, round(results[name].tokens_per_s)])
    section = (
        f"### Sliding-window perplexity\n\n`{rerun_command(args)}`. Windows of {args.window} tokens every "
        f"{args.stride or args.window}; each scores only the tokens the previous one did not.\n\n"
        + markdown_table(["variant", "perplexity", "tokens", "tokens/s"], rows)
    )
    data = {"command": rerun_command(args), "data": args.data, "variants": {k: asdict(v) for k, v in results.items()}}
    finish(args, "ppl", data, section)
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from linspec.conversion.choice import text_sequences
    from linspec.conversion.softmax_layers import rank_layers
    from linspec.errors import LinspecError
    from linspec.evaluation.perplexity import read_text_ids
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement
    from linspec.utils.results import markdown_table

    if args.by == "ppl" and not args.data:
        raise LinspecError("--by ppl needs --data (the text to score)")
    if args.pool is not None and args.search == "single":
        raise LinspecError("--pool narrows the candidates of --search greedy; --search single measures every layer")
    device, dtype = placement(args.device, args.dtype)
    if args.data:
        check_data(args.data)
    model, tokenizer = load_source(args.model, dtype=dtype, device=device)
    if not hasattr(model, "linspec_modules") or not model.linspec_modules():
        raise LinspecError(f"{args.model} has no linear-attention layers; convert it first (linspec convert)")
    if tokenizer is None:
        raise LinspecError(f"{args.model} has no tokenizer")
    if args.by == "passkey":
        from linspec.evaluation.lengths import check_lengths
        from linspec.evaluation.passkey import key_nll_scorer

        check_lengths(model, [args.passkey_length])
        score = key_nll_scorer(tokenizer, args.passkey_length, args.trials)
        ranking = rank_layers(model, None, top=args.top, score=score, search=args.search, pool=args.pool)
        metric = "passkey key NLL"
        print(f"all linear: {metric} {ranking.baseline:.3f} ({args.trials} prompts of {args.passkey_length} tokens)")
    else:
        ids = read_text_ids(tokenizer, args.data, args.text_field)
        if len(ids) < args.seq_len:
            raise LinspecError(f"{args.data} has fewer than --seq-len {args.seq_len} tokens")
        sequences = text_sequences(ids, args.seq_len, args.max_sequences)
        ranking = rank_layers(model, sequences, top=args.top, search=args.search, pool=args.pool)
        metric = "perplexity"
        print(f"all linear: perplexity {ranking.baseline:.2f} ({len(sequences)} sequences of {args.seq_len} tokens)")
    rows = sorted(ranking.single.items(), key=lambda item: item[1])
    print(markdown_table(["layer kept softmax", metric], [[layer, round(value, 3)] for layer, value in rows]))
    print()
    print(
        markdown_table(
            ["conversion.softmax_layers", metric],
            [[str(chosen), round(value, 3)] for chosen, value in ranking.cumulative],
        )
    )
    return 0
