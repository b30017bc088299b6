"""What the plugin's parity tests share: real prompts of chosen lengths, linspec's own greedy tokens for them and
the served model's greedy tokens for them from vLLM's offline engine (in this process)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linspec  # noqa: F401  (registers linspec's configs and classes with transformers' Auto classes)

NEW_TOKENS = 16
# Prompt lengths in tokens: short ones, around the 512-token window, and well past it.
LENGTHS = (3, 41, 130, 333, 511, 600, 800, 1100)
EOS = 2


def prompts(model_dir: Path, lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    """Real text (linspec's own documentation), cut at different offsets and lengths, as token ids."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "\n\n".join(path.read_text() for path in sorted(docs.glob("*.md")))
    ids = tokenizer(text).input_ids
    assert len(ids) > 4 * max(lengths), "not enough documentation text for the prompts"
    return [ids[97 * i : 97 * i + length] for i, length in enumerate(lengths)]


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def linspec_greedy(model_dir: Path, batch: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """linspec's greedy generation (its model class and its own cache), one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in batch:
        with torch.no_grad():
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        out.append(until_eos(tokens[0, len(ids) :].tolist()))
    return out


def engine(model_dir: Path, chunked: bool, max_num_seqs: int, **options):
    """vLLM's offline engine on ``model_dir`` in float32; ``chunked``: prefills cut into 128-token pieces, mixed
    with other requests' decodes in one batch."""
    from vllm import LLM

    from linspec.serving.registration import register

    register()
    return LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=128 if chunked else 2048,
        max_num_seqs=max_num_seqs,
        **options,
    )


def served_greedy(llm, batch: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of every prompt of ``batch``, all submitted at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params)
    assert [len(o.prompt_token_ids) for o in outputs] == [len(ids) for ids in batch]
    return [until_eos(list(o.outputs[0].token_ids)) for o in outputs]
