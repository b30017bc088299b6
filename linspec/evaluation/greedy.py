"""Plain greedy decoding with a chunked prefill: what every evaluation (passkey, agreement, harness) and the demo
decode with (their prompts encoded by ``linspec.data.prompts.encode_prompt``).

``model.generate`` prefills the whole prompt in one forward, whose attention scores and logits grow with the
prompt; evaluations at 8k tokens on a CPU need the prefill in chunks through the cache (see
``linspec.evaluation.perplexity.prefill_chunks``). Tested token-for-token equal to ``generate(do_sample=False)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from linspec.errors import LinspecError
from linspec.utils.validation import MAX_LENGTH, MAX_NEW_TOKENS, check_count


def stop_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's generation-config EOS (chat end)."""
    ids: set[int] = set()
    for source in (tokenizer, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return ids


@torch.no_grad()
def greedy_generate(
    model,
    prompt_ids: Iterable[int] | torch.Tensor,
    max_new_tokens: int,
    stop: Iterable[int] = (),
    chunk: int = 512,
    should_stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """The greedy continuation of one prompt: at most ``max_new_tokens`` tokens, ending after a ``stop`` id or
    as soon as ``should_stop(tokens so far)`` is true (the harness stops on strings this way)."""
    from linspec.evaluation.perplexity import prefill_chunks
    from linspec.models import hf
    from linspec.models.cache import new_cache_for

    ids = torch.as_tensor(list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids, dtype=torch.long)
    if ids.ndim != 1 or len(ids) == 0:
        raise LinspecError("greedy_generate needs a non-empty 1-D prompt")
    check_count(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    check_count(chunk, "chunk", 1, MAX_LENGTH)
    model.eval()
    device = next(model.parameters()).device
    cache = new_cache_for(model)
    for logits in prefill_chunks(model, ids, cache, chunk):
        last = logits[-1]
    stop, answer = set(stop), []
    while True:
        token = int(last.argmax())
        answer.append(token)
        if token in stop or len(answer) == max_new_tokens or (should_stop is not None and should_stop(answer)):
            return answer
        step = torch.tensor([[token]], device=device)
        last = model(input_ids=step, use_cache=True, **hf.cache_kwargs(cache)).logits[0, -1].float()
