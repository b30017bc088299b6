"""``linspec generate MODEL --prompt TEXT [--draft KIND]``: speculative generation from the command line."""

from __future__ import annotations

import argparse
import json
import math

from linspec.drafting.registry import KINDS, SETTINGS, kinds_taking
from linspec.utils.devices import add_placement_arguments
from linspec.utils.validation import seed_arg


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        description="Generate from a linspec model, a hybrid, or a Llama-family softmax model. With --draft, a "
        "drafter proposes tokens (a chain, or a tree with --tree-width > 1) and the model verifies them all in one "
        "forward; the output is exactly what plain decoding gives (greedy: identical tokens; sampling: the same "
        "distribution). Drafters: lookup (n-grams from the prompt: good for quoting, summarising, editing), "
        "early-exit (the model's first --exit-layer layers), model (a separate --draft-model sharing the "
        "tokenizer, e.g. the converted model drafting for its parent), medusa, eagle and redrafter (drafters trained "
        "for this model with linspec train, loaded with --drafter DIR).",
        epilog="example: linspec generate smollm2-135m --prompt 'Repeat exactly: The quick brown fox.' "
        "--draft lookup --tree-width 2 --max-new-tokens 64 --stats",
    )
    parser.add_argument("model", help="model directory, .gguf file, hub id or demo name (e.g. smollm2-135m)")
    parser.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt; - reads it from stdin; repeat for a batch"
    )
    parser.add_argument(
        "--prompt-file", action="append", dest="prompt", type=PromptFile, metavar="FILE",
        help="a prompt read from a UTF-8 text file (its final newline dropped); repeatable, mixes with --prompt",
    )  # fmt: skip
    parser.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    add_decoding_arguments(parser)
    parser.add_argument("--stats", action="store_true", help="print acceptance statistics and speed")
    parser.add_argument("--json", action="store_true", help="print one JSON object (texts and statistics)")
    parser.set_defaults(func=run)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The drafter, the budget, sampling and placement: the flags ``generate`` and ``chat`` share. The drafter
    flags are the settings of ``linspec.drafting.registry``, each saying which kinds take it."""
    parser.add_argument("--draft", default="none", help=f"{', '.join(KINDS)} (default: none)")
    for setting in SETTINGS.values():
        where = f"--draft {'/'.join(kinds_taking(setting.name))}: "
        if setting.type is bool:
            parser.add_argument(setting.flag, action="store_true", default=None, help=where + setting.help)
        else:
            parser.add_argument(setting.flag, type=setting.type, metavar=setting.metavar, help=where + setting.help)
    parser.add_argument("--max-tree-nodes", type=int, help="refuse larger draft trees (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 0 = off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default 1)")
    parser.add_argument("--seed", type=seed_arg(), help="random seed for sampling")
    add_placement_arguments(parser)


class PromptFile(str):
    """A ``--prompt-file`` path among the ``--prompt`` texts (one list keeps their order)."""


MAX_PROMPT_BYTES = 1 << 24  # 16 MiB of text is far past any model's context; more is a mistake, refused unread


def read_prompts(prompts: list[str] | None) -> list[str]:
    """The prompt texts: ``-`` is stdin (once), a ``PromptFile`` is that file's UTF-8 text without its final
    newline, anything else is the text itself."""
    import sys

    from linspec.errors import LinspecError

    if not prompts:
        raise LinspecError("give a prompt: --prompt TEXT, --prompt - (stdin) or --prompt-file FILE")
    if sum(p == "-" and not isinstance(p, PromptFile) for p in prompts) > 1:
        raise LinspecError("--prompt - reads stdin, which holds one prompt; give it once")
    texts = []
    for prompt in prompts:
        if isinstance(prompt, PromptFile):
            try:
                with open(prompt, "rb") as file:
                    data = file.read(MAX_PROMPT_BYTES + 1)
            except OSError as error:
                raise LinspecError(f"--prompt-file {prompt}: {error.strerror or error}") from None
            texts.append(_decoded(data, f"--prompt-file {prompt}"))
        elif prompt == "-":
            if sys.stdin is None:
                raise LinspecError("--prompt - reads stdin, which is closed")
            texts.append(_decoded(sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1), "--prompt - (stdin)"))
        else:
            texts.append(prompt)
    return texts


def _decoded(data: bytes, where: str) -> str:
    from linspec.errors import LinspecError

    if len(data) > MAX_PROMPT_BYTES:
        raise LinspecError(f"{where} holds more than {MAX_PROMPT_BYTES >> 20} MiB; that is no prompt")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is no part of the prompt
    except UnicodeDecodeError:
        raise LinspecError(f"{where} is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def load_decoding(args: argparse.Namespace):
    """``(model, tokenizer, drafter, sampling, generator)`` for the decoding flags, every flag checked first."""
    import torch

    from linspec.errors import LinspecError
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement

    spec, sampling = check_arguments(args)  # everything checkable without the model, before loading it
    device, dtype = placement(args.device, args.dtype)
    model, tokenizer = load_source(args.model, dtype=dtype, device=device)
    if tokenizer is None:
        raise LinspecError(f"{args.model} has no tokenizer to encode the prompt")
    drafter = spec.build(model, tokenizer)
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    return model, tokenizer, drafter, sampling, generator


def decoding_options(args: argparse.Namespace, sampling, generator) -> dict:
    """The keyword arguments of ``speculative_generate`` the decoding flags set."""
    from linspec.speculative.generate import DEFAULT_MAX_TREE_NODES

    return dict(
        do_sample=sampling.do_sample, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        generator=generator, max_tree_nodes=args.max_tree_nodes or DEFAULT_MAX_TREE_NODES,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from linspec.errors import LinspecError
    from linspec.speculative.generate import generate_text

    args.prompt = read_prompts(args.prompt)
    for prompt in args.prompt:
        if not prompt.strip():
            raise LinspecError("--prompt is empty; give the text to continue")
    model, tokenizer, drafter, sampling, generator = load_decoding(args)
    check_prompts_fit(model, tokenizer, args)
    # One prompt streams its text as rounds are accepted; a batch or --json prints once everything is done.
    stream = len(args.prompt) == 1 and not args.json
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    texts, stats = generate_text(
        model, tokenizer, args.prompt, drafter, args.max_new_tokens, chat=not args.no_chat, streamer=streamer,
        **decoding_options(args, sampling, generator),
    )  # fmt: skip
    if args.json:
        print(json.dumps({"texts": texts, "stats": stats.as_dict()}))
        return 0
    if not stream:
        for text in texts:
            print(text)
    if args.stats:
        print(stats_line(stats))
    return 0


def stats_line(stats) -> str:
    """``[N tokens in S s = R tokens/s; C target calls, T tokens per call; acceptance by depth: ...]``: N is every
    token printed, C the verification forwards (the prefill not counted) and T = N / C for one prompt (a batch:
    tokens per prompt per call, over the prompt-rounds each call served)."""
    depths = ", ".join(f"{a:.2f}" for a in stats.acceptance_by_depth) or "-"
    calls = f"{stats.target_calls} target calls"
    per_call = f"{stats.tokens_per_call:.2f} tokens per call"
    if stats.row_rounds != stats.target_calls:
        calls += f" ({stats.row_rounds} prompt-rounds)"
        per_call = f"{stats.tokens_per_call:.2f} tokens per prompt per call"
    return (
        f"[{stats.new_tokens} tokens in {stats.seconds:.2f} s = {stats.tokens_per_second:.1f} tokens/s; "
        f"{calls}, {per_call}; acceptance by depth: {depths}]"
    )


MAX_NEW_TOKENS = 1 << 20
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_arguments(args: argparse.Namespace):
    """Refuse every flag that is out of range or would be ignored, naming the flag: ``(drafter spec, sampling)``.

    The drafter flags are checked by the registry's spec of ``--draft``; the rest here."""
    from linspec.drafting.registry import drafter_spec
    from linspec.errors import LinspecError
    from linspec.speculative.generate import MAX_TREE_NODES
    from linspec.speculative.sampling import SamplingConfig
    from linspec.utils.validation import check_count

    if not 0 < args.max_new_tokens <= MAX_NEW_TOKENS:
        raise LinspecError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}, got {args.max_new_tokens}")
    drafting = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    spec = drafter_spec(args.draft, **drafting)
    if args.max_tree_nodes is not None:
        if args.draft == "none":
            kinds = " or ".join(kind for kind in KINDS if kind != "none")
            raise LinspecError(f"--max-tree-nodes only applies to --draft {kinds} (got --draft none)")
        check_count(args.max_tree_nodes, "--max-tree-nodes", 1, MAX_TREE_NODES)
    given = [_flag(name) for name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if given and not args.do_sample:
        raise LinspecError(f"{given[0]} only applies with --do-sample (greedy decoding ignores it)")
    if args.temperature is not None and math.isinf(args.temperature):
        raise LinspecError("--temperature must be finite")
    defaults = SamplingConfig()
    return spec, SamplingConfig(  # checks the ranges of --temperature, --top-k and --top-p
        args.do_sample,
        defaults.temperature if args.temperature is None else args.temperature,
        defaults.top_k if args.top_k is None else args.top_k,
        defaults.top_p if args.top_p is None else args.top_p,
    )


def check_prompts_fit(model, tokenizer, args: argparse.Namespace) -> None:
    """Each prompt must encode to tokens the model has, and prompt + ``--max-new-tokens`` must fit its positions."""
    from linspec.data.prompts import encode_prompts
    from linspec.errors import LinspecError
    from linspec.evaluation.lengths import check_within_positions

    input_ids, mask = encode_prompts(tokenizer, args.prompt, chat=not args.no_chat)
    if int(mask.sum(1).min()) == 0:
        raise LinspecError("--prompt encodes to no tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocab:
        raise LinspecError(f"the tokenizer produces ids up to {int(input_ids.max())}, past the model's {vocab} tokens")
    length = int(mask.sum(1).max())
    what = f"the prompt ({length} tokens) plus --max-new-tokens {args.max_new_tokens}"
    check_within_positions(model, length + args.max_new_tokens, what)
