"""Speculative generation on tiny random models: tree verification, commit, exact acceptance, batches, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomize_linspec_parameters, tiny_base

import linspec
from linspec.speculative import (
    Draft,
    DraftTree,
    EarlyExitDrafter,
    FallbackDrafter,
    HeadDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    SamplingConfig,
    merge_chains,
    speculative_generate,
)
from linspec.speculative.acceptance import accept
from linspec.speculative.tree import children_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ("softmax", "linear", "hybrid", "heads")
HYBRIDS = {"hybrid": {"softmax_layers": (1,)}, "heads": {"softmax_heads": ((0, 1), (2, 0))}}


def make_target(kind: str, seed: int = 0, **overrides):
    if kind == "softmax":
        return tiny_base("llama", seed, **overrides)
    settings = linspec.LinspecConfig(group_size=8, conv_taps=4, **HYBRIDS.get(kind, {}))
    model = linspec.convert(tiny_base("llama", seed, **overrides), settings)
    randomize_linspec_parameters(model, seed)  # γ and conv non-zero: the linear path matters
    return model.eval()


def drafters_for(target, kind):
    other = make_target("softmax", seed=5)  # an unrelated model: drafts mostly rejected
    gen = torch.Generator().manual_seed(0)
    heads = torch.nn.Linear(64, 3 * 97).requires_grad_(False)
    torch.nn.init.normal_(heads.weight, generator=gen)
    return {
        "lookup-tree": PromptLookupDrafter(num_tokens=4, num_drafts=3),
        "other-model-chain": ModelDrafter(other, num_tokens=3),
        "self-chain": ModelDrafter(target, num_tokens=4),  # the target itself: every draft accepted
        "self-tree": ModelDrafter(target, num_tokens=3, tree_width=3),
        "early-exit-chain": EarlyExitDrafter(exit_layer=2, num_tokens=3),
        "early-exit-tree": EarlyExitDrafter(exit_layer=1, num_tokens=3, tree_width=2),
        "heads": HeadDrafter(lambda h: heads(h).view(h.shape[0], 3, 97), num_tokens=3, tree_width=2),
    }


def batch_of_prompts():
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 97, (3, 12), generator=gen)
    prompt[2, 6:] = prompt[2, :6]  # a repeat, so prompt lookup finds matches
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    return torch.where(mask.bool(), prompt, 0), mask


@pytest.mark.parametrize("kind", TARGETS)
@torch.no_grad()
def test_greedy_output_equals_plain_greedy_generate(kind):
    """Batched, left-padded, every drafter: the output is token for token the target's own greedy ``generate``
    (which stops rows at the tiny config's EOS, token 2, and pads them)."""
    target = make_target(kind)
    prompt, mask = batch_of_prompts()
    expected = target.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for name, drafter in drafters_for(target, kind).items():
        out = speculative_generate(target, drafter, prompt, 16, attention_mask=mask, eos_token_id=2, pad_token_id=0)
        assert torch.equal(out.sequences[:, : expected.shape[1]], expected), name


@pytest.mark.parametrize("kind", ["linear", "hybrid", "heads"])
@torch.no_grad()
def test_each_batch_row_equals_its_unbatched_output(kind):
    """Rows that accept different numbers of tokens per round still produce exactly their unbatched output."""
    target = make_target(kind)
    prompt, mask = batch_of_prompts()
    drafter = PromptLookupDrafter(num_tokens=5, num_drafts=2)
    batched = speculative_generate(target, drafter, prompt, 30, attention_mask=mask, pad_token_id=0).sequences
    for row in range(3):
        real = prompt[row : row + 1, mask[row].bool()]
        alone = speculative_generate(target, PromptLookupDrafter(num_tokens=5, num_drafts=2), real, 30).sequences
        assert torch.equal(batched[row, -30:], alone[0, -30:])


@torch.no_grad()
def test_eos_ends_a_row_like_generate():
    target = make_target("linear")
    prompt, mask = batch_of_prompts()
    plain = target.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    eos = int(plain[0, 12 + 4])  # row 0's fifth new token
    expected = target.generate(
        prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=eos
    )
    out = speculative_generate(
        target, ModelDrafter(target, 4), prompt, 20, attention_mask=mask, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(out.sequences, expected[:, : out.sequences.shape[1]])
    assert (out.sequences[0, 12 + 5 :] == 0).all()


@torch.no_grad()
def test_statistics_count_accepted_tokens_per_call_and_depth():
    target = make_target("hybrid")
    prompt = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    exact = speculative_generate(target, ModelDrafter(target, num_tokens=3), prompt, 16).stats
    assert exact.target_calls == 4 and exact.tokens_per_call == 4.0  # 3 drafts + the target's token, 4 rounds
    assert exact.acceptance_by_depth == [1.0, 1.0, 1.0] and exact.new_tokens == 32
    plain = speculative_generate(target, None, prompt, 16).stats
    assert plain.target_calls == 16 and plain.tokens_per_call == 1.0 and plain.acceptance_by_depth == []
    assert plain.tokens_per_second > 0


def test_trees_merge_shared_prefixes_and_list_children_in_order():
    tree = merge_chains([[[5, 6, 7], [5, 6, 8], [9]], [[4]]])
    assert tree.tokens[0].tolist() == [5, 6, 7, 8, 9] and tree.parents[0].tolist() == [-1, 0, 1, 1, -1]
    assert tree.valid.tolist() == [[True] * 5, [True] + [False] * 4]
    _, parents, valid = tree.with_root(torch.tensor([1, 2]))
    assert parents[0].tolist() == [-1, 0, 1, 2, 2, 0]
    children = children_table(parents, valid)
    assert (
        children[0, 0].tolist() == [1, 5] and children[0, 2].tolist() == [3, 4] and children[1, 0].tolist() == [1, -1]
    )


def test_prompt_lookup_proposes_what_followed_the_most_recent_match():
    drafter = PromptLookupDrafter(num_tokens=3, max_ngram=2, num_drafts=2)
    sequence = torch.tensor([[1, 2, 3, 9, 9, 1, 2, 4, 5, 7, 1, 2]])
    drafter.start(None, sequence, torch.tensor([12]))
    from linspec.speculative import DraftRequest

    request = DraftRequest(sequence, torch.tensor([12]), 8, SamplingConfig(), None)
    tree = drafter.propose(request).tree
    # "1 2" occurred twice before the end: most recent first (4 5 7), then (3 9 9).
    assert tree.tokens[0].tolist() == [4, 5, 7, 3, 9, 9] and tree.parents[0].tolist() == [-1, 0, 1, -1, 3, 4]


def test_prompt_lookup_uses_one_token_matches_only_once_its_drafts_pay_off():
    from linspec.speculative import DraftRequest

    def propose(drafter, tokens):
        sequence = torch.tensor([tokens])
        return drafter.propose(DraftRequest(sequence, torch.tensor([len(tokens)]), 8, SamplingConfig(), None))

    copying = [5, 6, 7, 5, 6]  # "5 6" recurs: a 2-gram match
    departed = [*copying, 9, 7]  # "9 7" never occurred; "7" did
    fresh = PromptLookupDrafter(num_tokens=3)
    fresh.start(None, torch.tensor([departed]), torch.tensor([7]))
    assert propose(fresh, departed).tree.num_nodes == 0  # no record yet: 2-grams only

    drafter = PromptLookupDrafter(num_tokens=3)
    drafter.start(None, torch.tensor([copying]), torch.tensor([5]))
    tree, state = propose(drafter, copying)
    assert tree.tokens[0].tolist() == [7, 5, 6]
    drafter.advance(state, torch.tensor([[0]]), torch.tensor([[True]]))  # its first token was accepted
    tree, state = propose(drafter, departed)
    assert tree.tokens[0].tolist() == [5, 6, 9]  # now "7" is trusted
    drafter.advance(state, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool))  # rejected
    assert (drafter.drafted_rounds, drafter.first_accepted) == ([2], [1])
    strict = PromptLookupDrafter(num_tokens=3, reliable_min_ngram=None)
    strict.start(None, torch.tensor([copying]), torch.tensor([5]))
    strict.advance(propose(strict, copying).state, torch.tensor([[0]]), torch.tensor([[True]]))
    assert propose(strict, departed).tree.num_nodes == 0


def test_greedy_acceptance_walks_the_argmax_path_and_sampling_accepts_point_masses_by_p():
    vocab = 6
    logits = torch.full((1, 4, vocab), -10.0)
    logits[0, 0, 3] = 10.0  # root -> 3
    logits[0, 2, 1] = 10.0  # node 2 (token 3) -> 1
    logits[0, 3, 5] = 10.0  # node 3 (token 1) -> 5 (the bonus)
    tokens = torch.tensor([[0, 2, 3, 1]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    path, mask, nxt = accept(logits, tokens, parents, valid, None, SamplingConfig())
    assert path[0][mask[0]].tolist() == [0, 2, 3] and nxt.tolist() == [5]
    # p puts no mass on the first child: sampling must reject it (prob p(x) = 0) and test its sibling.
    gen = torch.Generator().manual_seed(0)
    sampled = [accept(logits, tokens, parents, valid, None, SamplingConfig(do_sample=True), gen) for _ in range(50)]
    assert all(p[0][m[0]].tolist() == [0, 2, 3] for p, m, _ in sampled)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs``; categories expected < 5 are pooled."""
    counts, probs = counts.double(), probs.double()
    total = counts.sum()
    expected = probs * total
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    if bool((observed[~keep] > 0).any()):
        return 0.0  # a sample where the distribution has no mass
    observed, expected = observed[keep], expected[keep]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.double), statistic / 2))


def _exact_marginals(model, prompt: torch.Tensor, sampling: SamplingConfig, steps: int) -> list[torch.Tensor]:
    """The target's exact distribution of new token 1, 2, …, ``steps`` under plain sampling with ``sampling``."""
    vocab = model.config.vocab_size
    prefixes = prompt  # (S, T) all continuations so far, with their probabilities
    weights = torch.ones(1, dtype=torch.double)
    marginals = []
    for _ in range(steps):
        probs = sampling.probs(model(prefixes).logits[:, -1]).double()  # (S, V)
        joint = weights[:, None] * probs
        marginals.append(joint.sum(0))
        weights = joint.flatten()
        prefixes = torch.cat(
            [prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(prefixes.shape[0])[:, None]], 1
        )
    return marginals


SAMPLES = 20_000


@pytest.mark.parametrize(
    "drafter_kind, settings",
    [
        ("chain", dict(temperature=1.0)),
        ("tree", dict(temperature=0.8, top_k=12, top_p=0.9)),
        ("lookup-tree", dict(temperature=1.3)),
    ],
)
@torch.no_grad()
def test_sampled_tokens_follow_the_target_distribution(drafter_kind, settings):
    """20k rows sampled speculatively: new tokens 1–3 match the target's exact distribution (chi-square); the same
    test rejects the drafter's own distribution, so it can tell them apart."""
    vocab = 24
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    target = make_target("hybrid", seed=0, **small)  # layer 0 linear, layer 1 softmax
    draft_model = make_target("softmax", seed=7, **small)
    prompt = torch.tensor([[3, 5, 9, 3, 5]])
    sampling = SamplingConfig(do_sample=True, **settings)
    if drafter_kind == "chain":
        drafter = ModelDrafter(draft_model, num_tokens=2)
    elif drafter_kind == "tree":
        drafter = ModelDrafter(draft_model, num_tokens=2, tree_width=3)
    else:
        drafter = PromptLookupDrafter(num_tokens=2, max_ngram=2, num_drafts=3)
    gen = torch.Generator().manual_seed(123)
    out = speculative_generate(
        target, drafter, prompt.expand(SAMPLES, -1), 3, do_sample=True, generator=gen, **settings
    )
    assert out.stats.accepted > 0  # drafts were really accepted, not just resampled
    new = out.sequences[:, -3:]
    exact = _exact_marginals(target, prompt, sampling, 3)
    for position in range(3):
        counts = torch.bincount(new[:, position], minlength=vocab)
        assert _chi_square_p_value(counts, exact[position]) > 1e-4, position
    q_first = sampling.probs(draft_model(prompt).logits[:, -1])[0]
    assert _chi_square_p_value(torch.bincount(new[:, 0], minlength=vocab), q_first) < 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 1"),
        (dict(temperature=-0.5, do_sample=True), "temperature must be >= 0"),
        (dict(top_p=0.0, do_sample=True), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5, do_sample=True), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1, do_sample=True), "top_k must be a non-negative integer"),
        (dict(max_tree_nodes=8), "above the limit of 8"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 0]])), "must be left-padded"),
        (dict(input_ids=torch.tensor([[5, 97, 7]])), r"token id 97 is outside the model's vocabulary \(0..96\)"),
        (dict(input_ids=torch.tensor([[-1, 5]])), "token id -1 is outside"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "non-empty"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), "integer tensor"),
        (dict(max_new_tokens=10**12), r"exceed the model's 256 positions"),
        (dict(temperature=float("inf"), do_sample=True), "temperature must be >= 0 and finite"),
        (dict(eos_token_id=[2, 97]), r"eos_token_id must be token ids in 0..96"),
        (dict(pad_token_id=-1), r"pad_token_id must be token ids in 0..96, got -1"),
        (dict(input_ids=torch.full((1, 250), 5), max_new_tokens=7), r"prompt \(250 tokens\)"),
    ],
)
def test_bad_input_gives_one_clear_error(kwargs, message):
    target = make_target("linear")
    options = {"max_new_tokens": 4, **kwargs}
    prompt = options.pop("input_ids", torch.tensor([[5, 6, 7, 8]]))
    with pytest.raises(linspec.LinspecError, match=message):
        speculative_generate(target, PromptLookupDrafter(num_tokens=4, num_drafts=3), prompt, **options)


@pytest.mark.parametrize("kind", ("lookup", "early-exit", "model", "medusa"))
def test_a_zero_or_negative_draft_depth_is_refused_not_defaulted(kind):
    from linspec.drafting.registry import drafter_spec

    needed = {"early-exit": {"exit_layer": 1}, "model": {"draft_model": "some/model"}, "medusa": {"drafter": "dir"}}
    for bad in (0, -2, True, 2.5):
        with pytest.raises(linspec.LinspecError, match=r"--num-draft-tokens must be an integer in 1\.\.256"):
            drafter_spec(kind, num_draft_tokens=bad, **needed.get(kind, {}))
    for bad in (0, -2, True):  # the drafters themselves, made without the registry, refuse them too
        with pytest.raises(linspec.LinspecError, match="num_tokens must be an integer"):
            PromptLookupDrafter(num_tokens=bad)
        with pytest.raises(linspec.LinspecError, match="exit_layer must be an integer"):
            EarlyExitDrafter(exit_layer=bad)


def attributes_rebound_by_propose(drafter, target, prompt, mask) -> set[str]:
    """Generate with ``drafter`` and return the attributes (its own, and its parts' for a ``FallbackDrafter``) that
    any ``propose`` bound anew: state carried from ``propose`` to ``advance`` on the drafter instead of in the
    returned ``Draft``. In-place growth of what lives across rounds (a lookup row's history) is not rebinding."""
    drafters = [drafter, *(getattr(drafter, part) for part in ("first", "then") if hasattr(drafter, part))]
    rebound: set[str] = set()
    for each in drafters:
        plain_propose = each.propose

        def propose(request, each=each, plain_propose=plain_propose):
            before = {name: id(value) for name, value in vars(each).items()}
            draft = plain_propose(request)
            after = {name: id(value) for name, value in vars(each).items()}
            rebound.update(f"{type(each).__name__}.{name}" for name in after if before.get(name) != after[name])
            return draft

        each.propose = propose
    out = speculative_generate(target, drafter, prompt, 12, attention_mask=mask, pad_token_id=0)
    assert out.stats.target_calls > 1
    return rebound


def test_a_round_keeps_its_state_in_the_draft_not_on_the_drafter():
    target = make_target("hybrid")
    prompt, mask = batch_of_prompts()
    every = {
        **drafters_for(target, "hybrid"),
        "fallback": FallbackDrafter(PromptLookupDrafter(num_tokens=3), EarlyExitDrafter(exit_layer=1, num_tokens=2)),
    }
    for name, drafter in every.items():
        assert attributes_rebound_by_propose(drafter, target, prompt, mask) == set(), name


def test_vocabulary_mismatch_is_refused():
    target = make_target("linear")
    other = tiny_base("llama", 0, vocab_size=50)
    with pytest.raises(
        linspec.LinspecError, match=r"drafter's vocabulary \(50 tokens\) differs from the target's \(97\)"
    ):
        speculative_generate(target, ModelDrafter(other), torch.tensor([[5, 6, 7]]), 4)


def test_a_tree_above_the_limit_is_refused_when_proposed():
    class Wide(PromptLookupDrafter):
        def propose(self, request):
            chains = [[[t] for t in range(3, 40)] for _ in range(request.lengths.shape[0])]
            return Draft(merge_chains(chains))

    with pytest.raises(linspec.LinspecError, match="proposed 37 tokens, above max_tree_nodes=16"):
        speculative_generate(make_target("softmax"), Wide(num_tokens=2), torch.tensor([[5, 6]]), 4, max_tree_nodes=16)


def test_empty_tree_helpers():
    tree = DraftTree.empty(2)
    assert tree.num_nodes == 0 and tree.depths().shape == (2, 0)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6])
def test_a_tiny_temperature_samples_the_most_likely_token_not_nan(temperature):
    """Dividing raw logits by 1e-40 overflowed every score to inf (NaN probabilities, torch's sampler refused);
    the limit of a vanishing temperature is the argmax, ties shared."""
    logits = torch.tensor([[2.0, 7.5, -1.0, 7.5, 0.0], [3.0, -2.0, 1.0, 0.5, 2.9]])
    probs = SamplingConfig(do_sample=True, temperature=temperature, top_k=4, top_p=0.9).probs(logits)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.tensor([[0, 0.5, 0, 0.5, 0], [1.0, 0, 0, 0, 0]]))
    usual = SamplingConfig(do_sample=True, temperature=0.7).probs(logits)
    torch.testing.assert_close(usual, torch.softmax(logits / 0.7, dim=-1))  # the shift changes nothing else
