"""The contact surface with transformers, pinned for every supported architecture.

Everything linspec takes from transformers internals goes through ``linspec.models.hf``; these tests exercise each
contact end to end — the cache keyword in and out of forwards, ``generate()``'s cache hook, decoder layers driven
by ``ModelRunner`` for tree verification and commit, rotary embeddings, masks (sliding windows included), the
softmax KV tensors — so a transformers release that moves one of them fails here, by name. ``.ci/run`` also runs
this module against the newest transformers the declared range admits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny_models import BASES, decode_one_by_one, randomize_linspec_parameters, tiny_base

import linspec
from linspec.models import hf
from linspec.models.runner import ModelRunner
from linspec.speculative import EarlyExitDrafter, PromptLookupDrafter, speculative_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = sorted(BASES)
KINDS = ("softmax", "linear", "hybrid", "heads")
# "heads": layer 1 softmax and one kv head of each linear layer kept softmax (both kinds of growing KV at once)
HYBRIDS = {"hybrid": {"softmax_layers": (1,)}, "heads": {"softmax_layers": (1,), "softmax_heads": ((0, 1), (2, 0))}}


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_model(arch: str, kind: str, seed: int = 0, **overrides):
    if kind == "softmax":
        return tiny_base(arch, seed, **overrides)
    settings = linspec.LinspecConfig(group_size=8, conv_taps=4, **HYBRIDS.get(kind, {}))
    model = linspec.convert(tiny_base(arch, seed, **overrides), settings)
    randomize_linspec_parameters(model, seed)  # γ and conv non-zero: the linear path matters
    return model.eval()


def test_the_cache_keyword_is_the_one_this_release_uses():
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert ("cache" if (major, minor) >= (5, 24) else "past_key_values") == hf.CACHE_KEYWORD
    assert f"{major}.{minor}" in hf.TESTED_TRANSFORMERS, "a transformers release the suite was never declared for"


@pytest.mark.parametrize("kind", ("linear", "hybrid", "heads"))
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_plus_decode_equals_full_forward(arch, kind):
    """Chunked (no cache), extend (prefill on the cache) and recurrent (decode) agree at the model level, with the
    cache passed under this release's keyword; the cache counts every column."""
    model = make_model(arch, kind).double()
    ids = random_ids(2, 29)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        pieces = [model(ids[:, :11], **hf.cache_kwargs(cache)).logits]
        pieces += [model(ids[:, t : t + 1], **hf.cache_kwargs(cache)).logits for t in range(11, 20)]
        pieces.append(model(ids[:, 20:], **hf.cache_kwargs(cache)).logits)  # a multi-token continuation
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-10
    assert cache.get_seq_length() == 29


@pytest.mark.parametrize("keyword", ("cache", "past_key_values"))
def test_a_linspec_forward_takes_the_cache_under_either_name_without_warning(keyword):
    """Callers written for either transformers release work: the cache they pass is the one that advances."""
    model = make_model("llama", "linear").double()
    ids = random_ids(1, 12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = model.new_cache()
        model(ids[:, :7], **{keyword: cache})
        last = model(ids[:, 7:], **{keyword: cache}).logits
        full = model(ids, use_cache=False).logits
    assert cache.get_seq_length() == 12
    assert (last - full[:, 7:]).abs().max().item() < 1e-10


@pytest.mark.parametrize("kind", ("linear", "hybrid", "heads"))
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_decodes_with_the_linspec_cache_holding_the_context(arch, kind):
    """``generate()`` builds a ``LinspecCache`` through the cache hook, returns it, and its greedy tokens equal
    re-running the full sequence without any cache at every step (so the cache really held the context)."""
    model = make_model(arch, kind).double()
    ids = random_ids(1, 13, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning raised through linspec's own calls
        out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = hf.output_cache(out)
    assert isinstance(cache, linspec.LinspecCache) and cache.get_seq_length() == 13 + 7
    sequence = ids
    with torch.no_grad():
        for _ in range(8):
            token = model(sequence, use_cache=False).logits[:, -1:].argmax(-1)
            sequence = torch.cat([sequence, token], 1)
    assert out.sequences.tolist() == sequence.tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_tree_logits_and_commit_equal_one_by_one_decoding(arch, kind):
    """Every node's logits equal decoding its root→node path token by token; after committing a path, the state
    equals the state after decoding those tokens one by one, and the next tree sees exactly that context.

    Two rows with different prompt lengths (13 and 10 real tokens, left padding) put the tree across a group
    boundary (G = 8) at different depths and make the rows commit paths of different lengths.
    """
    parents_list = [-1, 0, 0, 1, 3, 4, 2, 5, 7, 5]  # node 0 is the root; the deepest path 0-1-3-4-5-7-8

    def path_to(node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = parents_list[node]
        return path[::-1]

    model = make_model(arch, kind).double()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (1, n), generator=gen) for n in (13, 10)]
    batch_prompt = torch.zeros(2, 13, dtype=torch.long)
    batch_prompt[0], batch_prompt[1, 3:] = prompts[0][0], prompts[1][0]
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = False
    runner = ModelRunner(model, 2)
    runner.extend(batch_prompt, mask)

    nodes = torch.randint(3, 97, (2, len(parents_list)), generator=gen)
    tree, logits = runner.tree_logits(nodes, torch.tensor([parents_list] * 2))
    for row in range(2):
        for node in range(len(parents_list)):
            sequence = torch.cat([prompts[row], nodes[row : row + 1, path_to(node)]], 1)
            expected, _ = decode_one_by_one(model, sequence)
            torch.testing.assert_close(logits[row, node], expected[0, -1], rtol=0, atol=1e-9)

    paths = [path_to(8), path_to(6)]  # 7 and 3 tokens
    accepted = torch.zeros(2, 7, dtype=torch.long)
    accepted_mask = torch.zeros(2, 7, dtype=torch.bool)
    for row, path in enumerate(paths):
        accepted[row, : len(path)] = torch.tensor(path)
        accepted_mask[row, : len(path)] = True
    tree.commit(accepted, accepted_mask)
    with pytest.raises(RuntimeError, match="no longer open"):
        tree.commit(accepted, accepted_mask)

    following = torch.randint(3, 97, (2, 3), generator=gen)
    _, next_logits = runner.tree_logits(following, torch.tensor([[-1, 0, 1]] * 2))
    for row, path in enumerate(paths):
        committed = torch.cat([prompts[row], nodes[row : row + 1, path]], 1)
        _, reference_cache = decode_one_by_one(model, committed)
        assert int(runner.length[row]) == committed.shape[1]
        assert_same_committed_state(runner, row, reference_cache)
        expected, _ = decode_one_by_one(model, torch.cat([committed, following[row : row + 1]], 1))
        torch.testing.assert_close(next_logits[row], expected[0, -3:], rtol=0, atol=1e-9)


def assert_same_committed_state(runner: ModelRunner, row: int, reference_cache) -> None:
    """Row ``row`` of the runner's cache holds what one-by-one decoding left in ``reference_cache``: every tensor
    of each linear state, and the live KV columns of each softmax layer and softmax heads' layer, in order."""
    for index, layer in enumerate(runner.cache.layers):
        reference = reference_cache.layers[index]
        if hasattr(layer, "state"):
            for name, value in layer.state.tensors().items():
                torch.testing.assert_close(
                    value[row : row + 1], reference.state.tensors()[name], rtol=0, atol=1e-10, msg=name
                )
    live = runner.kv_valid[row]  # an open tree's candidate columns come after these
    kv_layers = runner.kv_layers
    reference_layers = reference_cache.kv_layers() if runner.is_linspec else hf.kv_layers(reference_cache)
    assert len(kv_layers) == len(reference_layers)  # softmax layers and softmax heads alike
    for layer, reference in zip(kv_layers, reference_layers, strict=True):
        for got, want in zip(hf.kv_tensors(layer), hf.kv_tensors(reference), strict=True):
            torch.testing.assert_close(got[row][:, : live.numel()][:, live], want[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ("softmax", "hybrid", "heads"))
@torch.no_grad()
def test_a_chain_accepted_from_its_root_commits_as_a_crop(kind):
    """A chain whose rows accept 4 and 2 of its nodes from the root: softmax KV columns are kept where they are
    (no gather); the live columns and the next forward still equal decoding the accepted tokens one by one."""
    model = make_model("llama", kind).double()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 97, (2, 9), generator=gen)
    runner = ModelRunner(model, 2)
    runner.extend(prompt)
    chain = torch.randint(3, 97, (2, 5), generator=gen)
    tree, _ = runner.tree_logits(chain, torch.arange(-1, 4).expand(2, 5))
    tree.commit(torch.arange(4).expand(2, 4), torch.tensor([[True] * 4, [True, True, False, False]]))
    following = torch.randint(3, 97, (2, 2), generator=gen)
    _, next_logits = runner.tree_logits(following, torch.tensor([[-1, 0]] * 2))
    for row, kept in enumerate((4, 2)):
        committed = torch.cat([prompt[row : row + 1], chain[row : row + 1, :kept]], 1)
        _, reference_cache = decode_one_by_one(model, committed)
        assert_same_committed_state(runner, row, reference_cache)
        expected, _ = decode_one_by_one(model, torch.cat([committed, following[row : row + 1]], 1))
        torch.testing.assert_close(next_logits[row], expected[0, -2:], rtol=0, atol=1e-9)


@torch.no_grad()
def test_a_discarded_tree_leaves_the_committed_state_untouched():
    model = make_model("llama", "hybrid").double()
    prompt = random_ids(1, 11, seed=4)
    runner = ModelRunner(model, 1)
    runner.extend(prompt)
    tree, _ = runner.tree_logits(random_ids(1, 4, seed=5), torch.tensor([[-1, 0, 0, 1]]))
    tree.discard()
    with pytest.raises(RuntimeError, match="no longer open"):
        tree.run_layers(tree.hidden)
    _, reference_cache = decode_one_by_one(model, prompt)
    assert_same_committed_state(runner, 0, reference_cache)


@pytest.mark.parametrize("kind", KINDS)
def test_sliding_window_models_generate_exactly_speculatively(kind):
    """A Mistral with an 8-token sliding window, prompt and output far past the window: speculative greedy (a
    lookup chain and an early-exit tree) equals ``generate()``, which applies the window — for the plain model,
    an all-linear conversion and a hybrid whose softmax layer is windowed."""
    model = make_model("mistral", kind, seed=6, sliding_window=8).double()
    assert hf.sliding_windows(model.config, 3) == [8, 8, 8]
    motif = random_ids(1, 6, seed=7)
    prompt = torch.cat([motif] * 5, 1)  # 30 tokens, repetitive so lookup drafts get accepted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
        for drafter in (PromptLookupDrafter(num_tokens=6), EarlyExitDrafter(1, num_tokens=3, tree_width=2)):
            out = speculative_generate(model, drafter, prompt, 24)
            assert out.sequences.tolist() == expected.tolist(), type(drafter).__name__
