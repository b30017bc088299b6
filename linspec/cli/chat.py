"""``linspec chat MODEL``: a conversation in the terminal, each reply streamed as it is decoded.

Every turn re-encodes the whole conversation with the tokenizer's chat template and decodes the reply through
``speculative_generate`` (exact: a drafter changes the speed, never the text), so the decoding flags are
``linspec generate``'s.
"""

from __future__ import annotations

import argparse
import sys

from linspec.cli.generate import add_decoding_arguments

EXIT_WORDS = ("/exit", "/quit")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        description="Chat with a model: type a message, read the reply as it is generated; the conversation so "
        "far goes into every reply (the tokenizer's chat template). /exit, /quit, end of input (Ctrl-D) or Ctrl-C "
        "ends it. --draft speeds replies up exactly as in linspec generate (lookup pays off when replies quote the "
        "conversation).",
        epilog="example: linspec chat smollm2-135m --draft lookup --system 'You answer in one sentence.'",
    )
    parser.add_argument("model", help="model directory, .gguf file, hub id or demo name (e.g. smollm2-135m)")
    parser.add_argument("--system", help="a system message that opens the conversation")
    add_decoding_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linspec.cli.generate import decoding_options, load_decoding
    from linspec.errors import LinspecError

    if sys.stdin is None:
        raise LinspecError("stdin is closed; linspec chat reads the user's messages from it")
    if args.system is not None and not args.system.strip():
        raise LinspecError("--system is empty")
    model, tokenizer, drafter, sampling, generator = load_decoding(args)
    if not getattr(tokenizer, "chat_template", None):
        raise LinspecError(f"{args.model}'s tokenizer has no chat template; use linspec generate for plain text")
    options = decoding_options(args, sampling, generator)
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    try:
        while True:
            message = _read_message(interactive)
            if message is None:
                return 0
            conversation.append({"role": "user", "content": message})
            reply = _reply(model, tokenizer, drafter, conversation, args.max_new_tokens, options)
            conversation.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:  # Ctrl-C: the conversation ends, nothing else to clean up
        print(file=sys.stderr)
        return 0


def _read_message(interactive: bool) -> str | None:
    """The next non-empty message, or None at an exit word or the end of input."""
    from linspec.errors import LinspecError

    while True:
        try:
            line = input("> " if interactive else "")
            line.encode("utf-8")  # undecodable bytes arrive as lone surrogates, which no tokenizer takes
        except EOFError:
            return None
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise LinspecError("the message is not UTF-8 text") from None
        text = line.strip()
        if text in EXIT_WORDS:
            return None
        if text:
            return line


def _reply(model, tokenizer, drafter, conversation: list[dict], max_new_tokens: int, options: dict) -> str:
    """Stream the model's next turn to stdout and return its text."""
    import torch
    from transformers import TextStreamer

    from linspec.data.prompts import render_chat
    from linspec.speculative.generate import speculative_generate

    ids = render_chat(tokenizer, conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    input_ids = torch.tensor([ids["input_ids"]], device=model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = speculative_generate(
        model, drafter, input_ids, max_new_tokens, eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, streamer=streamer, **options,
    )  # fmt: skip
    new = out.sequences[0, input_ids.shape[1] :][: out.stats.new_tokens]
    return tokenizer.decode(new, skip_special_tokens=True).strip()
