"""The sparse cache (``linspec.ops.sparse_cache``): its schedule checked by hand, every mode — composed with the
window as the layer composes them — equal in float64 to the reference that replays the definition token by token,
and a converted model with ``sparse_cache`` agreeing with itself across modes with its cache in a decode state
that does not grow."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
from tiny_models import decode_one_by_one, tiny_linspec

from linspec.config import PRESETS, LinspecConfig
from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.runner import ModelRunner
from linspec.ops.far_memory import FarMemory
from linspec.ops.sparse_cache import (
    SparseCache,
    WindowWithCache,
    empty_cache,
    random_scores,
    sparse_cache_chunked,
    sparse_cache_commit,
    sparse_cache_event,
    sparse_cache_extend,
    sparse_cache_reads,
    sparse_cache_reference,
    sparse_cache_verify,
)
from linspec.ops.verify import TreeLayout
from linspec.ops.window import SoftmaxWindow, empty_window, window_append, window_attention, window_extend, window_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS, KV_HEADS, DIM = 4, 2, 8
FIELDS = [f.name for f in fields(WindowWithCache)]
POLICIES = ["recall-error", "recency", "random"]


def inputs(length: int, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, DIM, generator=generator, dtype=torch.float64)

    return rand(HEADS), rand(KV_HEADS), rand(KV_HEADS)


def far_memory(kind: str, seed: int = 3) -> FarMemory | None:
    """None, the parameter-free map or learnable maps away from the identity, with biases per head (``decayed``:
    the learnable maps with distance exponents around 1)."""
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(HEADS, generator=generator, dtype=torch.float64) + 1.0
    if kind == "softmax":
        return FarMemory(bias)

    def near_identity(heads: int) -> torch.Tensor:
        return torch.eye(DIM, dtype=torch.float64) + 0.5 * torch.randn(heads, DIM, DIM, generator=generator).double()

    maps = near_identity(HEADS), near_identity(KV_HEADS)
    if kind == "decayed":
        return FarMemory(bias, *maps, 1.0 + torch.randn(HEADS, generator=generator, dtype=torch.float64))
    return FarMemory(bias, *maps)


def fresh(batch: int, window: SoftmaxWindow, cache: SparseCache, memory: FarMemory | None) -> WindowWithCache:
    state = empty_window(batch, KV_HEADS, DIM, DIM, window, torch.float64)
    far = None if memory is None else state.keys.new_zeros(batch, KV_HEADS, 2 * DIM, DIM + 1)
    return empty_cache(state, far, cache)


def chunked(q, k, v, window, cache, memory, sink_q=None):
    empty = fresh(q.shape[0], window, cache, memory)
    return window_attention(q, k, v, window, sink_q, sparse_cache_chunked(q, k, v, window, cache, memory, empty))


def extend(q, k, v, state, position, window, cache, memory, token_mask=None, sink_q=None):
    column, after_cache = sparse_cache_extend(q, k, v, state, position, window, cache, memory, token_mask)
    out, after = window_extend(q, k, v, state, position, window, token_mask, sink_q, column)
    return out, replace(after, **after_cache)


def step(q, k, v, state, position, window, cache, memory, sink_q=None, in_place=False):
    exact, far = sparse_cache_reads(q, state, position, window, memory)
    out, after = window_step(q, k, v, state, position, window, sink_q, far, exact)
    return out, replace(after, **sparse_cache_event(state, k, v, position, window, cache, memory, in_place))


def assert_same_state(a: WindowWithCache, b: WindowWithCache) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, msg=name)


# --- the schedule, by hand -----------------------------------------------------------------------------------

# ‖v_j‖² of the tokens 0…8 (one kv head, no far memory): recall-error keeps the largest two, recency the latest two.
SQUARED_NORMS = [4.0, 1.0, 9.0, 2.0, 16.0, 3.0, 1.0, 9.0, 5.0]
# After p tokens with W = 2 and no sinks, tokens j ≤ p − 2 have left the window; the cache's positions then:
RECALL_ERROR_CACHE = {2: [0], 3: [0, 1], 4: [0, 2], 5: [0, 2], **{p: [2, 4] for p in range(6, 12)}}
RECENCY_CACHE = {2: [0], 3: [0, 1], **{p: [p - 3, p - 2] for p in range(4, 12)}}


@pytest.mark.parametrize(("policy", "expected"), [("recall-error", RECALL_ERROR_CACHE), ("recency", RECENCY_CACHE)])
def test_entries_enter_and_leave_when_the_definition_says(policy, expected):
    """Token 2 (score 9) displaces token 1 (the smallest, 1); token 3 (2) does not enter; token 4 (16) displaces
    token 0 (4); token 7 ties the smallest stored score (9) and stays out (a candidate must beat it); tokens 8
    (5) and 9 (0) do not beat it either. Recency keeps the latest two. Decoded one token at a time, the state says
    so."""
    window, cache = SoftmaxWindow(2, 0, 0.5), SparseCache(2, policy)
    length = len(SQUARED_NORMS) + 2
    q, k, _ = inputs(length, batch=1)
    v = torch.zeros(1, KV_HEADS, length, DIM, dtype=torch.float64)
    v[0, :, : len(SQUARED_NORMS), 0] = torch.tensor(SQUARED_NORMS).sqrt()
    state, position = fresh(1, window, cache, None), torch.zeros(1, dtype=torch.long)
    for token in range(length):
        one = slice(token, token + 1)
        _, state = step(q[:, :, one], k[:, :, one], v[:, :, one], state, position, window, cache, None)
        position = position + 1
        kept = state.cache_positions[0, 0]
        assert sorted(kept[kept >= 0].tolist()) == expected.get(token + 1, []), token + 1
    assert sorted(state.cache_scores[0, 0].tolist()) == ([9.0, 16.0] if policy == "recall-error" else [8.0, 9.0])


@pytest.mark.parametrize("memory_kind", ["none", "hedgehog"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_filling_cache_is_placed_at_once_as_the_loop_would(policy, memory_kind, monkeypatch):
    """The evictions that find a free slot in every row are placed without the loop: the same schedule, column
    and state as the loop's, event by event, on rows whose caches fill at different times (a padded second row)
    and across calls that start with the cache part-filled, filling and then full."""
    import linspec.ops.sparse_cache as sparse_cache_module

    window, cache, memory = SoftmaxWindow(3, 1, 0.5), SparseCache(5, policy), far_memory(memory_kind)
    q, k, v = inputs(30, seed=7)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    results = {}
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(sparse_cache_module, "_filling_events", lambda *args: 0)
        state, position, outputs = fresh(2, window, cache, memory), torch.zeros(2, dtype=torch.long), []
        for lo in range(0, 30, 10):
            piece = [x[:, :, lo : lo + 10] for x in (q, k, v)]
            out, state = extend(*piece, state, position, window, cache, memory, mask if lo == 0 else None)
            outputs.append(out)
            position = position + (mask.sum(1) if lo == 0 else 10)
        results[fast] = (torch.cat(outputs, dim=2), state)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert_same_state(results[True][1], results[False][1])
    assert bool((results[True][1].cache_positions >= 0).all())  # the calls did fill the cache


def test_recall_error_reads_the_memory_at_eviction_time():
    """With a far memory the score is the memory's recall error when the token leaves: a token whose key and value
    repeat one already folded is recalled perfectly (score 0) and never displaces an entry."""
    window, cache, memory = SoftmaxWindow(1, 0, 0.5), SparseCache(1, "recall-error"), far_memory("softmax")
    q, k, v = inputs(5, batch=1)
    k[:, :, 3], v[:, :, 3] = k[:, :, 1], v[:, :, 1]  # token 1 folds (token 0 is cached); token 3 repeats it
    v[:, :, 0] *= 10  # token 0 is recalled worst and stays
    _, state = extend(q, k, v, fresh(1, window, cache, memory), torch.zeros(1, dtype=torch.long), window, cache, memory)
    assert state.cache_positions[0].tolist() == [[0], [0]]
    folded = memory.key_features(k[:, :, 1:5]).transpose(-1, -2) @ torch.cat(
        [v[:, :, 1:5], torch.ones_like(v[:, :, 1:5, :1])], -1
    )
    torch.testing.assert_close(state.far_memory, folded)  # tokens 1…4 folded, each once
    features = memory.key_features(k[:, :, 3:4])[:, :, 0]
    readout = (features[..., None, :] @ memory.key_features(k[:, :, 1:2]).transpose(-1, -2) @ torch.cat(
        [v[:, :, 1:2], torch.ones_like(v[:, :, 1:2, :1])], -1))[..., 0, :]  # fmt: skip
    torch.testing.assert_close(readout[..., :-1] / readout[..., -1:], v[:, :, 3])  # recalled exactly: error 0


def test_random_scores_are_a_fixed_function_of_position_and_head():
    positions = torch.arange(-3, 500)[None]
    scores = random_scores(positions, 3, torch.float64)
    torch.testing.assert_close(scores, random_scores(positions, 3, torch.float64), rtol=0, atol=0)
    assert scores.min() >= 0 and scores.max() < 1 and scores.unique().numel() == scores.numel()
    assert not torch.equal(scores[:, 0], scores[:, 1])  # heads keep different tokens
    assert 0.4 < float(scores.mean()) < 0.6


def test_the_policies_keep_different_tokens_and_the_outputs_show_it():
    """Same inputs, same K: recall-error, recency and random differ past the window, and all equal the window
    plus the cache inside it."""
    window = SoftmaxWindow(3, 1, 0.4)
    q, k, v = inputs(30)
    outs = {policy: chunked(q, k, v, window, SparseCache(2, policy), None) for policy in POLICIES}
    for a, b in [("recall-error", "recency"), ("recall-error", "random"), ("recency", "random")]:
        assert not torch.allclose(outs[a][:, :, 8:], outs[b][:, :, 8:], atol=1e-3), (a, b)
        torch.testing.assert_close(outs[a][:, :, :4], outs[b][:, :, :4])


# --- every mode equals the reference -------------------------------------------------------------------------

WINDOWS = [(1, 0), (3, 0), (3, 2), (5, 1), (4, 9)]
MEMORIES = ["none", "softmax", "hedgehog", "decayed"]


@pytest.mark.parametrize("memory_kind", MEMORIES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
@pytest.mark.parametrize("slots", [1, 3])
def test_whole_sequence_equals_reference(size, sinks, slots, policy, memory_kind):
    window, cache, memory = SoftmaxWindow(size, sinks, 0.3), SparseCache(slots, policy), far_memory(memory_kind)
    q, k, v = inputs(31)
    sink_q = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=q.dtype)
    torch.testing.assert_close(
        chunked(q, k, v, window, cache, memory, sink_q),
        sparse_cache_reference(q, k, v, window, cache, memory, sink_q),
    )


def test_small_query_blocks_and_memory_chunks(monkeypatch):
    import linspec.ops.far_memory as far_module
    import linspec.ops.sparse_cache as cache_module
    import linspec.ops.window as window_module

    monkeypatch.setattr(window_module, "QUERY_BLOCK", 3)
    monkeypatch.setattr(far_module, "CHUNK", 4)
    monkeypatch.setattr(cache_module, "QUERY_BLOCK", 5)
    window, memory = SoftmaxWindow(5, 2, 0.4), far_memory("hedgehog")
    q, k, v = inputs(47)
    for policy in POLICIES:
        cache = SparseCache(3, policy)
        torch.testing.assert_close(
            chunked(q, k, v, window, cache, memory), sparse_cache_reference(q, k, v, window, cache, memory)
        )


@pytest.mark.parametrize("memory_kind", ["none", "hedgehog", "decayed"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("size", "sinks"), [(1, 0), (3, 2), (4, 9)])
def test_extend_in_pieces_with_padding_equals_reference(size, sinks, policy, memory_kind, monkeypatch):
    """Rows advance by different, padded pieces and end where the reference does; the state equals one extend.
    Query blocks of 3 make a piece's later blocks skip the old cache's entries that left before them."""
    import linspec.ops.sparse_cache as cache_module
    import linspec.ops.window as window_module

    monkeypatch.setattr(window_module, "EXTEND_SLICE", 5)
    monkeypatch.setattr(cache_module, "QUERY_BLOCK", 3)
    window, cache, memory = SoftmaxWindow(size, sinks, 0.5), SparseCache(2, policy), far_memory(memory_kind)
    length = 25
    q, k, v = inputs(length)
    expected = sparse_cache_reference(q, k, v, window, cache, memory)
    state, position = fresh(2, window, cache, memory), torch.zeros(2, dtype=torch.long)
    cuts = [[0, 1, 9, 10, 18, 25], [0, 4, 5, 16, 17, 25]]
    outputs = [[], []]
    for piece in range(5):
        spans = [(cut[piece], cut[piece + 1]) for cut in cuts]
        width = max(hi - lo for lo, hi in spans) + 2
        pieces = [torch.zeros(2, x.shape[1], width, DIM, dtype=torch.float64) for x in (q, k, v)]
        mask = torch.zeros(2, width, dtype=torch.bool)
        for row, (lo, hi) in enumerate(spans):
            columns = torch.arange(1, 1 + hi - lo) if piece % 2 else torch.arange(width - (hi - lo), width)
            for x, src in zip(pieces, (q, k, v), strict=True):
                x[row, :, columns] = src[row, :, lo:hi]
            mask[row, columns] = True
        out, state = extend(*pieces, state, position, window, cache, memory, mask)
        assert torch.all(out[~mask[:, None, :].expand(2, HEADS, width)] == 0)
        for row in range(2):
            outputs[row].append(out[row][:, mask[row]])
        position = position + mask.sum(1)
    for row in range(2):
        torch.testing.assert_close(torch.cat(outputs[row], dim=1), expected[row])
    one_go = extend(q, k, v, fresh(2, window, cache, memory), torch.zeros(2, dtype=torch.long), window, cache, memory)
    assert_same_state(state, one_go[1])
    assert state.cache_keys.shape == (2, KV_HEADS, 2, DIM) and state.cache_positions.dtype == torch.long


@pytest.mark.parametrize("memory_kind", ["none", "hedgehog", "decayed"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("size", "sinks"), [(1, 0), (3, 2), (5, 1)])
def test_decode_steps_equal_reference_and_extend(size, sinks, policy, memory_kind):
    """Decoding token by token after a padded prefill (the second row starts later): outputs equal the reference,
    and each step's state equals extend's. A step leaves its input state as it was, and writes the same fields
    into the input's own tensors when asked to work in place."""
    window, cache, memory = SoftmaxWindow(size, sinks, 0.3), SparseCache(2, policy), far_memory(memory_kind)
    q, k, v = inputs(24)
    expected = sparse_cache_reference(q, k, v, window, cache, memory)
    first = torch.tensor([[True] * 5, [False, False, False, True, True]])
    _, state = extend(q[:, :, :5], k[:, :, :5], v[:, :, :5], fresh(2, window, cache, memory),
                      torch.zeros(2, dtype=torch.long), window, cache, memory, first)  # fmt: skip
    position = torch.tensor([5, 2])
    for t in range(5, 24):
        args = tuple(x[:, :, t : t + 1] for x in (q, k, v))
        before = replace(state, **{name: field.clone() for name, field in vars(state).items() if field is not None})
        out, next_state = step(*args, state, position, window, cache, memory)
        assert_same_state(state, before)
        written = replace(before, **{name: field.clone() for name, field in vars(before).items() if field is not None})
        in_place_out, in_place = step(*args, written, position, window, cache, memory, in_place=True)
        torch.testing.assert_close(in_place_out, out, rtol=0, atol=0)
        assert_same_state(in_place, next_state)
        for name in ("cache_keys", "cache_values", "cache_scores", "cache_positions", "far_memory"):
            if getattr(written, name) is not None:
                assert getattr(in_place, name) is getattr(written, name), name
        torch.testing.assert_close(out[0, :, 0], expected[0, :, t])
        reference_out, reference_state = extend(*args, state, position, window, cache, memory)
        torch.testing.assert_close(out, reference_out)
        assert_same_state(next_state, reference_state)
        state, position = next_state, position + 1
    second = torch.cat([torch.arange(3, 5), torch.arange(5, 24)])
    alone = sparse_cache_reference(*(x[1:, :, second] for x in (q, k, v)), window, cache, memory)
    torch.testing.assert_close(out[1, :, 0], alone[0, :, -1])


TREE = [-1, 0, 1, 0, 3, 4, 2, 1]  # depths up to 4


def decode_path(q, k, v, state, position, window, cache, memory, nodes):
    outs = []
    for node in nodes:
        one = slice(node, node + 1)
        out, state = extend(q[:, :, one], k[:, :, one], v[:, :, one], state, position, window, cache, memory)
        position = position + 1
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("memory_kind", ["none", "hedgehog", "decayed"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("size", "sinks"), [(5, 0), (6, 2), (9, 1)])
@pytest.mark.parametrize("committed", [0, 4, 9, 17])
def test_verify_equals_decoding_each_path(size, sinks, committed, policy, memory_kind):
    window, cache, memory = SoftmaxWindow(size, sinks, 0.7), SparseCache(2, policy), far_memory(memory_kind)
    prefix = inputs(committed, batch=1, seed=1)
    state = fresh(1, window, cache, memory)
    state = extend(*prefix, state, torch.zeros(1, dtype=torch.long), window, cache, memory)[1]
    position = torch.tensor([committed])
    q, k, v = inputs(len(TREE), batch=1, seed=2)
    layout = TreeLayout.of(torch.tensor([TREE]))
    from linspec.ops.window import window_verify

    column = sparse_cache_verify(q, k, v, state, position, layout, window, cache, memory)
    out = window_verify(q, k, v, state, position, layout, window, None, column)
    for leaf in range(len(TREE)):
        path = [leaf]
        while TREE[path[0]] >= 0:
            path.insert(0, TREE[path[0]])
        sequential, _ = decode_path(q, k, v, state, position, window, cache, memory, path)
        torch.testing.assert_close(out[:, :, leaf], sequential[:, :, -1])


def test_trees_as_deep_as_the_window_are_refused():
    window, cache = SoftmaxWindow(3, 1, 0.5), SparseCache(2, "recency")
    q, k, v = inputs(len(TREE), batch=1)
    state = fresh(1, window, cache, None)
    layout = TreeLayout.of(torch.tensor([TREE]))  # nodes at depth 3 = W
    with pytest.raises(LinspecError, match="shallower than the window"):
        sparse_cache_verify(q, k, v, state, torch.tensor([9]), layout, window, cache, None)


@pytest.mark.parametrize("memory_kind", ["none", "hedgehog", "decayed"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("size", "sinks"), [(1, 0), (3, 2), (4, 1)])
@pytest.mark.parametrize("committed", [0, 3, 11])
def test_commit_of_an_accepted_path_equals_decoding_it(size, sinks, committed, policy, memory_kind):
    window, cache, memory = SoftmaxWindow(size, sinks, 0.7), SparseCache(2, policy), far_memory(memory_kind)
    prefix = inputs(committed, batch=2, seed=1)
    state = fresh(2, window, cache, memory)
    state = extend(*prefix, state, torch.zeros(2, dtype=torch.long), window, cache, memory)[1]
    position = torch.full((2,), committed)
    q, k, v = inputs(len(TREE), batch=2, seed=2)
    path = [0, 3, 4, 5]
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    keys, values = k[:, :, path], v[:, :, path]
    appended = replace(
        window_append(state, position, keys, values, mask),
        **sparse_cache_commit(state, position, keys, values, window, cache, memory, mask),
    )
    for row, kept in enumerate([path, path[:2]]):
        one = slice(row, row + 1)
        rows = replace(
            state, **{name: getattr(state, name)[one] for name in FIELDS if getattr(state, name) is not None}
        )
        _, decoded = decode_path(q[one], k[one], v[one], rows, position[one], window, cache, memory, kept)
        for name in FIELDS:
            if getattr(appended, name) is not None:
                torch.testing.assert_close(getattr(appended, name)[row], getattr(decoded, name)[0])


# --- the model -----------------------------------------------------------------------------------------------

SETTINGS = {**PRESETS["window"], "local_window": 6, "sink_tokens": 2, "sparse_cache": 3}


def cache_model(seed: int = 4, **overrides):
    return tiny_linspec("qwen3", seed=seed, **{**SETTINGS, **overrides}).double().eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_settings_are_checked():
    settings = LinspecConfig(**SETTINGS, sparse_cache_policy="random")
    assert LinspecConfig.from_dict(settings.to_dict()) == settings
    assert LinspecConfig.from_preset("window").sparse_cache == 0
    with pytest.raises(LinspecError, match="sparse_cache_policy must be one of"):
        LinspecConfig(**{**SETTINGS, "sparse_cache_policy": "lru"})
    with pytest.raises(LinspecError, match="sparse_cache needs local_kernel 'softmax'"):
        LinspecConfig(sparse_cache=4)
    with pytest.raises(LinspecError, match="sparse_cache must be an integer"):
        LinspecConfig(**{**SETTINGS, "sparse_cache": -1})
    with pytest.raises(LinspecError, match="needs sparse_cache >= 1"):
        LinspecConfig(**{**PRESETS["window"], "sparse_cache_policy": "recency"})
    with pytest.raises(LinspecError, match="sparse_cache_policy must be a name"):
        LinspecConfig.from_dict({**SETTINGS, "sparse_cache_policy": 3})


@torch.no_grad()
@pytest.mark.parametrize(("policy", "memory_map"), [("recall-error", "none"), ("recall-error", "hedgehog"),
                                                    ("recency", "softmax"), ("random", "none")])  # fmt: skip
def test_every_mode_of_the_model_agrees(policy, memory_map):
    """A left-padded prefill, decode steps and an extend agree with each row's whole-sequence forward; a tree
    equals decoding its paths; after a commit a tree sees exactly the committed context — past the window."""
    model = cache_model(sparse_cache_policy=policy, memory_feature_map=memory_map)
    ids = random_ids(2, 26, seed=5)
    without = cache_model(sparse_cache=0, memory_feature_map=memory_map)
    assert not torch.allclose(model(ids).logits[:, 12:], without(ids).logits[:, 12:], atol=1e-4)
    torch.testing.assert_close(model(ids).logits[:, :8], without(ids).logits[:, :8], rtol=0, atol=1e-12)
    mask = torch.ones(2, 26, dtype=torch.bool)
    mask[1, :4] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache()

    def forward(columns: slice) -> torch.Tensor:
        return model(
            ids[:, columns], attention_mask=mask[:, : columns.stop].long(), position_ids=positions[:, columns],
            **hf.cache_kwargs(cache),
        ).logits  # fmt: skip

    steps = [forward(slice(0, 9)), *(forward(slice(t, t + 1)) for t in range(9, 15)), forward(slice(15, 26))]
    cached = torch.cat(steps, dim=1)
    for row in range(2):
        alone = model(ids[row : row + 1, mask[row]], use_cache=False).logits[0]
        torch.testing.assert_close(cached[row, mask[row]], alone, rtol=0, atol=1e-10)

    parents = [-1, 0, 0, 1, 3, 2]
    runner = ModelRunner(model, 2)
    runner.extend(ids, mask)
    nodes = random_ids(2, len(parents), seed=6)
    tree, logits = runner.tree_logits(nodes, torch.tensor([parents] * 2))
    for row in range(2):
        for node in range(len(parents)):
            path = [node]
            while parents[path[0]] >= 0:
                path.insert(0, parents[path[0]])
            sequence = torch.cat([ids[row, mask[row]], nodes[row, path]])[None]
            torch.testing.assert_close(
                logits[row, node], decode_one_by_one(model, sequence)[0][0, -1], rtol=0, atol=1e-9
            )
    tree.commit(torch.tensor([[0, 1, 3, 4], [0, 2, 5, 0]]), torch.tensor([[1] * 4, [1, 1, 1, 0]]).bool())
    following = random_ids(2, 2, seed=7)
    _, after = runner.tree_logits(following, torch.tensor([[-1, 0]] * 2))
    for row, path in enumerate([[0, 1, 3, 4], [0, 2, 5]]):
        sequence = torch.cat([ids[row, mask[row]], nodes[row, path], following[row]])[None]
        torch.testing.assert_close(after[row], decode_one_by_one(model, sequence)[0][0, -2:], rtol=0, atol=1e-9)


@torch.no_grad()
def test_a_tree_as_deep_as_the_window_is_refused_by_the_model():
    model = cache_model()
    runner = ModelRunner(model, 1)
    runner.extend(random_ids(1, 10), torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(LinspecError, match="shallower than the window"):
        runner.tree_logits(random_ids(1, 7), torch.tensor([[-1, 0, 1, 2, 3, 4, 5]]))  # depth 6 = W


def test_training_ignores_the_cache():
    """The training forward (training mode, no decode cache) is the window (and its far memory) alone, gradients
    included; in eval mode the same forward reads the cache."""
    model, without = cache_model(), cache_model(sparse_cache=0)
    ids = random_ids(1, 20)
    model.train(), without.train()
    trained = model(ids, use_cache=False).logits
    torch.testing.assert_close(trained, without(ids, use_cache=False).logits, rtol=0, atol=0)
    trained.sum().backward()
    assert any(p.grad is not None for p in model.parameters())
    model.eval(), without.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids, use_cache=False).logits, without(ids, use_cache=False).logits, atol=1e-4)


@torch.no_grad()
def test_the_window_only_ablation_drops_the_cache():
    from linspec.evaluation.perplexity import ablated, ablation_components

    model, without = cache_model(), cache_model(sparse_cache=0)
    ids = random_ids(1, 22)
    with (
        ablated(model, ablation_components("window-only", model)),
        ablated(without, ablation_components("window-only", without)),
    ):
        torch.testing.assert_close(model(ids).logits, without(ids).logits, rtol=0, atol=1e-12)


def test_a_decode_step_writes_into_its_cache_only_where_nothing_else_reads_the_state():
    """Inside inference mode a step writes the cache's event into the state's own tensors; under no_grad with
    tensors made in inference mode (PyTorch refuses to update those outside it) and with autograd on, it makes
    new ones. The logits are the same either way."""
    model = cache_model(memory_feature_map="softmax")
    ids = random_ids(1, 24)

    def cache_keys(cache):
        return cache.linear_state(0).slices["window"].cache_keys

    with torch.inference_mode():
        cache = model.new_cache()
        model(ids[:, :20], **hf.cache_kwargs(cache))
        keys = cache_keys(cache)
        written = model(ids[:, 20:21], **hf.cache_kwargs(cache)).logits
        assert cache_keys(cache) is keys
    with torch.no_grad():
        model(ids[:, 21:22], **hf.cache_kwargs(cache))
        assert cache_keys(cache) is not keys
    copies = model.new_cache()
    model(ids[:, :20], **hf.cache_kwargs(copies))
    keys = cache_keys(copies)
    copied = model(ids[:, 20:21], **hf.cache_kwargs(copies)).logits
    assert cache_keys(copies) is not keys
    torch.testing.assert_close(copied, written, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("memory_map", ["none", "softmax"])
def test_the_cache_is_in_the_decode_state_and_constant(memory_map):
    from linspec.models.cache_size import measured_cache_growth

    model = cache_model(memory_feature_map=memory_map).float()
    without = cache_model(sparse_cache=0, memory_feature_map=memory_map).float()
    cache = model.new_cache()
    model(random_ids(1, 30), **hf.cache_kwargs(cache))
    state = cache.linear_state(0)
    part = state.slices["window"]
    module = model.linspec_modules()[0]
    assert part.cache_keys.shape == (1, module.num_kv_heads, 3, module.head_dim)
    assert bool((part.cache_positions >= 0).all()) and int(part.cache_positions.max()) <= 30 - 6
    assert {"window.cache_keys", "window.cache_values", "window.cache_scores", "window.cache_positions"} <= set(
        state.tensors()
    )
    per_layer = module.num_kv_heads * 3 * (2 * module.head_dim * 4 + 4 + 8)  # keys, values, score, position
    grown = measured_cache_growth(model).fixed - measured_cache_growth(without).fixed
    assert grown == len(model.linspec_modules()) * per_layer
    assert measured_cache_growth(model).per_token == 0
    cache.select_rows(torch.tensor([0, 0]))  # rows copied with the rest of the state
    assert cache.linear_state(0).slices["window"].cache_keys.shape[0] == 2


@torch.no_grad()
def test_the_card_says_what_the_cache_is_and_how_to_rebuild_it():
    from linspec.conversion.card import conversion_card

    model = cache_model(sparse_cache_policy="recency").float()
    settings = model.config.linspec_settings
    card = conversion_card(
        "base", "out", settings, model, dtype=torch.float32, max_shard_size="2GB", allow_pickle=False,
        trust_remote_code=False,
    ).render()  # fmt: skip
    assert "| sparse cache | 3 tokens per kv head (recency)" in card
    assert "--sparse-cache 3 --sparse-cache-policy recency" in card


@torch.no_grad()
def test_the_memory_readout_ablation_keeps_the_cache_the_memory_chose():
    """Without its readout the memory still chooses the cache (the same tokens at every step), its own share is
    gone (the output changes, and is not the window-only one), the decode path agrees with the whole-sequence
    forward, and the bias is restored on exit."""
    from linspec.evaluation.perplexity import ablated, ablation_components, variant_name

    model = cache_model(memory_feature_map="hedgehog", memory_distance_decay=True)
    for module in model.linspec_modules():  # a memory with weight: b_h well above its initial value
        module.memory_bias.add_(2.0)
    ids = random_ids(1, 24, seed=8)
    components = ablation_components("memory-readout", model)
    assert variant_name(model, components) == "no-memory-readout"

    def positions_and_logits():
        cache = model.new_cache()
        steps = [model(ids[:, :10], **hf.cache_kwargs(cache)).logits]
        steps += [model(ids[:, t : t + 1], **hf.cache_kwargs(cache)).logits for t in range(10, 24)]
        state = cache.linear_state(0).slices["window"]
        return state.cache_positions.clone(), torch.cat(steps, dim=1)

    full = model(ids).logits
    full_positions, _ = positions_and_logits()
    with ablated(model, components):
        ablated_logits = model(ids).logits
        positions, decoded = positions_and_logits()
    assert torch.equal(positions, full_positions)
    torch.testing.assert_close(decoded, ablated_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(ablated_logits[:, :8], full[:, :8], rtol=0, atol=1e-12)  # nothing folded yet
    assert not torch.allclose(ablated_logits[:, 12:], full[:, 12:], atol=1e-4)
    with ablated(model, ablation_components("far-memory", model)):
        assert not torch.allclose(ablated_logits[:, 12:], model(ids).logits[:, 12:], atol=1e-4)  # the cache stays
    torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)  # restored
    without = cache_model(sparse_cache=0, memory_feature_map="none")
    with pytest.raises(LinspecError, match="memory-readout needs"):
        ablation_components("memory-readout", without)
