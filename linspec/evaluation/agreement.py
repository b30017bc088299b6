"""Does the converted model still answer like the original? Greedy answers of both on the same prompts.

Perplexity says how well a model predicts text; it does not say whether a chat model's answers survived the
conversion. Here both models answer the same held-out instruction prompts (``linspec.data.prompts``) greedily and
the converted model's tokens are compared with the original's, position by position until they first differ,
with the repetition measures of both (``linspec.evaluation.repetition``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from linspec.data.prompts import Prompt
from linspec.evaluation.repetition import Repetition
from linspec.utils.validation import MAX_NEW_TOKENS, check_count


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading positions where ``a`` and ``b`` agree."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


@dataclass
class Agreement:
    prefix_agreement: float  # mean over prompts of (common prefix / reference answer length)
    exact_match: float  # share of prompts whose answers are identical
    first_divergence: float  # mean position of the first differing token
    model: Repetition
    reference: Repetition

    @classmethod
    def of(cls, answers: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> Agreement:
        if len(answers) != len(references) or not answers:
            raise ValueError("need one answer per reference answer, and at least one")
        prefixes = [common_prefix(a, r) for a, r in zip(answers, references, strict=True)]
        count = len(answers)
        return cls(
            prefix_agreement=sum(p / max(len(r), 1) for p, r in zip(prefixes, references, strict=True)) / count,
            exact_match=sum(list(a) == list(r) for a, r in zip(answers, references, strict=True)) / count,
            first_divergence=sum(prefixes) / count,
            model=Repetition.of(answers),
            reference=Repetition.of(references),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def greedy_answers(
    model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int = 64, progress: bool = True, label: str = ""
) -> list[list[int]]:
    """Each prompt's greedy answer tokens (chat template when the tokenizer has one), EOS excluded."""
    from tqdm.auto import tqdm

    from linspec.data.prompts import encode_prompt
    from linspec.evaluation.greedy import greedy_generate, stop_ids
    from linspec.evaluation.lengths import check_within_positions

    check_count(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    stop = stop_ids(tokenizer, model)
    encoded = [encode_prompt(tokenizer, prompt.text) for prompt in prompts]
    if encoded:  # an answer must fit the model's positions (past them it is not the model's answer)
        longest = max(len(ids) for ids in encoded)
        what = f"a prompt of {longest} tokens plus --max-new-tokens {max_new_tokens}"
        check_within_positions(model, longest + max_new_tokens, what)
    answers = []
    for ids in tqdm(encoded, desc=f"answers {label}".strip(), disable=not progress):
        tokens = greedy_generate(model, ids, max_new_tokens, stop)
        answers.append(tokens[:-1] if tokens and tokens[-1] in stop else tokens)
    return answers
