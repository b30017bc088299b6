"""``linspec generate MODEL --prompt TEXT [--draft KIND]``: speculative generation from the command line."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text, optionally with exact speculative decoding",
        description="Generate from a linspec model, a hybrid, or a Llama-family softmax model. With --draft, a "
        "drafter proposes tokens (a chain, or a tree with --tree-width > 1) and the model verifies them all in one "
        "forward; the output is exactly what plain decoding gives (greedy: identical tokens; sampling: the same "
        "distribution). Drafters: lookup (n-grams from the prompt: good for quoting, summarising, editing), "
        "early-exit (the model's first --exit-layer layers), model (a separate --draft-model sharing the "
        "tokenizer, e.g. the converted model drafting for its parent).",
        epilog="example: linspec generate smollm2-135m --prompt 'Repeat exactly: The quick brown fox.' "
        "--draft lookup --tree-width 2 --max-new-tokens 64 --stats",
    )
    parser.add_argument("model", help="model directory, .gguf file, hub id or demo name (e.g. smollm2-135m)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    parser.add_argument("--draft", default="none", help="none (default), lookup, early-exit or model")
    parser.add_argument("--draft-model", help="the draft model for --draft model (same tokenizer)")
    parser.add_argument("--exit-layer", type=int, help="layers the early-exit drafter uses")
    parser.add_argument("--num-draft-tokens", type=int, help="draft depth per round (default: lookup 10, models 4)")
    parser.add_argument("--tree-width", type=int, default=1, help="1 = chain (default); >1 = a tree")
    parser.add_argument("--max-ngram", type=int, default=3, help="longest n-gram prompt lookup matches (default 3)")
    parser.add_argument("--max-tree-nodes", type=int, default=64, help="refuse larger draft trees (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--stats", action="store_true", help="print acceptance statistics and speed")
    parser.add_argument("--json", action="store_true", help="print one JSON object (texts and statistics)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from linspec.errors import LinspecError
    from linspec.sources import load_source
    from linspec.speculative.drafters import build_drafter
    from linspec.speculative.generate import DEFAULT_MAX_TREE_NODES, generate_text
    from linspec.speculative.sampling import SamplingConfig

    # Everything checkable without the model is checked before loading it.
    sampling = SamplingConfig(args.do_sample, args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens <= 0:
        raise LinspecError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    options = dict(num_tokens=args.num_draft_tokens, tree_width=args.tree_width, max_ngram=args.max_ngram)
    build_drafter(args.draft, exit_layer=args.exit_layer, draft_model=args.draft_model, **options)

    model, tokenizer = load_source(args.model)
    if tokenizer is None:
        raise LinspecError(f"{args.model} has no tokenizer to encode the prompt")
    draft_model = load_source(args.draft_model)[0] if args.draft == "model" and args.draft_model else None
    drafter = build_drafter(args.draft, exit_layer=args.exit_layer, draft_model=draft_model, **options)
    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    if args.draft == "none" and len(args.prompt) == 1 and not (args.json or args.stats):
        stream_plain(model, tokenizer, args, generator)
        return 0
    texts, stats = generate_text(
        model, tokenizer, args.prompt, drafter, args.max_new_tokens, chat=not args.no_chat,
        do_sample=sampling.do_sample, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        generator=generator, max_tree_nodes=args.max_tree_nodes or DEFAULT_MAX_TREE_NODES,
    )  # fmt: skip
    if args.json:
        print(json.dumps({"texts": texts, "stats": stats.as_dict()}))
        return 0
    for text in texts:
        print(text)
    if args.stats:
        depths = ", ".join(f"{a:.2f}" for a in stats.acceptance_by_depth) or "-"
        print(
            f"[{stats.new_tokens} tokens in {stats.seconds:.2f} s = {stats.tokens_per_second:.1f} tokens/s; "
            f"{stats.target_calls} target calls, {stats.tokens_per_call:.2f} tokens per call; "
            f"acceptance by depth: {depths}]"
        )
    return 0


def stream_plain(model, tokenizer, args: argparse.Namespace, generator) -> None:
    """Plain decoding of one prompt through HF ``generate()``, printing text as it is produced."""
    import torch
    from transformers import TextStreamer

    from linspec.demo import chat_input_ids

    ids = (
        chat_input_ids(tokenizer, args.prompt[0])
        if not args.no_chat
        else tokenizer(args.prompt[0], return_tensors="pt")["input_ids"]
    )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p) if args.do_sample else {}
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        **sampling,
    )
