"""``linspec serve MODEL [flags] [-- VLLM_FLAGS]``: vLLM's OpenAI-compatible server on a linspec model directory."""

from __future__ import annotations

import argparse

from linspec.serving.launch import DEFAULT_CPU_STATE_GIB, VLLM_MINOR
from linspec.utils.validation import count_arg, text_arg

MAX_PORT = 65535
MAX_CONCURRENCY = 1 << 16


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        usage="linspec serve MODEL [--host HOST] [--port PORT] [--max-concurrency N] [--dtype DTYPE] "
        "[--device DEVICE] [--name NAME] [-- VLLM_FLAGS ...]",
        description="Serve a linspec model directory with vLLM's OpenAI-compatible server (/v1/completions, "
        "/v1/chat/completions, streaming, continuous batching), through linspec's vLLM plugin: each request's "
        f"linear-attention state is a constant-size page vLLM keeps per request. Needs vLLM {VLLM_MINOR} in this "
        "environment: pip install 'linspec[vllm]' (the CPU build) or pip install 'vllm==0.32.*' (CUDA). The server "
        "replaces this process and runs until stopped (Ctrl-C). On the CPU build VLLM_CPU_KVCACHE_SPACE (GiB of "
        f"state pages) defaults to {DEFAULT_CPU_STATE_GIB} when unset. Every flag after -- goes to vLLM as is "
        "(e.g. --max-model-len, --max-num-batched-tokens, --api-key); docs/serving.md lists what is supported.",
        epilog="example: linspec convert smollm2-135m out/smollm2-linear && linspec serve out/smollm2-linear "
        "--port 8000 --max-concurrency 16 -- --max-model-len 8192",
    )
    parser.add_argument("model", help="a linspec model directory (written by linspec convert or linspec train)")
    parser.add_argument(
        "--host", default="127.0.0.1", type=text_arg, help="address to listen on (default 127.0.0.1: this machine "
        "only; 0.0.0.0 accepts other machines)"
    )  # fmt: skip
    parser.add_argument("--port", type=count_arg(1, MAX_PORT), default=8000, help="port (default 8000)")
    parser.add_argument(
        "--max-concurrency", type=count_arg(1, MAX_CONCURRENCY), metavar="N",
        help="requests decoded together at most (vLLM's --max-num-seqs; default: vLLM's)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default="auto", help="auto (default: float32 on vLLM's CPU build, vLLM's choice on CUDA: bfloat16 "
        "where supported), float32, bfloat16, float16"
    )  # fmt: skip
    parser.add_argument(
        "--device", default="auto", help="auto (default: the installed vLLM build's device), cpu (vLLM's CPU "
        "build), cuda, cuda:N (vLLM's CUDA build)"
    )  # fmt: skip
    parser.add_argument("--name", type=text_arg, help="the model name clients send (default: the directory's name)")
    parser.set_defaults(func=run, vllm_args=[])
    _take_words_after_double_dash(parser)


def _take_words_after_double_dash(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` keep every word after the first ``--`` as ``vllm_args``, untouched.

    argparse cannot do it for a sub-command: a ``*`` positional is filled (empty) at the first positional it
    meets, so words after ``--`` are then "unrecognized", and ``REMAINDER`` would swallow linspec's own flags
    after MODEL. The parent parser hands the sub-command its words with the ``--`` still in them; this parser
    cuts there before parsing the rest."""
    parse_known_args = parser.parse_known_args

    def parse_with_pass_through(args=None, namespace=None):
        words = list(args or [])
        cut = words.index("--") if "--" in words else len(words)
        namespace, extras = parse_known_args(words[:cut], namespace)
        if extras:  # most likely a vLLM flag given before --
            parser.error(f"unrecognized arguments: {' '.join(extras)}; vLLM's own flags go after --")
        namespace.vllm_args = words[cut + 1 :]
        return namespace, extras

    parser.parse_known_args = parse_with_pass_through


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from linspec.serving.launch import ServerOptions, prepare_server

    options = ServerOptions(
        host=args.host, port=args.port, max_concurrency=args.max_concurrency, dtype=args.dtype, device=args.device,
        name=args.name, vllm_args=tuple(args.vllm_args),
    )  # fmt: skip
    command, env, install = prepare_server(args.model, options, sys.executable, os.environ)
    print(
        f"linspec serve: starting vLLM's OpenAI-compatible server ({install.distribution} {install.version}) for "
        f"{args.model} at http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os.execve(sys.executable, command, env)
    return 0  # not reached: the server has replaced this process
