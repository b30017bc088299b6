"""Perplexity over scoring windows, and the variants of a model it measures: component ablations (how much γ, the
global path, the conv and the window's far memory contribute) and layers restored to softmax (what keeping them
softmax would give).

Windows of up to ``window`` tokens advance by ``stride`` scored tokens; a window scores only tokens no earlier
window scored, each with up to ``window − 1`` tokens of context (stride == window: consecutive windows share
one token, so no token goes unscored). The reported perplexity is exp(total NLL / scored tokens).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linspec.errors import LinspecError
from linspec.utils.validation import MAX_LENGTH, check_count

# The variants ``--ablations`` runs. ``far_memory`` is the softmax window's far memory (``memory_feature_map``): off,
# the window reads no memory column (a model without one is unchanged by it), and no sparse cache either (both
# join the softmax as one column). ``memory_readout`` keeps the sparse cache as the memory chooses it and drops only
# the memory's own share: the memory's two roles, choosing the exact tokens and summarising the rest, measured apart.
ABLATIONS = {
    "full": (),
    "no-gamma": ("gamma",),
    "no-conv": ("conv",),
    "local-only": ("gamma", "conv", "far_memory"),
}
# Variants only ``--ablate`` asks for, by the name results show.
NAMED_VARIANTS = {**ABLATIONS, "no-far-memory": ("far_memory",), "no-memory-readout": ("memory_readout",)}
# What ``local-only`` is called on a model whose local term is a softmax window: the same window and sinks with
# every memory and the conv off — the baseline every long-context curve of such a model is read against.
WINDOW_ONLY = "window-only"
FAR_MEMORY = "far-memory"
MEMORY_READOUT = "memory-readout"
# What the memory-readout ablation subtracts from each head's memory bias ``b_h``: ``e^{b_h}`` then underflows to
# exactly 0 in float32 and float64, so the column's memory part weighs nothing, while the cache's choice (the
# self-recall error, which does not read ``b_h``) is unchanged. A finite shift rather than −∞, which would turn
# an empty cache's share of the column into 0/0.
READOUT_OFF_SHIFT = 1e4


def _linear_settings(model):
    """The ``LinspecConfig`` of a linspec model that has linear layers, else None."""
    settings = getattr(model.config, "linspec_settings", None)
    return settings if settings is not None and getattr(model, "linspec_modules", list)() else None


def has_softmax_window(model) -> bool:
    """Whether ``model`` is a linspec model whose linear layers attend through a softmax window (and sinks)."""
    settings = _linear_settings(model)
    return settings is not None and settings.softmax_window


def has_grouped_term(model) -> bool:
    """Whether ``model`` is a linspec model whose linear layers keep the grouped term (γ and the conv)."""
    settings = _linear_settings(model)
    return settings is not None and settings.grouped_term


def ablation_variants(model) -> list[tuple[str, ...]]:
    """What ``--ablations`` runs: ``ABLATIONS``, or for a model without the grouped term the full model and the
    window alone (it has no γ or conv to take away)."""
    if has_grouped_term(model) or not has_softmax_window(model):
        return list(ABLATIONS.values())
    return [ABLATIONS["full"], ABLATIONS["local-only"]]


def has_far_memory(model) -> bool:
    """Whether ``model`` is a linspec model whose softmax window keeps a far memory (``memory_feature_map``)."""
    settings = _linear_settings(model)
    return settings is not None and settings.softmax_window and settings.far_memory


# ``--ablate`` choices: what each turns off (``both``: the memories and the conv, as ``window-only``).
ABLATE_CHOICES = {
    "gamma": ("gamma",),
    "conv": ("conv",),
    FAR_MEMORY: ("far_memory",),
    MEMORY_READOUT: ("memory_readout",),
    "both": ABLATIONS["local-only"],
    WINDOW_ONLY: ABLATIONS["local-only"],
}


def ablation_components(choice: str, model) -> tuple[str, ...]:
    """The components an ``--ablate`` choice turns off; ``window-only`` only on a model that has a softmax window."""
    if choice not in ABLATE_CHOICES:
        raise LinspecError(f"unknown ablation {choice!r:.40}; choose one of {', '.join(ABLATE_CHOICES)}")
    if choice == WINDOW_ONLY and not has_softmax_window(model):
        raise LinspecError(
            "window-only needs a linspec model with a softmax window (local_kernel softmax); "
            "--ablate both turns off the memory and the conv of any linspec model"
        )
    if set(ABLATE_CHOICES[choice]) <= {"gamma", "conv"} and has_softmax_window(model) and not has_grouped_term(model):
        raise LinspecError(
            f"{choice} needs the grouped term (γ and the conv); this model has none (grouped_term false): "
            "try far-memory, memory-readout or window-only"
        )
    if choice in (FAR_MEMORY, MEMORY_READOUT) and not has_far_memory(model):
        raise LinspecError(f"{choice} needs a linspec model whose window keeps a far memory (memory_feature_map)")
    return ABLATE_CHOICES[choice]


def variant_name(model, components: tuple[str, ...]) -> str:
    """The ``NAMED_VARIANTS`` name of ``components``, with ``local-only`` called ``window-only`` on a windowed
    model."""
    name = next(key for key, value in NAMED_VARIANTS.items() if set(value) == set(components))
    return WINDOW_ONLY if name == "local-only" and has_softmax_window(model) else name


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def scoring_windows(ids: torch.Tensor, window: int, stride: int) -> Iterator[tuple[torch.Tensor, int]]:
    """``(window ids, skip)`` over a 1-D id tensor: the window's positions ``skip..`` are scored, each predicted
    from the tokens before it in the window. Every token but the first is scored exactly once; a window scores at
    most ``min(stride, window − 1)`` new tokens, so each has at least one token of context."""
    if window < 2 or not 0 < stride <= window:
        raise LinspecError(f"need window >= 2 and 0 < stride <= window; got window {window}, stride {stride}")
    step = min(stride, window - 1)
    scored_until = 1  # the first token has nothing to be predicted from
    while scored_until < len(ids):
        end = min(scored_until + step, len(ids)) if scored_until > 1 else min(window, len(ids))
        begin = max(0, end - window)
        yield ids[begin:end], scored_until - begin
        scored_until = end


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]``: the NLL of every next-token prediction of ``input_ids [B, L]`` in one forward."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor, skip: int = 0) -> tuple[float, int]:
    """``(sum of NLL, count)`` over next-token predictions of ``input_ids [B, L]``, ignoring the first ``skip``."""
    nll = token_nll(model, input_ids)[:, max(skip - 1, 0) :]
    return float(nll.sum()), nll.numel()


def prefill_chunks(model, ids: torch.Tensor, cache, chunk: int = 512) -> Iterator[torch.Tensor]:
    """Feed a 1-D id tensor through ``cache`` ``chunk`` tokens at a time, yielding each chunk's logits ``[c, V]``.

    Memory stays bounded by the chunk, not the text: a linspec cache is constant in context length and a softmax
    model's KV cache grows linearly, while the attention scores and logits never exceed one chunk's rows."""
    from linspec.models import hf

    check_count(chunk, "chunk", 1, MAX_LENGTH)
    device = next(model.parameters()).device
    for piece in ids.split(chunk):
        out = model(input_ids=piece[None].to(device), use_cache=True, **hf.cache_kwargs(cache))
        yield out.logits[0].float()  # (c, V)


@torch.no_grad()
def next_token_scores(model, ids: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(ids[t] | ids[:t]), ids[t] is the argmax)`` for t = 1..L−1 of a 1-D id tensor, scored chunk-wise
    through the model's own cache (see :func:`prefill_chunks`), so an 8k-token window fits on a CPU.

    Equal to one full forward (a test checks it): the cache is the model's decoding path, exact by DESIGN §3."""
    from linspec.models.cache import new_cache_for

    cache = new_cache_for(model)
    logprobs, hits = [], []
    previous = None  # the last row of the previous chunk predicts this chunk's first token
    for start, logits in zip(range(0, len(ids), chunk), prefill_chunks(model, ids, cache, chunk), strict=True):
        rows = logits if previous is None else torch.cat([previous, logits])  # predictions of ids[start(+1)..]
        targets = ids[max(start, 1) : start + len(logits)].to(rows.device)
        rows = rows[: len(targets)]
        logprobs.append(torch.log_softmax(rows, -1).gather(-1, targets[:, None])[:, 0])
        hits.append(rows.argmax(-1) == targets)
        previous = logits[-1:]
    return torch.cat(logprobs).cpu(), torch.cat(hits).cpu()


def perplexity_of_sequences(model, sequences: torch.Tensor, batch_size: int = 4, progress: bool = False) -> Perplexity:
    """Perplexity over packed, independent sequences ``[N, L]`` (each scored from its second token)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total, count, start = 0.0, 0, time.perf_counter()
    for batch in tqdm(sequences.split(batch_size), desc="perplexity", disable=not progress, leave=False):
        nll, n = sequence_nll(model, batch.to(device))
        total, count = total + nll, count + n
    return _result(total, count, time.perf_counter() - start)


def perplexity_of_ids(model, ids: torch.Tensor, window: int = 256, stride: int | None = None, progress: bool = True):
    """Sliding-window perplexity of one long 1-D id tensor."""
    from tqdm.auto import tqdm

    stride = stride or window
    device = next(model.parameters()).device
    total, count, start = 0.0, 0, time.perf_counter()
    windows = list(scoring_windows(ids, window, stride))
    bar = tqdm(windows, desc="perplexity", unit="win", disable=not progress)
    for chunk, skip in bar:
        nll, n = sequence_nll(model, chunk[None].to(device), skip)
        total, count = total + nll, count + n
        bar.set_postfix(
            ppl=f"{math.exp(total / max(count, 1)):.2f}", tok_s=f"{count / (time.perf_counter() - start):.0f}"
        )
    return _result(total, count, time.perf_counter() - start)


def _result(total: float, count: int, seconds: float) -> Perplexity:
    if count == 0:
        raise LinspecError("no tokens to score: the text is shorter than two tokens")
    return Perplexity(ppl=math.exp(total / count), nll=total / count, tokens=count, seconds=seconds)


@contextlib.contextmanager
def ablated(model, components: tuple[str, ...]) -> Iterator[None]:
    """Temporarily zero γ (``gamma``) and/or the conv (``conv``) and/or stop the window reading its far memory
    (``far_memory``: the memory and the sparse cache) or only the memory's share of that column
    (``memory_readout``: the cache stays as the memory chooses it) in every linear layer; restored on exit. A
    layer without a grouped term has no γ or conv to zero (``ablation_components`` refuses to ask for them)."""
    modules = model.linspec_modules() if hasattr(model, "linspec_modules") else []
    if components and not modules:
        raise LinspecError("ablations need a linspec model (this one has no linear attention layers)")
    grouped = [m for m in modules if getattr(m, "global_scale", None) is not None]
    saved = [(_copy(m, "global_scale"), _copy(m, "conv_weight"), m.far_memory_on, _memory_bias(m)) for m in modules]
    try:
        with torch.no_grad():
            for module in grouped:
                if "gamma" in components:
                    module.global_scale.zero_()
                if "conv" in components:
                    module.conv_weight.zero_()
            for module in modules:
                if "far_memory" in components:
                    module.far_memory_on = False
                if "memory_readout" in components and getattr(module, "memory_bias", None) is not None:
                    module.memory_bias.sub_(READOUT_OFF_SHIFT)
        yield
    finally:
        with torch.no_grad():
            for module, (gamma, conv, far_memory_on, bias) in zip(modules, saved, strict=True):
                if gamma is not None:
                    module.global_scale.copy_(gamma)
                    module.conv_weight.copy_(conv)
                module.far_memory_on = far_memory_on
                if bias is not None:
                    module.memory_bias.copy_(bias)


def _copy(module, name: str) -> torch.Tensor | None:
    """A copy of a layer's parameter ``name``, or None for a layer without it (no grouped term)."""
    parameter = getattr(module, name, None)
    return None if parameter is None else parameter.detach().clone()


def _memory_bias(module) -> torch.Tensor | None:
    """A copy of a layer's far-memory bias ``b_h``, or None for a layer without a far memory."""
    bias = getattr(module, "memory_bias", None)
    return None if bias is None else bias.detach().clone()


@contextlib.contextmanager
def softmax_restored(model, layers: Iterator[int] | list[int]) -> Iterator[None]:
    """Temporarily run the listed decoder layers (0-based) as softmax attention with their current q/k/v/o.

    That is what keeping them softmax in a hybrid conversion would give, measured without converting again:
    the basis of ``linspec.conversion.softmax_layers.rank_layers``. Only for full-sequence scoring
    (``use_cache=False``)."""
    from linspec.models.softmax_parent import softmax_output_of_call

    wanted = set(layers)
    modules = [m for m in getattr(model, "linspec_modules", list)() if m.layer_idx in wanted]
    missing = wanted - {m.layer_idx for m in modules}
    if missing:
        raise LinspecError(f"layers {sorted(missing)} are not linear-attention layers of this model")

    def hook(module, args, kwargs, output):
        return (softmax_output_of_call(module, args, kwargs).to(output[0].dtype), *output[1:])

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def read_text_ids(tokenizer, path: str, text_field: str = "text") -> torch.Tensor:
    """Token ids of a .txt file, or of the documents of a .jsonl/.parquet file joined with EOS."""
    from linspec.data.documents import load_documents

    documents = load_documents(path, text_field)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(list(documents["text"]), add_special_tokens=False)["input_ids"]:
        ids.extend([*row, eos] if eos is not None else row)
    return torch.tensor(ids, dtype=torch.long)
