"""Self-distillation data: what the target itself says, and how it looks inside while saying it.

Prompts are built from the shipped corpora (``linspec.prompts``) and wrapped in the chat template; the target
continues each greedily; one more forward per text records its final hidden states (after the last norm — what
``DraftRequest.target_hidden`` carries). A drafter trained on this learns the target's own behaviour, not a
dataset's, which is what acceptance rewards. Cached as safetensors in linspec's cache (``$LINSPEC_CACHE/drafting``),
keyed by the target's fingerprint and the data settings, so a resumed run, a repeated one and the other drafter
kinds for the same target skip it.

Layout: ``tokens [S, T]`` per text the last prompt token then the continuation (-1 past the end), ``hidden
[S, T, H]`` the target's hidden state after each of those tokens; ``train_*`` and ``eval_*`` (held-out prompts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from linspec.drafting.recipe import DistillData
from linspec.errors import LinspecError
from linspec.io import atomic_write_bytes

PAD = -1


def cache_file(folder: Path, fingerprint: dict, settings: DistillData) -> Path:
    key = json.dumps({"target": fingerprint, "data": asdict(settings)}, sort_keys=True)
    return Path(folder) / f"selfdistill-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def self_distillation_data(target, tokenizer, settings: DistillData, folder: Path, fingerprint: dict) -> dict:
    """``{train_tokens, train_hidden, eval_tokens, eval_hidden}``, from the cache when present."""
    from safetensors.torch import load_file, save

    from linspec.sources import check_safetensors

    file = cache_file(folder, fingerprint, settings)
    if file.is_file():
        check_safetensors(file)
        return load_file(str(file))
    from linspec.prompts import load_prompts

    count = settings.num_prompts + settings.eval_prompts
    prompts = [p.text for p in load_prompts(settings.prompts, count, settings.seed)]
    if len(prompts) < count:
        raise LinspecError(
            f"recipe key data.prompts: {settings.prompts} gives {len(prompts)} prompts; "
            f"num_prompts + eval_prompts need {count}"
        )
    tokens, hidden = continuations(target, tokenizer, prompts, settings.max_new_tokens, settings.batch_size)
    split = settings.num_prompts
    data = {"train_tokens": tokens[:split], "train_hidden": hidden[:split],
            "eval_tokens": tokens[split:], "eval_hidden": hidden[split:]}  # fmt: skip
    atomic_write_bytes(file, save({k: v.contiguous() for k, v in data.items()}))
    return data


@torch.no_grad()
def continuations(target, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """``(tokens [S, 1 + max_new_tokens], hidden [S, 1 + max_new_tokens, H])``: each prompt's last token and
    the target's greedy continuation (to EOS or the budget), and the target's final hidden states after them."""
    from linspec.speculative.generate import encode_prompts

    eos = target.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    width = 1 + max_new_tokens
    size = target.get_output_embeddings().weight.shape[1]
    all_tokens = torch.full((len(prompts), width), PAD, dtype=torch.long)
    all_hidden = torch.zeros(len(prompts), width, size)
    norm_output: list[torch.Tensor] = []
    hook = target.get_decoder().norm.register_forward_hook(lambda _m, _i, out: norm_output.append(out))
    bar = tqdm(total=len(prompts), desc="self-distillation data", unit="prompt", dynamic_ncols=True)
    try:
        for first in range(0, len(prompts), batch_size):
            input_ids, mask = encode_prompts(tokenizer, prompts[first : first + batch_size])
            out = target.generate(
                input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=list(eos) or None,
            )  # fmt: skip
            for row in range(input_ids.shape[0]):
                new = out[row, input_ids.shape[1] :].tolist()
                stop = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
                prompt = input_ids[row, mask[row].bool()]
                text = torch.cat([prompt, torch.tensor(new[:stop], dtype=torch.long)])[None]  # (1, P + n)
                norm_output.clear()
                target(text)
                segment = text[0, prompt.numel() - 1 :]  # the last prompt token, then the continuation
                index = first + row
                all_tokens[index, : segment.numel()] = segment
                all_hidden[index, : segment.numel()] = norm_output[-1][0, prompt.numel() - 1 :].float().cpu()
                bar.update(1)
    finally:
        hook.remove()
        bar.close()
    return all_tokens, all_hidden


def positions(tokens: torch.Tensor) -> torch.Tensor:
    """``[M, 2]`` (text, position) pairs with at least one later token: the training examples."""
    real = tokens >= 0
    has_next = torch.zeros_like(real)
    has_next[:, :-1] = real[:, 1:]
    return has_next.nonzero()


def examples(tokens: torch.Tensor, hidden: torch.Tensor, at: torch.Tensor, depth: int):
    """``(hidden [N, H], future [N, depth + 1], future_hidden [N, depth, H])`` at positions ``at [N, 2]``."""
    text, pos = at[:, 0], at[:, 1]
    offsets = torch.arange(1, depth + 2)
    index = pos[:, None] + offsets  # (N, D + 1)
    inside = index < tokens.shape[1]
    future = torch.where(inside, tokens[text[:, None], index.clamp(max=tokens.shape[1] - 1)], PAD)
    hidden_index = index[:, :depth].clamp(max=tokens.shape[1] - 1)
    return hidden[text, pos], future, hidden[text[:, None], hidden_index]
