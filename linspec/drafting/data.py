"""Self-distillation data: what the target itself says, and how it looks inside while saying it.

Two kinds of text, both labelled by the target itself:

- **continuations**: prompts built from the shipped corpora (``linspec.data.prompts``), wrapped in the chat template,
  continued greedily by the target; one more forward per text records its final hidden states (after the last
  norm — what ``DraftRequest.target_hidden`` carries). This is exactly the distribution acceptance rewards, but
  generating costs one target step per token.
- **read text** (``data.text_tokens``): windows of plain text the target reads in one parallel forward, each
  position labelled with the token the target would have chosen there. Several times more positions per
  minute on a CPU; the tokens are the text's rather than the target's, so it complements, not replaces, the
  continuations (EAGLE, too, trains on fixed text with the target's features).

A drafter trained on this learns the target's own behaviour, not a dataset's. Cached as safetensors in linspec's
cache (``$LINSPEC_CACHE/drafting``), keyed by the target's fingerprint and the data settings, so a resumed run, a
repeated one and the other drafter kinds for the same target skip it.

Layout: ``tokens [S, T]`` per text (a continuation: the last prompt token then the continuation; -1 past the
end), ``hidden [S, T, H]`` the target's hidden state after each token, ``labels [S, T]`` the target's greedy
choice after each token (-1 where it is not a training label: padding, end of text); ``train_*`` (continuations,
then read text) and ``eval_*`` (continuations of held-out prompts, what acceptance measures).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from linspec.data.settings import DistillData
from linspec.errors import LinspecError
from linspec.utils.io import atomic_write_bytes

PAD = -1
FORMAT = 2  # bump when the cached tensors or the way they are made change
READ_TOKENS = 2048  # tokens per forward when reading text: bounds its [tokens, vocabulary] logits (~400 MB here)


def cache_file(folder: Path, fingerprint: dict, settings: DistillData) -> Path:
    key = json.dumps({"format": FORMAT, "target": fingerprint, "data": asdict(settings)}, sort_keys=True)
    return Path(folder) / f"selfdistill-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def self_distillation_data(target, tokenizer, settings: DistillData, folder: Path, fingerprint: dict) -> dict:
    """``{train,eval}_{tokens,hidden,labels}``, from the cache when present."""
    from safetensors.torch import load_file, save

    from linspec.sources.loading import check_safetensors

    file = cache_file(folder, fingerprint, settings)
    if file.is_file():
        check_safetensors(file)
        return load_file(str(file))
    from linspec.data.prompts import load_prompts

    count = settings.num_prompts + settings.eval_prompts
    prompts = [p.text for p in load_prompts(settings.prompts, count, settings.seed, kinds=settings.prompt_kinds)]
    if len(prompts) < count:
        raise LinspecError(
            f"recipe key data.prompts: {settings.prompts} gives {len(prompts)} prompts; "
            f"num_prompts + eval_prompts need {count}"
        )
    tokens, hidden, labels = continuations(target, tokenizer, prompts, settings.max_new_tokens, settings.batch_size)
    split = settings.num_prompts
    data = {"eval_tokens": tokens[split:], "eval_hidden": hidden[split:], "eval_labels": labels[split:]}
    train = [(tokens[:split], hidden[:split], labels[:split])]
    if settings.text_tokens:
        windows = text_windows(tokenizer, settings.text, settings.text_tokens, settings.text_length, settings.seed)
        train.append(read_text(target, windows, max(1, READ_TOKENS // settings.text_length)))
    width = max(part[0].shape[1] for part in train)
    for index, name in enumerate(("tokens", "hidden", "labels")):
        data[f"train_{name}"] = torch.cat([_pad_to(part[index], width) for part in train])
    atomic_write_bytes(file, save({k: v.contiguous() for k, v in data.items()}))
    return data


def _pad_to(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor [S, T, ...]`` padded along T to ``width`` (ids with PAD, hidden states with zeros)."""
    fill = PAD if tensor.dtype == torch.long else 0
    extra = tensor.new_full((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]), fill)
    return torch.cat([tensor, extra], 1)


def _final_states(target):
    """``(outputs, handle)``: a hook appending the decoder's final-norm output (the hidden state the head reads)
    to ``outputs`` on every forward; remove it with ``handle.remove()``."""
    from linspec.models import hf

    outputs: list[torch.Tensor] = []
    handle = hf.final_norm(target).register_forward_hook(lambda _m, _i, out: outputs.append(out))
    return outputs, handle


@torch.no_grad()
def continuations(target, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """``(tokens [S, 1 + max_new_tokens], hidden [S, 1 + max_new_tokens, H], labels [S, 1 + max_new_tokens])``:
    each prompt's last token and the target's greedy continuation (to EOS or the budget), the target's final
    hidden states after them and its greedy choice after each (none after the end of the text)."""
    from linspec.data.prompts import encode_prompts

    eos = target.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    width = 1 + max_new_tokens
    size = target.get_output_embeddings().weight.shape[1]
    all_tokens = torch.full((len(prompts), width), PAD, dtype=torch.long)
    all_hidden = torch.zeros(len(prompts), width, size)
    all_labels = torch.full((len(prompts), width), PAD, dtype=torch.long)
    norm_output, hook = _final_states(target)
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
                choice = target(text).logits[0, prompt.numel() - 1 :].argmax(-1).cpu()
                segment = text[0, prompt.numel() - 1 :]  # the last prompt token, then the continuation
                index = first + row
                all_tokens[index, : segment.numel()] = segment
                all_hidden[index, : segment.numel()] = norm_output[-1][0, prompt.numel() - 1 :].float().cpu()
                all_labels[index, : segment.numel() - 1] = choice[:-1]  # nothing is trained after the end
                bar.update(1)
    finally:
        hook.remove()
        bar.close()
    return all_tokens, all_hidden, all_labels


def text_windows(tokenizer, source: str, num_tokens: int, length: int, seed: int) -> torch.Tensor:
    """``[ceil(num_tokens / length), length]`` windows of ``source`` (documents joined with EOS), drawn in a
    seeded order from the whole corpus so they are not all from its first articles."""
    from linspec.data.documents import load_documents, pack

    windows = pack(load_documents(source), tokenizer, length)
    wanted = -(-num_tokens // length)
    if wanted > windows.shape[0]:
        raise LinspecError(
            f"recipe key data.text_tokens: {source} gives {windows.shape[0] * length} tokens in windows of "
            f"{length}; {num_tokens} asked for"
        )
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order[:wanted].sort().values]


@torch.no_grad()
def read_text(target, windows: torch.Tensor, batch_size: int):
    """``(tokens, hidden, labels)`` for text ``windows [S, T]`` read by the target in parallel: its final
    hidden state after every token and its greedy choice there (the last position's choice is kept: its
    input token exists, and only inputs are needed to unroll to it)."""
    size = target.get_output_embeddings().weight.shape[1]
    hidden = torch.zeros(*windows.shape, size)
    labels = torch.full_like(windows, PAD)
    norm_output, hook = _final_states(target)
    bar = tqdm(total=windows.numel(), desc="self-distillation text", unit="tok", unit_scale=True, dynamic_ncols=True)
    try:
        for first in range(0, windows.shape[0], batch_size):
            rows = slice(first, first + batch_size)
            norm_output.clear()
            labels[rows] = target(windows[rows]).logits.argmax(-1).cpu()
            hidden[rows] = norm_output[-1].float().cpu()
            bar.update(windows[rows].numel())
    finally:
        hook.remove()
        bar.close()
    return windows.clone(), hidden, labels


def positions(tokens: torch.Tensor) -> torch.Tensor:
    """``[M, 2]`` (text, position) pairs with at least one later token: the training examples."""
    real = tokens >= 0
    has_next = torch.zeros_like(real)
    has_next[:, :-1] = real[:, 1:]
    return has_next.nonzero()


def examples(tokens: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor, at: torch.Tensor, depth: int):
    """``(hidden [N, H], inputs [N, depth], labels [N, depth], future_hidden [N, depth, H])`` at positions
    ``at [N, 2]`` = (text, t): tokens ``t + 1 .. t + depth`` (the root, then the drafts a drafter is fed), the
    target's greedy choices after each (what draft depth ``d`` must propose) and its hidden states there;
    -1 / PAD past the end of the text."""
    text, pos = at[:, 0], at[:, 1]
    index = pos[:, None] + torch.arange(1, depth + 1)  # (N, D)
    inside = index < tokens.shape[1]
    index = index.clamp(max=tokens.shape[1] - 1)
    inputs = torch.where(inside, tokens[text[:, None], index], PAD)
    targets = torch.where(inside & (inputs >= 0), labels[text[:, None], index], PAD)
    return hidden[text, pos], inputs, targets, hidden[text[:, None], index]
